package agent

import (
	"bufio"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"

	"kmesh.dev/kmesh/kernel"
)

// DefaultGCPercent is the daemon's GOGC unless the environment sets one.
// The daemon holds the whole mesh and, once synced, allocates little: a
// collection when the heap has grown by half (Go's default waits for it
// to double) keeps its footprint near what it holds, for a few percent
// more CPU during the initial sync (see docs/benchmarks/sync.md).
const DefaultGCPercent = 50

// memoryLimitShare is the part of the cgroup's memory limit given to Go
// as its soft limit: the rest is for what the runtime does not count
// (binary text, BPF map memory is the kernel's anyway) and for slack.
const memoryLimitShare = 0.9

// SetMemoryPolicy tunes the garbage collector for the daemon, leaving
// alone what the standard variables set: without GOGC, DefaultGCPercent;
// without GOMEMLIMIT, a soft limit at 90% of the memory limit of the
// daemon's cgroup, when it has one (the collector then works harder
// before the kernel would kill the pod).
func SetMemoryPolicy(getenv func(string) string, log *slog.Logger) {
	if getenv("GOGC") == "" {
		debug.SetGCPercent(DefaultGCPercent)
	}
	if getenv("GOMEMLIMIT") != "" {
		return
	}
	limit, err := cgroupMemoryLimit()
	if err != nil {
		log.Debug("no cgroup memory limit for the Go soft limit", "err", err)
		return
	}
	if limit > 0 {
		soft := int64(float64(limit) * memoryLimitShare)
		debug.SetMemoryLimit(soft)
		log.Info("Go soft memory limit from the cgroup's", "cgroup_limit_bytes", limit, "soft_limit_bytes", soft)
	}
}

// cgroupMemoryLimit returns memory.max of the process's cgroup (v2), 0 when
// unlimited.
func cgroupMemoryLimit() (int64, error) {
	root, err := kernel.Cgroup2Root()
	if err != nil {
		return 0, err
	}
	rel, err := ownCgroup()
	if err != nil {
		return 0, err
	}
	b, err := os.ReadFile(filepath.Join(root, rel, "memory.max"))
	if err != nil {
		return 0, err
	}
	return parseMemoryMax(string(b))
}

// ownCgroup returns the process's cgroup v2 path ("0::/path" in
// /proc/self/cgroup).
func ownCgroup() (string, error) {
	f, err := os.Open("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if p, ok := strings.CutPrefix(s.Text(), "0::"); ok {
			return p, nil
		}
	}
	return "", fmt.Errorf("no cgroup v2 entry in /proc/self/cgroup")
}

func parseMemoryMax(s string) (int64, error) {
	s = strings.TrimSpace(s)
	if s == "max" {
		return 0, nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("memory.max %q", s)
	}
	return n, nil
}
