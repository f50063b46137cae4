package main

import (
	"os"
	"strings"
	"syscall"
)

// sysmonSchedtrace keeps the Go runtime's monitor thread (sysmon) from
// parking: with any schedtrace period set it never enters its deep sleep,
// and polls every 10 ms once idle; the period is the largest the runtime
// takes (int32 milliseconds, ~24.8 days), so the trace line it exists for is
// printed that seldom (and, with the scheduler's state, on a fatal panic).
//
// Why (issue 17, docs/benchmarks/hbone-profile.md): a parked sysmon is woken
// by the first system call after every idle moment (futex), then polls
// every 20 µs until the process is idle again. A tunnel serving requests
// one at a time is idle between every two, so each request paid those
// wake-ups: ~2.3 nanosleeps and part of ~3 futex calls per request, on a
// paravirtualised guest where every switch is expensive. Measured A/B, same
// binary, same run (docs/benchmarks/hbone-sysmon.md): the tunnel's added
// p50 falls to 0.53× (sockperf) and 0.78–0.92× (fortio; at one connection
// the intervals include no change) of what it was, its added CPU to
// 0.54–0.91×.
const sysmonSchedtrace = "schedtrace=2147483647"

// sysmonGODEBUG is the GODEBUG the daemon must run with, and whether the
// current one lacks it: the operator's own schedtrace setting, or
// KMESH_SYSMON_PARK=true, keeps the runtime's default. Pure.
func sysmonGODEBUG(godebug, park string) (string, bool) {
	if park == "true" {
		return godebug, false
	}
	for _, kv := range strings.Split(godebug, ",") {
		if strings.HasPrefix(strings.TrimSpace(kv), "schedtrace=") {
			return godebug, false
		}
	}
	if godebug == "" {
		return sysmonSchedtrace, true
	}
	return godebug + "," + sysmonSchedtrace, true
}

// reexecForSysmon re-executes the daemon with sysmonGODEBUG's setting when
// it is missing: the runtime reads GODEBUG's schedtrace once, at start, and
// has no API for it. Same process (execve keeps the PID, the open
// descriptors and the cgroup), before anything else ran. If the exec fails
// the daemon goes on with the runtime's default.
func reexecForSysmon() error {
	env, need := sysmonGODEBUG(os.Getenv("GODEBUG"), os.Getenv("KMESH_SYSMON_PARK"))
	if !need {
		return nil
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	environ := []string{"GODEBUG=" + env}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "GODEBUG=") {
			environ = append(environ, kv)
		}
	}
	return syscall.Exec(exe, os.Args, environ)
}
