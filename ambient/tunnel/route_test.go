package tunnel

import (
	"errors"
	"net/netip"
	"testing"

	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/ambient/identity"
	"kmesh.dev/kmesh/ambient/reconcile"
	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/bpf/bpftest"
)

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func workload(uid, ns, sa string, hbone bool, addrs ...string) *state.Workload {
	w := &state.Workload{UID: uid, Name: uid, HBONE: hbone, Healthy: true, Capacity: 1}
	for _, a := range addrs {
		w.Addresses = append(w.Addresses, netip.MustParseAddr(a))
	}
	w.SetMeta(state.WorkloadMeta{Namespace: ns, ServiceAccount: sa, TrustDomain: "cluster.local", WorkloadName: uid})
	return w
}

// routeFixture is a store and the dataplane reconciled from it onto
// in-memory maps: the records the kernel would hold, which ResolveCaptured
// decides from.
func routeFixture(t testing.TB) (*state.Store, *dataplane.Dataplane) {
	s := state.NewStore()
	wpAddr := state.NetworkAddr{Addr: netip.MustParseAddr("10.96.0.99")}
	echo := workload("echo", "app", "echo", true, "10.244.2.5", "fd00:10:244:2::5")
	echo.Services = []state.ServicePorts{{Service: "app/echo.app.svc.cluster.local", Ports: []state.Port{{ServicePort: 80, TargetPort: 8080}}}}
	legacy := workload("legacy", "app", "legacy", false, "10.244.2.6")
	legacy.Services = []state.ServicePorts{{Service: "app/legacy.app.svc.cluster.local"}}
	wp := workload("waypoint", "app", "waypoint", true, "10.244.3.7")
	wp.Services = []state.ServicePorts{{Service: "app/waypoint.app.svc.cluster.local"}}
	behind := workload("behind", "app", "behind", true, "10.244.2.8")
	behind.Waypoint = &state.GatewayAddress{Address: &wpAddr, HBONEMTLSPort: 15008}
	ch := s.Apply(state.Update{
		Workloads: []*state.Workload{echo, legacy, wp, behind},
		Services: []*state.Service{
			{Name: "echo", Namespace: "app", Hostname: "echo.app.svc.cluster.local",
				VIPs:  []state.NetworkAddr{{Addr: netip.MustParseAddr("10.96.0.10")}, {Addr: netip.MustParseAddr("fd00:10:96::10")}},
				Ports: []state.Port{{ServicePort: 80, TargetPort: 8080}}},
			{Name: "legacy", Namespace: "app", Hostname: "legacy.app.svc.cluster.local",
				VIPs: []state.NetworkAddr{{Addr: netip.MustParseAddr("10.96.0.11")}}, Ports: []state.Port{{ServicePort: 80, TargetPort: 9090}}},
			{Name: "waypoint", Namespace: "app", Hostname: "waypoint.app.svc.cluster.local",
				VIPs: []state.NetworkAddr{wpAddr}, Ports: []state.Port{{ServicePort: 15008, TargetPort: 15008}}},
			// A ServiceEntry: its addresses may be a real host's.
			{Name: "external", Namespace: "app", Hostname: "api.example.com",
				VIPs: []state.NetworkAddr{{Addr: netip.MustParseAddr("240.240.0.1")}}, Ports: []state.Port{{ServicePort: 443, TargetPort: 443}}},
			{Name: "guarded", Namespace: "app", Hostname: "guarded.app.svc.cluster.local",
				VIPs: []state.NetworkAddr{{Addr: netip.MustParseAddr("10.96.0.12")}}, Ports: []state.Port{{ServicePort: 80, TargetPort: 8080}},
				Waypoint: &state.GatewayAddress{Hostname: "app/waypoint.app.svc.cluster.local", HBONEMTLSPort: 15008}},
		},
	})
	dp := dataplane.New(bpftest.New(bpf.MapSizes{}), dataplane.Options{})
	rec := reconcile.New(s, dp, reconcile.Node{Name: "n1"}, nil)
	if errs := rec.Apply(ch); len(errs) > 0 {
		t.Fatal(errs)
	}
	return s, dp
}

// seq is a deterministic random source: 0, step, 2·step, ...
func seq(step uint32) func() uint32 {
	var n uint32
	return func() uint32 { n += step; return n - step }
}

