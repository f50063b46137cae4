package cluster

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"time"

	"kmesh.dev/kmesh/integration/freeport"
)

// process is one control-plane binary running for the test, its output in
// a log file. It dies with the test process (Pdeathsig), whatever happens.
type process struct {
	Name    string
	LogFile string
	cmd     *exec.Cmd
	done    chan struct{}
	err     error // exit status, once done is closed
}

func startProcess(name, bin, dir, logFile string, env, args []string) (*process, error) {
	logf, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := startOnSpawner(cmd); err != nil {
		return nil, fmt.Errorf("starting %s (%s): %w", name, bin, err)
	}
	p := &process{Name: name, LogFile: logFile, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// Pid is the process id.
func (p *process) Pid() int { return p.cmd.Process.Pid }

// exited reports an error if the process has exited.
func (p *process) exited() error {
	select {
	case <-p.done:
		return fmt.Errorf("%s exited (%v); its log ends:\n%s", p.Name, p.err, p.Tail(3000))
	default:
		return nil
	}
}

// Stop sends SIGTERM and, after grace, SIGKILL to the process (only to
// it: each process runs in its own group, and only its pid is signalled).
func (p *process) Stop(grace time.Duration) {
	if p == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// Tail is the end of the process's log.
func (p *process) Tail(n int) string {
	b, _ := os.ReadFile(p.LogFile)
	s := strings.TrimSpace(string(b))
	if len(s) > n {
		s = "..." + s[len(s)-n:]
	}
	return s
}

// Pdeathsig fires when the thread that forked the child exits, not the
// process: Go retires a thread whose goroutine exits while locked to it
// (namespace code does so on errors). The control plane lives across
// tests, so it is forked from one locked thread that never exits.
var spawner = make(chan func())

func init() {
	go func() {
		runtime.LockOSThread() // never unlocked: this thread lives as long as the process
		for f := range spawner {
			f()
		}
	}()
}

func startOnSpawner(cmd *exec.Cmd) error {
	errc := make(chan error, 1)
	spawner <- func() { errc <- cmd.Start() }
	return <-errc
}

// freePort picks a free loopback TCP port (freeport.Port: below the
// ephemeral range, so no outgoing connection takes it before ours binds).
func freePort() (int, error) { return freeport.Port() }

func freePorts(ps ...*int) error {
	for _, p := range ps {
		var err error
		if *p, err = freePort(); err != nil {
			return err
		}
	}
	return nil
}

// waitFor polls check every interval until it succeeds, the process
// exits or timeout passes.
func waitFor(what string, p *process, timeout time.Duration, check func() error) error {
	deadline := time.Now().Add(timeout)
	var last error
	for {
		if err := p.exited(); err != nil {
			return fmt.Errorf("waiting for %s: %w", what, err)
		}
		if last = check(); last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %s: %v; %s log ends:\n%s", what, timeout, last, p.Name, p.Tail(3000))
		}
		time.Sleep(50 * time.Millisecond)
	}
}
