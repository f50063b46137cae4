package dataplane_test

import (
	"errors"
	"maps"
	"net/netip"
	"syscall"
	"testing"

	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/bpf/bpftest"
)

func virtual(s dataplane.Service) dataplane.Service { s.Virtual = true; return s }

func vipsOf(t *testing.T, m *bpftest.Maps) map[string]uint32 {
	t.Helper()
	v, err := m.VIPs()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]uint32{}
	for a, n := range v {
		out[a.String()] = n
	}
	return out
}

// TestVIPs: kmesh_vip holds exactly the virtual services' VIPs with how many
// services claim each, through adds, shared VIPs, deletes and a restart;
// Pick refuses such a VIP on a port its service lacks.
func TestVIPs(t *testing.T) {
	m := bpftest.New(bpf.MapSizes{})
	dp := dataplane.New(m, dataplane.Options{Node: unitNode, Logger: quiet})
	a := virtual(usvc("ns/a", []string{"10.96.0.1", "fd00:96::1"}, "w"))
	b := virtual(usvc("ns/b", []string{"10.96.0.1"}, "w")) // shares a's v4 VIP
	se := usvc("ns/se.example.com", []string{"192.0.2.10"}, "w")
	if errs := dp.Apply(dataplane.Batch{Workloads: []dataplane.Workload{uwl("w", true, "n1", "10.0.1.1")},
		Services: []dataplane.Service{a, b, se}}); len(errs) > 0 {
		t.Fatal(errs)
	}
	if got, want := vipsOf(t, m), map[string]uint32{"10.96.0.1": 2, "fd00:96::1": 1}; !maps.Equal(got, want) {
		t.Fatalf("kmesh_vip %v, want %v (a ServiceEntry's address is never listed)", got, want)
	}
	for _, tc := range []struct {
		dst  string
		err  syscall.Errno
		path bpf.Path
	}{
		{"10.96.0.1:80", 0, bpf.PathDirect},
		{"10.96.0.1:81", syscall.ECONNREFUSED, bpf.PathRefuse},
		{"[fd00:96::1]:22", syscall.ECONNREFUSED, bpf.PathRefuse},
		{"192.0.2.10:22", 0, bpf.PathPlain}, // a real host's other port
	} {
		if d := dp.Pick(netip.MustParseAddrPort(tc.dst), bpf.TCP, 0, 0); d.Err != tc.err || d.Path != tc.path {
			t.Errorf("Pick(%s) = %v %s, want %v %s", tc.dst, d.Err, d.Path, tc.err, tc.path)
		}
	}

	if errs := dp.Apply(dataplane.Batch{DeleteServices: []string{"ns/a"}}); len(errs) > 0 {
		t.Fatal(errs)
	}
	if got, want := vipsOf(t, m), map[string]uint32{"10.96.0.1": 1}; !maps.Equal(got, want) {
		t.Fatalf("after a went: %v, want %v", got, want)
	}

	// A restarted daemon finds its predecessor's entries: one still
	// claimed, one stale (its service went while no daemon ran).
	if err := m.PutVIPs(map[netip.Addr]uint32{netip.MustParseAddr("10.96.9.9"): 1}); err != nil {
		t.Fatal(err)
	}
	dp2 := dataplane.New(m, dataplane.Options{Node: unitNode, Logger: quiet})
	if errs := dp2.Apply(dataplane.Batch{Workloads: []dataplane.Workload{uwl("w", true, "n1", "10.0.1.1")},
		Services: []dataplane.Service{b}}); len(errs) > 0 {
		t.Fatal(errs)
	}
	if got, want := vipsOf(t, m), map[string]uint32{"10.96.0.1": 1}; !maps.Equal(got, want) {
		t.Fatalf("after a restart: %v, want %v", got, want)
	}

	// A write the kernel refuses is an error in the stats and is tried
	// again by the next batch, which then converges.
	m.Fault = func(op bpftest.Op) error {
		if op.Map == bpftest.VIP && op.Kind == "put" {
			return errors.New("map full")
		}
		return nil
	}
	c := virtual(usvc("ns/c", []string{"10.96.0.3"}, "w"))
	before := dp2.Stats.Errors.Load()
	_ = dp2.Apply(dataplane.Batch{Services: []dataplane.Service{c}})
	if dp2.Stats.Errors.Load() == before {
		t.Error("a refused kmesh_vip write was not counted as an error")
	}
	m.Fault = nil
	d := virtual(usvc("ns/d", []string{"10.96.0.4"}, "w"))
	if errs := dp2.Apply(dataplane.Batch{Services: []dataplane.Service{d}}); len(errs) > 0 {
		t.Fatal(errs)
	}
	if got, want := vipsOf(t, m), map[string]uint32{"10.96.0.1": 1, "10.96.0.3": 1, "10.96.0.4": 1}; !maps.Equal(got, want) {
		t.Fatalf("after the fault cleared: %v, want %v", got, want)
	}
}
