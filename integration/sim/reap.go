package sim

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/kernel"
)

// A simulator killed without warning (SIGKILL, a power cut of the test
// runner) cannot clean up after itself. Each run records its pid; the next
// run removes what dead runs left: their cgroups (killing any process still
// in them), pins and run directory. Network namespaces need no reaping:
// they are held by descriptors and processes only, and die with them.

const ownerFile = "owner.pid"

func writeOwner(runDir string) error {
	return os.WriteFile(filepath.Join(runDir, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o600)
}

func alive(pid int) bool {
	return pid > 0 && syscall.Kill(pid, 0) == nil
}

// reapStale removes the leftovers of simulator runs whose process is gone.
func reapStale() {
	ids := map[string]bool{}
	if entries, err := os.ReadDir(runParent); err == nil {
		for _, e := range entries {
			ids[e.Name()] = true
		}
	}
	if entries, err := os.ReadDir(PinParent); err == nil {
		for _, e := range entries {
			ids[e.Name()] = true
		}
	}
	root, err := kernel.Cgroup2Root()
	if err == nil {
		if m, _ := filepath.Glob(filepath.Join(root, "kmesh-sim-*")); m != nil {
			for _, p := range m {
				ids[strings.TrimPrefix(filepath.Base(p), "kmesh-sim-")] = true
			}
		}
	}
	for id := range ids {
		b, err := os.ReadFile(filepath.Join(runParent, id, ownerFile))
		if err == nil {
			if pid, _ := strconv.Atoi(strings.TrimSpace(string(b))); alive(pid) {
				continue
			}
		} else if st, err := os.Stat(filepath.Join(runParent, id)); err == nil && time.Since(st.ModTime()) < time.Minute {
			continue // a run starting right now, before it wrote its owner file
		}
		if root != "" {
			_ = (&podnet.Cgroup{Path: filepath.Join(root, "kmesh-sim-"+id)}).Remove()
		}
		if nodes, _ := os.ReadDir(filepath.Join(PinParent, id)); nodes != nil {
			for _, n := range nodes {
				_ = bpf.RemovePins(filepath.Join(PinParent, id, n.Name()))
			}
		}
		_ = os.RemoveAll(filepath.Join(PinParent, id))
		_ = os.RemoveAll(filepath.Join(runParent, id))
	}
}
