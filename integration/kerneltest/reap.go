package kerneltest

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/kernel"
)

// A test binary killed before its cleanups ran (a timeout, SIGKILL) leaves
// its programs attached to its cgroup and its maps pinned. Each test's id
// starts with its process id; the first New of a later process removes what
// dead processes left. Ids without a pid (older runs) are removed once
// older than an hour, longer than any test runs.

var reapOnce sync.Once

// newID names a test's cgroup (kmesh-test-<id>) and pin root (<id>).
func newID() string { return strconv.Itoa(os.Getpid()) + "-" + podnet.RandomSuffix() }

// ownerAlive says whether the run that made id may still be running.
func ownerAlive(id string, made time.Time) bool {
	pidText, _, ok := strings.Cut(id, "-")
	pid, err := strconv.Atoi(pidText)
	if !ok || err != nil {
		return time.Since(made) < time.Hour
	}
	return pid == os.Getpid() || syscall.Kill(pid, 0) == nil
}

// reapStale removes the cgroups and pins of test processes that are gone.
func reapStale() {
	root, err := kernel.Cgroup2Root()
	if err != nil {
		return
	}
	ids := map[string]time.Time{}
	if m, _ := filepath.Glob(filepath.Join(root, "kmesh-test-*")); m != nil {
		for _, p := range m {
			if st, err := os.Stat(p); err == nil {
				ids[strings.TrimPrefix(filepath.Base(p), "kmesh-test-")] = st.ModTime()
			}
		}
	}
	if entries, err := os.ReadDir(TestPinRoot); err == nil {
		for _, e := range entries {
			if info, err := e.Info(); err == nil {
				if _, seen := ids[e.Name()]; !seen {
					ids[e.Name()] = info.ModTime()
				}
			}
		}
	}
	for id, made := range ids {
		if ownerAlive(id, made) {
			continue
		}
		// Pins first: unpinning the links detaches the programs.
		_ = bpf.RemovePins(filepath.Join(TestPinRoot, id))
		_ = os.Remove(filepath.Join(TestPinRoot, id))
		_ = (&podnet.Cgroup{Path: filepath.Join(root, "kmesh-test-"+id)}).Remove()
	}
}
