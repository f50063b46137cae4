// Package daemonproc builds the real kmesh-daemon binary and runs it as a
// process, as the harness's tiers need it: the node simulator
// (integration/sim) runs one per simulated node, the cluster tier
// (integration/cluster) one against a real pilot-discovery.
package daemonproc

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"kmesh.dev/kmesh/integration/freeport"
)

// Build builds kmesh-daemon from this module into dir. Go's build cache
// makes this quick after the first time.
func Build(dir string) (string, error) {
	out := dir + "/kmesh-daemon"
	cmd := exec.Command("go", "build", "-o", out, "kmesh.dev/kmesh/cmd/kmesh-daemon")
	cmd.Env = os.Environ()
	b, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("building kmesh-daemon: %w: %s", err, strings.TrimSpace(string(b)))
	}
	return out, nil
}

// Daemon is a running kmesh-daemon process.
type Daemon struct {
	LogFile   string
	AdminAddr string // KMESH_ADMIN_ADDR: /config_dump
	StatsAddr string // KMESH_STATS_ADDR: /metrics
	ReadyAddr string // KMESH_READINESS_ADDR: /healthz/ready
	cmd       *exec.Cmd
	done      chan struct{}
}

// FreeAddr returns a free 127.0.0.1 TCP address (freeport.Addr).
func FreeAddr() (string, error) { return freeport.Addr() }

// Start runs bin with this process's environment, admin, stats and
// readiness servers on free loopback ports, then env (which wins over
// both). Its output is appended to logFile. The daemon dies with the
// caller (Pdeathsig) and runs in its own process group. args are its
// command line (none: the daemon; "hold": the listener holder).
func Start(bin, logFile string, env []string, args ...string) (*Daemon, error) {
	d := &Daemon{LogFile: logFile, done: make(chan struct{})}
	for _, p := range []*string{&d.AdminAddr, &d.StatsAddr, &d.ReadyAddr} {
		a, err := FreeAddr()
		if err != nil {
			return nil, err
		}
		*p = a
	}
	logf, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(),
		"KMESH_ADMIN_ADDR="+d.AdminAddr, "KMESH_STATS_ADDR="+d.StatsAddr, "KMESH_READINESS_ADDR="+d.ReadyAddr)
	cmd.Env = append(cmd.Env, env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting kmesh-daemon: %w", err)
	}
	d.cmd = cmd
	go func() {
		_ = cmd.Wait()
		close(d.done)
	}()
	return d, nil
}

// Done is closed when the process has exited.
func (d *Daemon) Done() <-chan struct{} { return d.done }

// Pid is the daemon's process id.
func (d *Daemon) Pid() int { return d.cmd.Process.Pid }

// ExitCode is the exit status of a daemon that has exited (-1 for a
// signal), and -1 while it runs.
func (d *Daemon) ExitCode() int {
	select {
	case <-d.done:
		return d.cmd.ProcessState.ExitCode()
	default:
		return -1
	}
}

// Signal sends sig to the daemon (only to its pid).
func (d *Daemon) Signal(sig os.Signal) error { return d.cmd.Process.Signal(sig) }

// Kill kills the daemon without warning and waits for it.
func (d *Daemon) Kill() {
	_ = d.cmd.Process.Kill()
	<-d.done
}

// Stop stops the daemon as Kubernetes stops a pod: SIGTERM, then SIGKILL
// after grace.
func (d *Daemon) Stop(grace time.Duration) {
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(grace):
		d.Kill()
	}
}

// WaitReady polls /healthz/ready until it answers 200, the daemon exits,
// ctx ends or timeout passes.
func (d *Daemon) WaitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case <-d.done:
			return fmt.Errorf("kmesh-daemon exited: %s", d.Tail())
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		resp, err := http.Get("http://" + d.ReadyAddr + "/healthz/ready")
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("kmesh-daemon not ready after %s: %s", timeout, d.Tail())
}

// Tail returns the end of the daemon's log, for errors.
func (d *Daemon) Tail() string {
	b, _ := os.ReadFile(d.LogFile)
	s := strings.TrimSpace(string(b))
	if i := len(s) - 2000; i > 0 {
		s = s[i:]
	}
	return s
}

// Log returns the daemon's log so far.
func (d *Daemon) Log() string {
	b, _ := os.ReadFile(d.LogFile)
	return string(b)
}

// Metrics returns the daemon's Prometheus text.
func (d *Daemon) Metrics() (string, error) {
	return get("http://" + d.StatsAddr + "/metrics")
}

// ConfigDump returns the daemon's view of the mesh in Kmesh's own format
// (/kmesh/config_dump: the store with the fields the data path uses; the
// admin port's /config_dump is ztunnel's format, for istioctl), or the
// error's text.
func (d *Daemon) ConfigDump() string {
	s, err := get("http://" + d.AdminAddr + "/kmesh/config_dump")
	if err != nil {
		return err.Error()
	}
	return s
}

func get(url string) (string, error) {
	resp, err := http.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}
