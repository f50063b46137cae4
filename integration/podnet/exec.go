package podnet

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Start starts cmd as a process of the pod: inside its network namespace
// (inherited from the forking thread) and inside cg from its first
// instruction (clone3 CLONE_INTO_CGROUP), so every socket it opens is seen by
// programs attached to cg. The process dies with the caller (Pdeathsig).
func (p *Pod) Start(cmd *exec.Cmd, cg *Cgroup) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	if cg != nil {
		f, err := cg.Open()
		if err != nil {
			return err
		}
		defer f.Close()
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = int(f.Fd())
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	return p.NS.Do(cmd.Start)
}

// PodHostnameEnv, set together with CLONE_NEWUTS, names the hostname a
// pod process takes.
const PodHostnameEnv = "KMESH_POD_HOSTNAME"

// helperEnv selects a registered helper when the current binary re-executes
// itself as a process inside a pod.
const helperEnv = "KMESH_PODNET_HELPER"

var helpers = map[string]func(args []string) (any, error){}

// RegisterHelper makes fn runnable inside pods through Pod.Helper. fn's
// result is printed as JSON on stdout for the parent to decode.
func RegisterHelper(name string, fn func(args []string) (any, error)) {
	helpers[name] = fn
}

// MaybeRunHelper must be the first thing main or TestMain does: when the
// process was started as a pod helper it runs the helper and exits.
func MaybeRunHelper() {
	name := os.Getenv(helperEnv)
	if name == "" {
		return
	}
	fn, ok := helpers[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "podnet: unknown helper %q\n", name)
		os.Exit(2)
	}
	// The simulator starts pod processes in a UTS namespace of their own and
	// says so; only then is the hostname ours to set.
	if h := os.Getenv(PodHostnameEnv); h != "" {
		if err := unix.Sethostname([]byte(h)); err != nil {
			fmt.Fprintf(os.Stderr, "podnet: setting hostname: %v\n", err)
			os.Exit(1)
		}
	}
	res, err := fn(os.Args[1:])
	if err != nil {
		fmt.Fprintf(os.Stderr, "podnet helper %s: %v\n", name, err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		os.Exit(1)
	}
	os.Exit(0)
}

// Helper runs a registered helper as a process of the pod (in cg) and
// decodes its JSON result into out.
func (p *Pod) Helper(cg *Cgroup, out any, name string, args ...string) error {
	cmd := exec.Command("/proc/self/exe", args...)
	cmd.Env = append(os.Environ(), helperEnv+"="+name)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := p.Start(cmd, cg); err != nil {
		return fmt.Errorf("starting helper %s in pod %s: %w", name, p.Name, err)
	}
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("helper %s in pod %s: %w: %s", name, p.Name, err, strings.TrimSpace(stderr.String()))
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(stdout.Bytes(), out); err != nil {
		return fmt.Errorf("helper %s output %q: %w", name, stdout.String(), err)
	}
	return nil
}

// Tally counts named outcomes (which backend answered, which error).
type Tally map[string]int

// Total is the sum of all counts.
func (t Tally) Total() int {
	n := 0
	for _, v := range t {
		n += v
	}
	return n
}

// Keys returns the outcomes seen, sorted.
func (t Tally) Keys() []string {
	ks := make([]string, 0, len(t))
	for k := range t {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// HasHelper reports whether a helper of that name is registered.
func HasHelper(name string) bool {
	_, ok := helpers[name]
	return ok
}

// HelperEnv is the environment entry that makes a re-executed binary run
// the named helper (see MaybeRunHelper).
func HelperEnv(name string) string { return helperEnv + "=" + name }
