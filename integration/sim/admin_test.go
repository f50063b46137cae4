package sim_test

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"kmesh.dev/kmesh/integration/sim"
)

// /logging and /quitquitquit on a real daemon process (which runs with
// sysmon kept awake: its GODEBUG): the level changes
// what it logs, and a POST to /quitquitquit makes it exit as SIGTERM does
// (status 0, the kernel data path left in place).
func TestPrivilegedSimAdminLoggingAndQuit(t *testing.T) {
	c := startClusterWith(t, sim.Options{Nodes: 1, Objects: objects})
	d := c.Nodes[0].Daemon
	// The daemon re-executed itself so that the Go runtime's monitor
	// thread never parks (cmd/kmesh-daemon/sysmon.go, issue 17).
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", d.Pid()))
	godebug := ""
	for _, kv := range strings.Split(string(env), "\x00") {
		if v, ok := strings.CutPrefix(kv, "GODEBUG="); ok {
			godebug = v
		}
	}
	if err != nil || !strings.Contains(godebug, "schedtrace=2147483647") {
		t.Errorf("the daemon's GODEBUG is %q (%v), want schedtrace=2147483647 in it", godebug, err)
	}
	post := func(path string) string {
		resp, err := http.Post("http://"+d.AdminAddr+path, "", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	if got := post("/logging"); got != "current log level is info\n" {
		t.Errorf("POST /logging: %q", got)
	}
	if got := post("/logging?level=debug"); got != "current log level is debug\n" {
		t.Errorf("POST /logging?level=debug: %q", got)
	}
	// Debug records appear once the level says so: a pod's enrolment logs
	// at debug somewhere on its way; at least the change itself is logged.
	if !strings.Contains(d.Log(), "log level changed on the admin port") {
		t.Errorf("the level change is not in the daemon's log:\n%s", d.Log())
	}
	if got := post("/logging?reset"); got != "current log level is info\n" {
		t.Errorf("POST /logging?reset: %q", got)
	}

	if got := post("/quitquitquit"); got != "shutdown now\n" {
		t.Errorf("POST /quitquitquit: %q", got)
	}
	select {
	case <-d.Done():
	case <-time.After(20 * time.Second):
		t.Fatalf("the daemon still runs 20 s after /quitquitquit:\n%s", d.Log())
	}
	if code := d.ExitCode(); code != 0 {
		t.Errorf("exit status %d after /quitquitquit, want 0:\n%s", code, d.Log())
	}
	if !strings.Contains(d.Log(), "shutting down; the kernel data path stays in place") {
		t.Errorf("the daemon did not take SIGTERM's path:\n%s", d.Log())
	}
	if _, err := http.Get("http://" + d.ReadyAddr + "/healthz/ready"); err == nil {
		t.Error("the readiness port still answers after the exit")
	}
}
