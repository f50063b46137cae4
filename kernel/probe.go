// Package kernel decides what the running kernel can do by probing it, never
// by reading its version: distributions backport features and disable others,
// so uname says little. It also finds the cgroup v2 hierarchy and the BPF
// filesystem the data path attaches and pins to.
package kernel

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
)

// Feature is one probed kernel capability.
type Feature struct {
	Name string
	// Required features gate the daemon: without them it refuses to start.
	Required bool
	// Need says what Kmesh uses the feature for, for error messages.
	Need string
	// Err is nil when the kernel has the feature.
	Err error
}

// Available reports whether the kernel has the feature.
func (f Feature) Available() bool { return f.Err == nil }

type probe struct {
	name     string
	required bool
	need     string
	run      func() error
}

func helper(pt ebpf.ProgramType, fn asm.BuiltinFunc) func() error {
	return func() error { return features.HaveProgramHelper(pt, fn) }
}

func progType(pt ebpf.ProgramType) func() error {
	return func() error { return features.HaveProgramType(pt) }
}

func mapType(mt ebpf.MapType) func() error {
	return func() error { return features.HaveMapType(mt) }
}

var probes = []probe{
	{"prog:cgroup_sock_addr", true, "connect-time service load balancing", progType(ebpf.CGroupSockAddr)},
	{"map:hash", true, "frontend/service/endpoint/backend maps", mapType(ebpf.Hash)},
	{"map:lru_hash", true, "the tunnel's record of redirected connections", mapType(ebpf.LRUHash)},
	{"map:percpu_array", true, "data path counters", mapType(ebpf.PerCPUArray)},
	{"map:sk_storage", true, "original destination per socket (getpeername)", mapType(ebpf.SkStorage)},
	{"map_flag:no_prealloc", true, "RCU-safe replacement of map values", func() error { return features.HaveMapFlag(features.BPF_F_NO_PREALLOC) }},
	{"isa:v3", true, "programs are compiled for the v3 instruction set", features.HaveV3ISA},
	{"helper:get_netns_cookie", true, "acting only on enrolled pods", helper(ebpf.CGroupSockAddr, asm.FnGetNetnsCookie)},
	{"helper:get_socket_cookie", true, "per-socket UDP affinity", helper(ebpf.CGroupSockAddr, asm.FnGetSocketCookie)},
	{"helper:sk_storage_get", true, "original destination per socket", helper(ebpf.CGroupSockAddr, asm.FnSkStorageGet)},
	{"helper:set_retval", true, "refusing a VIP with no endpoint with ECONNREFUSED", helper(ebpf.CGroupSockAddr, asm.FnSetRetval)},
	{"helper:get_prandom_u32", true, "random endpoint choice", helper(ebpf.CGroupSockAddr, asm.FnGetPrandomU32)},
	{"map_batch_ops", true, "batched map updates", probeBatchOps},
	{"prog:sock_ops", true, "handing the tunnel the original destination of redirected connections", progType(ebpf.SockOps)},
	{"prog:sk_lookup", true, "inbound enforcement (plaintext to a pod with policies goes to its 15006)", progType(ebpf.SkLookup)},
	{"map:sockhash", true, "inbound enforcement (the pods' 15006 listeners)", mapType(ebpf.SockHash)},
	{"helper:sk_assign", true, "inbound enforcement (steering to a listener)", helper(ebpf.SkLookup, asm.FnSkAssign)},
	// Optional: later data paths use these; their absence only disables them.
	{"prog:sk_msg", false, "sockmap splicing of node-local connections", progType(ebpf.SkMsg)},
	{"map:ringbuf", false, "connection events for telemetry", mapType(ebpf.RingBuf)},
}

// Probe runs every probe against the running kernel.
func Probe() []Feature {
	out := make([]Feature, 0, len(probes))
	for _, p := range probes {
		err := p.run()
		// ErrNotSupported is the "no" answer; any other error means the probe
		// itself could not run (no privileges, seccomp), which is just as fatal.
		out = append(out, Feature{Name: p.name, Required: p.required, Need: p.need, Err: err})
	}
	return out
}

// MissingError names every required feature the kernel lacks.
type MissingError struct {
	Missing []Feature
}

func (e *MissingError) Error() string {
	var b strings.Builder
	b.WriteString("the kernel lacks features Kmesh requires:")
	for _, f := range e.Missing {
		fmt.Fprintf(&b, "\n  - %s (needed for %s): %v", f.Name, f.Need, f.Err)
	}
	if anyPermission(e.Missing) {
		b.WriteString("\nprobes failed with a permission error: run as root or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN")
	}
	return b.String()
}

func anyPermission(fs []Feature) bool {
	for _, f := range fs {
		if f.Err != nil && (errors.Is(f.Err, os.ErrPermission) || strings.Contains(f.Err.Error(), "operation not permitted")) {
			return true
		}
	}
	return false
}

// Check returns a *MissingError if a required feature is unavailable.
func Check(fs []Feature) error {
	var missing []Feature
	for _, f := range fs {
		if f.Required && !f.Available() {
			missing = append(missing, f)
		}
	}
	if len(missing) > 0 {
		return &MissingError{Missing: missing}
	}
	return nil
}

func probeBatchOps() error {
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 4, MaxEntries: 2})
	if err != nil {
		return err
	}
	defer m.Close()
	if _, err := m.BatchUpdate([]uint32{1}, []uint32{1}, nil); err != nil {
		if errors.Is(err, ebpf.ErrNotSupported) {
			return fmt.Errorf("%w: map batch operations", ebpf.ErrNotSupported)
		}
		return err
	}
	return nil
}
