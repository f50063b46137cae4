package cluster

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"kmesh.dev/kmesh/integration/kerneltest"
	"kmesh.dev/kmesh/kernel"
)

// What a run killed without warning leaves (its directory, cgroup, pin
// root) is removed by the next run; a live run's is not.
func TestPrivilegedClusterReapStale(t *testing.T) {
	kerneltest.RequireRoot(t)
	live, err := NewRun()
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	liveNode, err := live.NewNode("n1")
	if err != nil {
		t.Fatal(err)
	}
	defer liveNode.Close()
	if err := os.MkdirAll(liveNode.PinRoot, 0o700); err != nil {
		t.Fatal(err)
	}

	dead, err := NewRun()
	if err != nil {
		t.Fatal(err)
	}
	deadNode, err := dead.NewNode("n1")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(deadNode.PinRoot, 0o700); err != nil {
		t.Fatal(err)
	}
	// The owner is a process that has exited.
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dead.Dir, ownerFile), []byte(strconv.Itoa(cmd.Process.Pid)), 0o600); err != nil {
		t.Fatal(err)
	}
	ReapStale()
	root, _ := kernel.Cgroup2Root()
	for _, p := range []string{dead.Dir, filepath.Join(PinParent, dead.ID), filepath.Join(root, cgroupPrefix+dead.ID)} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s survived the reaping of a dead run", p)
		}
	}
	for _, p := range []string{live.Dir, liveNode.PinRoot, liveNode.Cgroup.Path} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("a live run's %s was reaped: %v", p, err)
		}
	}
}
