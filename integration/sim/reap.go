package sim

import (
	"os"
	"path/filepath"
	"sort"
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
		// The external mode's netns pins and their shared directory are
		// mounts: detached first, or the directory stays and the pinned
		// namespaces with it.
		detachMountsUnder(filepath.Join(runParent, id))
		_ = os.RemoveAll(filepath.Join(runParent, id))
	}
}

// detachMountsUnder lazily unmounts every mount at or below dir, deepest
// first.
func detachMountsUnder(dir string) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var points []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMount(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			points = append(points, mp)
		}
	}
	sort.Slice(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
	for _, mp := range points {
		_ = syscall.Unmount(mp, syscall.MNT_DETACH)
	}
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, "\\") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
