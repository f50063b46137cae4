package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Where CPU goes, measured precisely: /proc/stat is tick-sampled on this
// kernel and under-counts short bursts, so tasks are accounted from their
// schedstat (nanoseconds on CPU, every thread), softirq from /proc/stat as
// a cross-check, and BPF program time from the kernel's bpf_stats.

// TaskCPU returns the nanoseconds all threads of pid spent on a CPU.
func TaskCPU(pid int) (uint64, error) {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	if err != nil || len(tasks) == 0 {
		return 0, fmt.Errorf("no tasks for pid %d", pid)
	}
	var sum uint64
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue // a thread that just exited
		}
		f := strings.Fields(string(b))
		if len(f) > 0 {
			v, _ := strconv.ParseUint(f[0], 10, 64)
			sum += v
		}
	}
	return sum, nil
}

// SystemCPU is /proc/stat's aggregate line, in clock ticks.
type SystemCPU struct {
	Busy, Softirq, Total uint64
}

// ReadSystemCPU reads the aggregate CPU line of /proc/stat.
func ReadSystemCPU() (SystemCPU, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return SystemCPU{}, err
	}
	line := strings.SplitN(string(b), "\n", 2)[0]
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return SystemCPU{}, fmt.Errorf("unexpected /proc/stat: %q", line)
	}
	var v [10]uint64
	for i := 1; i < len(f) && i <= 10; i++ {
		v[i-1], _ = strconv.ParseUint(f[i], 10, 64)
	}
	// user nice system idle iowait irq softirq steal guest guest_nice
	var s SystemCPU
	for i, x := range v[:8] {
		s.Total += x
		if i != 3 && i != 4 {
			s.Busy += x
		}
	}
	s.Softirq = v[6]
	return s, nil
}

// TicksToMs converts clock ticks (USER_HZ, 100 on Linux) to milliseconds.
func TicksToMs(t uint64) float64 { return float64(t) * 10 }