func TestResolve(t *testing.T) {
	dir, dp := routeFixture(t)
	echoID := identity.Identity{TrustDomain: "cluster.local", Namespace: "app", ServiceAccount: "echo"}
	wpID := identity.Identity{TrustDomain: "cluster.local", Namespace: "app", ServiceAccount: "waypoint"}
	tunnel, waypoint := bpf.PathTunnel, bpf.PathWaypoint
	for _, tc := range []struct {
		name string
		// orig is the kernel's record; with captured, only orig.Dst is
		// known (iptables redirection) and the proxy decides.
		orig     bpf.TunnelOrig
		captured bool
		want     Route
		err      bool
	}{
		{name: "kernel chose an HBONE backend of a service",
			orig: bpf.TunnelOrig{Dst: ap("10.96.0.10:80"), Backend: ap("10.244.2.5:8080"), Path: tunnel},
			want: Route{Dial: ap("10.244.2.5:15008"), Target: ap("10.244.2.5:8080"), Identity: echoID}},
		{name: "workload addressed directly over IPv6",
			orig: bpf.TunnelOrig{Dst: ap("[fd00:10:244:2::5]:8080"), Backend: ap("[fd00:10:244:2::5]:8080"), Path: tunnel},
			want: Route{Dial: ap("[fd00:10:244:2::5]:15008"), Target: ap("[fd00:10:244:2::5]:8080"), Identity: echoID}},
		{name: "iptables redirect of a VIP: balanced here, target port mapped", captured: true,
			orig: bpf.TunnelOrig{Dst: ap("10.96.0.10:80")},
			want: Route{Dial: ap("10.244.2.5:15008"), Target: ap("10.244.2.5:8080"), Identity: echoID}},
		{name: "iptables redirect of a VIP, IPv6 family kept", captured: true,
			orig: bpf.TunnelOrig{Dst: ap("[fd00:10:96::10]:80")},
			want: Route{Dial: ap("[fd00:10:244:2::5]:15008"), Target: ap("[fd00:10:244:2::5]:8080"), Identity: echoID}},
		{name: "destination outside the mesh: plain", captured: true,
			orig: bpf.TunnelOrig{Dst: ap("10.96.0.11:80")},
			want: Route{Plain: true, Dial: ap("10.244.2.6:9090"), Target: ap("10.244.2.6:9090")}},
		{name: "unknown destination: plain passthrough", captured: true,
			orig: bpf.TunnelOrig{Dst: ap("192.0.2.1:443")},
			want: Route{Plain: true, Dial: ap("192.0.2.1:443"), Target: ap("192.0.2.1:443")}},
		{name: "service behind a waypoint (by hostname): CONNECT to the VIP via the waypoint",
			orig: bpf.TunnelOrig{Dst: ap("10.96.0.12:80"), Path: waypoint},
			want: Route{Dial: ap("10.244.3.7:15008"), Target: ap("10.96.0.12:80"), Identity: wpID, Waypoint: true}},
		{name: "iptables redirect of a service behind a waypoint", captured: true,
			orig: bpf.TunnelOrig{Dst: ap("10.96.0.12:80")},
			want: Route{Dial: ap("10.244.3.7:15008"), Target: ap("10.96.0.12:80"), Identity: wpID, Waypoint: true}},
		{name: "workload behind a waypoint (by VIP)",
			orig: bpf.TunnelOrig{Dst: ap("10.244.2.8:8080"), Path: waypoint},
			want: Route{Dial: ap("10.244.3.7:15008"), Target: ap("10.244.2.8:8080"), Identity: wpID, Waypoint: true}},
		{name: "waypoint verdict but the waypoint is gone", orig: bpf.TunnelOrig{Dst: ap("10.96.0.10:80"), Path: waypoint}, err: true},
		{name: "a Kubernetes Service's VIP on a port it lacks: refused, as the kernel does (kmesh_vip)", captured: true,
			orig: bpf.TunnelOrig{Dst: ap("10.96.0.10:81")}, err: true},
		{name: "a ServiceEntry's address on a port it does not name: left alone, as the kernel does", captured: true,
			orig: bpf.TunnelOrig{Dst: ap("240.240.0.1:8443")},
			want: Route{Plain: true, Dial: ap("240.240.0.1:8443"), Target: ap("240.240.0.1:8443")}},
		{name: "waypoint has no IPv6 address", orig: bpf.TunnelOrig{Dst: ap("[fd00:10:96::10]:80"), Path: waypoint}, err: true},
		// Fail closed: what the kernel sent for mTLS never leaves in plaintext.
		{name: "tunnel verdict, backend unknown here: refused",
			orig: bpf.TunnelOrig{Dst: ap("10.96.0.10:80"), Backend: ap("10.244.9.9:8080"), Path: tunnel}, err: true},
		{name: "tunnel verdict, backend outside the mesh: refused",
			orig: bpf.TunnelOrig{Dst: ap("10.96.0.11:80"), Backend: ap("10.244.2.6:9090"), Path: tunnel}, err: true},
		{name: "tunnel verdict without a backend: refused",
			orig: bpf.TunnelOrig{Dst: ap("10.96.0.10:80"), Path: tunnel}, err: true},
		{name: "a verdict the proxy does not carry: refused",
			orig: bpf.TunnelOrig{Dst: ap("10.244.2.5:8080"), Backend: ap("10.244.2.5:8080"), Path: bpf.PathDirect}, err: true},
		{name: "a record without a verdict: refused",
			orig: bpf.TunnelOrig{Dst: ap("10.244.2.5:8080"), Backend: ap("10.244.2.5:8080")}, err: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got Route
			var err error
			if tc.captured {
				got, err = ResolveCaptured(dir, dp, "", tc.orig.Dst, seq(1<<30))
			} else {
				got, err = Resolve(dir, "", tc.orig, seq(1<<30))
			}
			if tc.err {
				if !errors.Is(err, ErrNoRoute) {
					t.Fatalf("want ErrNoRoute, got %v (%+v)", err, got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Plain != tc.want.Plain || got.Dial != tc.want.Dial || got.Target != tc.want.Target ||
				got.Identity != tc.want.Identity || got.Waypoint != tc.want.Waypoint {
				t.Fatalf("got %+v\nwant %+v", got, tc.want)
			}
		})
	}
	if _, err := ResolveCaptured(dir, nil, "", ap("10.96.0.10:80"), seq(1)); !errors.Is(err, ErrNoRoute) {
		t.Errorf("no view of the kernel's records: want ErrNoRoute, got %v", err)
	}
}

func TestResolveSkipsUnhealthyAndDrained(t *testing.T) {
	dir, dp := routeFixture(t)
	a := workload("a", "app", "echo", true, "10.244.2.20")
	a.Healthy = false
	b := workload("b", "app", "echo", true, "10.244.2.21")
	b.Capacity = 0
	c := workload("c", "app", "echo", true, "10.244.2.22")
	for _, w := range []*state.Workload{a, b, c} {
		w.Services = []state.ServicePorts{{Service: "app/pool.app.svc.cluster.local"}}
	}
	ch := dir.Apply(state.Update{Workloads: []*state.Workload{a, b, c}, Services: []*state.Service{{Name: "pool", Namespace: "app",
		Hostname: "pool.app.svc.cluster.local", VIPs: []state.NetworkAddr{{Addr: netip.MustParseAddr("10.96.0.20")}},
		Ports: []state.Port{{ServicePort: 80, TargetPort: 8080}}}}})
	if errs := reconcile.New(dir, dp, reconcile.Node{Name: "n1"}, nil).Apply(ch); len(errs) > 0 {
		t.Fatal(errs)
	}
	rnd := seq(0x0123_4567)
	for range 50 {
		r, err := ResolveCaptured(dir, dp, "", ap("10.96.0.20:80"), rnd)
		if err != nil || r.Target != ap("10.244.2.22:8080") {
			t.Fatalf("got %+v, %v; want only the healthy, undrained endpoint", r, err)
		}
	}
}

// Captured connections are balanced by the kernel's tables: capacity
// weights, exactly, for a uniform sweep of the random numbers.
func TestResolveCapturedWeights(t *testing.T) {
	dir, dp := routeFixture(t)
	light := workload("light", "app", "echo", true, "10.244.2.30")
	heavy := workload("heavy", "app", "echo", true, "10.244.2.31")
	heavy.Capacity = 3
	for _, w := range []*state.Workload{light, heavy} {
		w.Services = []state.ServicePorts{{Service: "app/weighted.app.svc.cluster.local"}}
	}
	ch := dir.Apply(state.Update{Workloads: []*state.Workload{light, heavy}, Services: []*state.Service{{Name: "weighted", Namespace: "app",
		Hostname: "weighted.app.svc.cluster.local", VIPs: []state.NetworkAddr{{Addr: netip.MustParseAddr("10.96.0.30")}},
		Ports: []state.Port{{ServicePort: 80, TargetPort: 8080}}}}})
	if errs := reconcile.New(dir, dp, reconcile.Node{Name: "n1"}, nil).Apply(ch); len(errs) > 0 {
		t.Fatal(errs)
	}
	got := map[netip.AddrPort]int{}
	const n = 1 << 10
	for i := range n {
		// slot sweeps [0, 2^32) once; coin sweeps it 32 times, interleaved.
		vals := []uint32{uint32(i) << 22, uint32(i*32) << 22}
		r, err := ResolveCaptured(dir, dp, "", ap("10.96.0.30:80"), func() uint32 { v := vals[0]; vals = vals[1:]; return v })
		if err != nil {
			t.Fatal(err)
		}
		got[r.Target]++
	}
	if got[ap("10.244.2.30:8080")] != n/4 || got[ap("10.244.2.31:8080")] != 3*n/4 {
		t.Fatalf("shares %v, want 1:3 exactly", got)
	}
}
