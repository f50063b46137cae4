package tunnel

import (
	"errors"
	"net/netip"
	"testing"

	"kmesh.dev/kmesh/ambient/identity"
	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/bpf"
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

func routeFixture() *state.Store {
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
	s.Apply(state.Update{
		Workloads: []*state.Workload{echo, legacy, wp, behind},
		Services: []*state.Service{
			{Name: "echo", Namespace: "app", Hostname: "echo.app.svc.cluster.local",
				VIPs:  []state.NetworkAddr{{Addr: netip.MustParseAddr("10.96.0.10")}, {Addr: netip.MustParseAddr("fd00:10:96::10")}},
				Ports: []state.Port{{ServicePort: 80, TargetPort: 8080}}},
			{Name: "legacy", Namespace: "app", Hostname: "legacy.app.svc.cluster.local",
				VIPs: []state.NetworkAddr{{Addr: netip.MustParseAddr("10.96.0.11")}}, Ports: []state.Port{{ServicePort: 80, TargetPort: 9090}}},
			{Name: "waypoint", Namespace: "app", Hostname: "waypoint.app.svc.cluster.local",
				VIPs: []state.NetworkAddr{wpAddr}, Ports: []state.Port{{ServicePort: 15008, TargetPort: 15008}}},
			{Name: "guarded", Namespace: "app", Hostname: "guarded.app.svc.cluster.local",
				VIPs: []state.NetworkAddr{{Addr: netip.MustParseAddr("10.96.0.12")}}, Ports: []state.Port{{ServicePort: 80, TargetPort: 8080}},
				Waypoint: &state.GatewayAddress{Hostname: "app/waypoint.app.svc.cluster.local", HBONEMTLSPort: 15008}},
		},
	})
	return s
}

func TestResolve(t *testing.T) {
	dir := routeFixture()
	echoID := identity.Identity{TrustDomain: "cluster.local", Namespace: "app", ServiceAccount: "echo"}
	wpID := identity.Identity{TrustDomain: "cluster.local", Namespace: "app", ServiceAccount: "waypoint"}
	for _, tc := range []struct {
		name string
		orig bpf.TunnelOrig
		want Route
		err  bool
	}{
		{name: "kernel chose an HBONE backend of a service",
			orig: bpf.TunnelOrig{Dst: ap("10.96.0.10:80"), Backend: ap("10.244.2.5:8080")},
			want: Route{Dial: ap("10.244.2.5:15008"), Target: ap("10.244.2.5:8080"), Identity: echoID}},
		{name: "workload addressed directly over IPv6",
			orig: bpf.TunnelOrig{Dst: ap("[fd00:10:244:2::5]:8080"), Backend: ap("[fd00:10:244:2::5]:8080")},
			want: Route{Dial: ap("[fd00:10:244:2::5]:15008"), Target: ap("[fd00:10:244:2::5]:8080"), Identity: echoID}},
		{name: "iptables redirect of a VIP: balanced here, target port mapped",
			orig: bpf.TunnelOrig{Dst: ap("10.96.0.10:80")},
			want: Route{Dial: ap("10.244.2.5:15008"), Target: ap("10.244.2.5:8080"), Identity: echoID}},
		{name: "iptables redirect of a VIP, IPv6 family kept",
			orig: bpf.TunnelOrig{Dst: ap("[fd00:10:96::10]:80")},
			want: Route{Dial: ap("[fd00:10:244:2::5]:15008"), Target: ap("[fd00:10:244:2::5]:8080"), Identity: echoID}},
		{name: "destination outside the mesh: plain",
			orig: bpf.TunnelOrig{Dst: ap("10.96.0.11:80")},
			want: Route{Plain: true, Dial: ap("10.244.2.6:9090"), Target: ap("10.244.2.6:9090")}},
		{name: "unknown destination: plain passthrough",
			orig: bpf.TunnelOrig{Dst: ap("192.0.2.1:443")},
			want: Route{Plain: true, Dial: ap("192.0.2.1:443"), Target: ap("192.0.2.1:443")}},
		{name: "service behind a waypoint (by hostname): CONNECT to the VIP via the waypoint",
			orig: bpf.TunnelOrig{Dst: ap("10.96.0.12:80"), Waypoint: true},
			want: Route{Dial: ap("10.244.3.7:15008"), Target: ap("10.96.0.12:80"), Identity: wpID, Waypoint: true}},
		{name: "workload behind a waypoint (by VIP)",
			orig: bpf.TunnelOrig{Dst: ap("10.244.2.8:8080"), Waypoint: true},
			want: Route{Dial: ap("10.244.3.7:15008"), Target: ap("10.244.2.8:8080"), Identity: wpID, Waypoint: true}},
		{name: "waypoint flag but the waypoint is gone", orig: bpf.TunnelOrig{Dst: ap("10.96.0.10:80"), Waypoint: true}, err: true},
		{name: "service port unknown", orig: bpf.TunnelOrig{Dst: ap("10.96.0.10:81")}, err: true},
		{name: "waypoint has no IPv6 address", orig: bpf.TunnelOrig{Dst: ap("[fd00:10:96::10]:80"), Waypoint: true}, err: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Resolve(dir, "", tc.orig)
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
}

func TestResolveSkipsUnhealthyAndDrained(t *testing.T) {
	dir := routeFixture()
	a := workload("a", "app", "echo", true, "10.244.2.20")
	a.Healthy = false
	b := workload("b", "app", "echo", true, "10.244.2.21")
	b.Capacity = 0
	c := workload("c", "app", "echo", true, "10.244.2.22")
	for _, w := range []*state.Workload{a, b, c} {
		w.Services = []state.ServicePorts{{Service: "app/pool.app.svc.cluster.local"}}
	}
	dir.Apply(state.Update{Workloads: []*state.Workload{a, b, c}, Services: []*state.Service{{Name: "pool", Namespace: "app",
		Hostname: "pool.app.svc.cluster.local", VIPs: []state.NetworkAddr{{Addr: netip.MustParseAddr("10.96.0.20")}},
		Ports: []state.Port{{ServicePort: 80, TargetPort: 8080}}}}})
	for range 50 {
		r, err := Resolve(dir, "", bpf.TunnelOrig{Dst: ap("10.96.0.20:80")})
		if err != nil || r.Target != ap("10.244.2.22:8080") {
			t.Fatalf("got %+v, %v; want only the healthy, undrained endpoint", r, err)
		}
	}
}
