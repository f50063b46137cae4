package sim

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"kmesh.dev/kmesh/integration/kerneltest"
	"kmesh.dev/kmesh/integration/podnet"
)

// A killed external-mode run leaves mounts in its run directory (the
// shared netns directory and each pod's netns pin): the next run's reaper
// detaches them, so the directory and the pinned namespaces go.
func TestPrivilegedSimReapDetachesMounts(t *testing.T) {
	kerneltest.RequireRoot(t)
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	id := "reaptest-" + podnet.RandomSuffix()
	dir := filepath.Join(runParent, id)
	netnsDir := filepath.Join(dir, "node-1", "host", "run", "netns")
	if err := os.MkdirAll(netnsDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(strconv.Itoa(dead.Process.Pid)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount(netnsDir, netnsDir, "", syscall.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	ns, err := podnet.NewNetns("reaptest")
	if err != nil {
		t.Fatal(err)
	}
	pin := filepath.Join(netnsDir, "cni-x")
	if err := pinNetns(ns, pin); err != nil {
		t.Fatal(err)
	}
	ns.Close()
	reapStale()
	if _, err := os.Stat(dir); err == nil {
		t.Errorf("the dead run's directory %s stays", dir)
		detachMountsUnder(dir)
		_ = os.RemoveAll(dir)
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), dir) {
		t.Errorf("mounts under %s stay", dir)
	}
}
