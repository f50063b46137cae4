package dataplane_test

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"syscall"
	"testing"

	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/bpf/decidetest"
	"kmesh.dev/kmesh/integration/kerneltest"
)

// decideEnv is the kernel's connect decision (kmesh_decide.h, run through
// BPF_PROG_RUN on the product's maps) next to user space's Pick over the
// same records.
type decideEnv struct {
	maps *bpf.Maps
	dp   *dataplane.Dataplane
	dec  *decidetest.Decider
}

func newDecideEnv(t *testing.T, node dataplane.Topology) *decideEnv {
	env := kerneltest.New(t, bpf.Config{})
	dec, err := decidetest.Load(env.DP)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dec.Close() })
	return &decideEnv{maps: env.DP.Maps, dp: dataplane.New(env.DP.Maps, dataplane.Options{Node: node}), dec: dec}
}

// both runs the kernel's decision and Pick, fails the test when they
// disagree, and returns the kernel's.
func (e *decideEnv) both(t *testing.T, dst netip.AddrPort, proto bpf.Proto, slot, coin uint32) decidetest.Decision {
	t.Helper()
	k, err := e.dec.Decide(dst, proto, slot, coin)
	if err != nil {
		t.Fatal(err)
	}
	u := e.dp.Pick(dst, proto, slot, coin)
	if k.Err != u.Err || k.Path != u.Path || k.To != u.To || k.Rewritten != u.Rewritten || k.Backend != u.Backend {
		t.Fatalf("%s/%s slot=%#x coin=%#x: kernel %+v, user space %+v", dst, proto, slot, coin, k, u)
	}
	return k
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestPrivilegedDecideTable is the connect decision, Katran-style: chosen
// records, chosen random numbers, the exact answer expected from the
// kernel — and from Pick, which must agree.
func TestPrivilegedDecideTable(t *testing.T) {
	here := dataplane.Topology{Node: "n1", Network: "net1", Locality: dataplane.Locality{Region: "r1", Zone: "z1"}}
	far := dataplane.Topology{Node: "n2", Network: "net1", Locality: dataplane.Locality{Region: "r1", Zone: "z2"}}
	e := newDecideEnv(t, here)
	a := netip.MustParseAddr
	wl := func(uid string, hbone bool, topo dataplane.Topology, capacity uint32, addrs ...string) dataplane.Workload {
		w := dataplane.Workload{UID: uid, Capacity: capacity, Healthy: true, HBONE: hbone, Topology: topo}
		for _, s := range addrs {
			w.Addrs = append(w.Addrs, a(s))
		}
		return w
	}
	local := wl("local", true, here, 1, "10.244.1.10", "fd00::10")
	remote := wl("remote", true, far, 1, "10.244.2.20", "fd00::20")
	plain := wl("plain", false, far, 1, "10.244.2.30")
	guarded := wl("guarded", true, here, 1, "10.244.1.40")
	guarded.Policies = true
	behind := wl("behind", true, far, 1, "10.244.2.50")
	behind.Waypoint = true
	abroad := wl("abroad", true, dataplane.Topology{Node: "n9", Network: "net2"}, 1, "10.99.0.1")
	noaddr := wl("noaddr", true, far, 1)
	heavy := wl("heavy", true, here, 3, "10.244.1.60")
	light := wl("light", true, here, 1, "10.244.1.61")
	errs := e.dp.Apply(dataplane.Batch{Workloads: []dataplane.Workload{local, remote, plain, guarded, behind, abroad, noaddr, heavy, light}})
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	svc := func(key, vip string, ports []dataplane.Port, eps ...string) dataplane.Service {
		s := dataplane.Service{Key: key, VIPs: []netip.Addr{a(vip)}, Ports: ports}
		for _, ep := range eps {
			s.Endpoints = append(s.Endpoints, dataplane.Endpoint{WorkloadUID: ep})
		}
		return s
	}
	p80 := []dataplane.Port{{ServicePort: 80, TargetPort: 8080}}
	weighted := svc("ns/weighted", "10.96.0.1", p80, "heavy", "light")
	mixed := svc("ns/mixed", "10.96.0.2", p80, "remote", "plain")
	mixed.Endpoints[1].Ports = []dataplane.Port{{ServicePort: 80, TargetPort: 9090}} // plain serves 80 on 9090
	failover := svc("ns/failover", "10.96.0.3", p80, "remote", "local")
	failover.LB = dataplane.LoadBalancing{Mode: bpf.LBFailover, RoutingPreference: []dataplane.Scope{dataplane.ScopeNode}}
	wp := svc("ns/wp", "10.96.0.4", p80, "local")
	wp.Waypoint = true
	pass := svc("ns/pass", "10.96.0.5", p80)
	pass.LB.Mode = bpf.LBPassthrough
	empty := svc("ns/empty", "10.96.0.6", p80, "noaddr") // its only endpoint has no address
	across := svc("ns/across", "10.96.0.10", p80, "abroad")
	dual := svc("ns/dual", "10.96.0.7", p80, "local")
	dual.VIPs = append(dual.VIPs, a("fd00:96::7"))
	v4only := svc("ns/v4only", "fd00:96::8", p80, "plain")
	viaBehind := svc("ns/behind", "10.96.0.9", p80, "behind")
	virt := svc("ns/virt", "10.96.0.11", p80, "local") // a Kubernetes Service: its VIP is nothing else
	virt.Virtual = true
	virt.VIPs = append(virt.VIPs, a("fd00:96::11"))
	for _, s := range []dataplane.Service{weighted, mixed, failover, wp, pass, empty, across, dual, v4only, viaBehind, virt} {
		must(t, e.dp.SetService(s))
	}
	ap := func(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }
	const tcp, udp = bpf.TCP, bpf.UDP
	const half, full = 1 << 31, ^uint32(0)
	for _, tc := range []struct {
		name       string
		dst        string
		proto      bpf.Proto
		slot, coin uint32
		err        syscall.Errno
		path       bpf.Path
		to         string // "" = the destination itself, not rewritten
	}{
		// frontend lookup
		{name: "unknown address: left alone", dst: "192.0.2.1:80", proto: tcp, path: bpf.PathPlain},
		{name: "service port unknown: left alone", dst: "10.96.0.1:81", proto: tcp, path: bpf.PathPlain},
		{name: "virtual VIP, port unknown: refused", dst: "10.96.0.11:81", proto: tcp, err: syscall.ECONNREFUSED, path: bpf.PathRefuse},
		{name: "virtual VIP, port unknown, UDP: refused", dst: "10.96.0.11:53", proto: udp, err: syscall.ECONNREFUSED, path: bpf.PathRefuse},
		{name: "virtual IPv6 VIP, port unknown: refused", dst: "[fd00:96::11]:81", proto: tcp, err: syscall.ECONNREFUSED, path: bpf.PathRefuse},
		{name: "virtual VIP, its port: balanced", dst: "10.96.0.11:80", proto: tcp, path: bpf.PathDirect, to: "10.244.1.10:8080"},
		{name: "workload IP, any port", dst: "10.244.1.10:1234", proto: tcp, path: bpf.PathDirect},
		{name: "workload IPv6", dst: "[fd00::10]:1234", proto: tcp, path: bpf.PathDirect},
		// path verdicts by address
		{name: "remote mesh workload by IP: tunnel", dst: "10.244.2.20:8080", proto: tcp, path: bpf.PathTunnel},
		{name: "remote mesh workload, UDP: plain", dst: "10.244.2.20:53", proto: udp, path: bpf.PathPlain},
		{name: "workload outside the mesh: plain", dst: "10.244.2.30:80", proto: tcp, path: bpf.PathPlain},
		{name: "same node with policies: tunnel", dst: "10.244.1.40:80", proto: tcp, path: bpf.PathTunnel},
		{name: "same node with policies, UDP: direct", dst: "10.244.1.40:53", proto: udp, path: bpf.PathDirect},
		{name: "own waypoint by IP: waypoint", dst: "10.244.2.50:80", proto: tcp, path: bpf.PathWaypoint},
		{name: "own waypoint, UDP: plain", dst: "10.244.2.50:53", proto: udp, path: bpf.PathPlain},
		{name: "HBONE port of a remote workload: left alone", dst: "10.244.2.20:15008", proto: tcp, path: bpf.PathPlain},
		// service verdicts and the draw
		{name: "alias table, slot 0 coin 0: heavy", dst: "10.96.0.1:80", proto: tcp, slot: 0, coin: 0, path: bpf.PathDirect, to: "10.244.1.60:8080"},
		{name: "alias table, last slot, coin max", dst: "10.96.0.1:80", proto: tcp, slot: full, coin: full, path: bpf.PathDirect, to: "10.244.1.60:8080"},
		{name: "per-endpoint target port, plain backend", dst: "10.96.0.2:80", proto: tcp, slot: 0, coin: 0, path: bpf.PathPlain, to: "10.244.2.30:9090"},
		{name: "remote mesh backend: tunnel", dst: "10.96.0.2:80", proto: tcp, slot: full, coin: 0, path: bpf.PathTunnel, to: "10.244.2.20:8080"},
		{name: "a backend on another network: refused, never plaintext", dst: "10.96.0.10:80", proto: tcp, err: syscall.ECONNREFUSED, path: bpf.PathRefuse, to: "10.99.0.1:8080"},
		{name: "failover: the same node's rank wins", dst: "10.96.0.3:80", proto: tcp, slot: half, coin: half, path: bpf.PathDirect, to: "10.244.1.10:8080"},
		{name: "service waypoint: to the proxy, nothing chosen", dst: "10.96.0.4:80", proto: tcp, path: bpf.PathWaypoint},
		{name: "service waypoint, UDP: balanced", dst: "10.96.0.4:80", proto: udp, path: bpf.PathDirect, to: "10.244.1.10:8080"},
		{name: "passthrough: left alone", dst: "10.96.0.5:80", proto: tcp, path: bpf.PathPassthrough},
		{name: "no endpoint with an address: refused", dst: "10.96.0.6:80", proto: tcp, err: syscall.ECONNREFUSED, path: bpf.PathRefuse},
		{name: "IPv6 VIP of a dual-stack service", dst: "[fd00:96::7]:80", proto: tcp, path: bpf.PathDirect, to: "[fd00::10]:8080"},
		{name: "IPv6 VIP, no IPv6 endpoint: refused", dst: "[fd00:96::8]:80", proto: tcp, err: syscall.ECONNREFUSED, path: bpf.PathRefuse},
		{name: "a backend's own waypoint is not the service's", dst: "10.96.0.9:80", proto: tcp, path: bpf.PathTunnel, to: "10.244.2.50:8080"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := e.both(t, ap(tc.dst), tc.proto, tc.slot, tc.coin)
			want := ap(tc.dst)
			if tc.to != "" {
				want = ap(tc.to)
			}
			if d.Err != tc.err || d.Path != tc.path || d.To != want || d.Rewritten != (tc.to != "") {
				t.Errorf("got err=%v path=%s to=%s rewritten=%v; want err=%v path=%s to=%s", d.Err, d.Path, d.To, d.Rewritten, tc.err, tc.path, want)
			}
		})
	}

	t.Run("virtual VIP: counted, and untouched again once its service goes", func(t *testing.T) {
		before, err := e.maps.Stats()
		must(t, err)
		if d := e.both(t, ap("10.96.0.11:443"), tcp, 0, 0); d.Err != syscall.ECONNREFUSED {
			t.Fatalf("got %+v, want ECONNREFUSED", d)
		}
		after, err := e.maps.Stats()
		must(t, err)
		if n := after["vip_no_port"] - before["vip_no_port"]; n != 1 {
			t.Errorf("vip_no_port counted %d, want 1", n)
		}
		must(t, e.dp.DeleteService("ns/virt"))
		if d := e.both(t, ap("10.96.0.11:443"), tcp, 0, 0); d.Err != 0 || d.Path != bpf.PathPlain {
			t.Errorf("after the service went: %+v, want left alone", d)
		}
		vips, err := e.maps.VIPs()
		must(t, err)
		if len(vips) != 0 {
			t.Errorf("kmesh_vip after the only virtual service went: %v", vips)
		}
	})

	// A workload frontend left without its backend (a bug: user space
	// removes frontends first) fails closed in the kernel.
	t.Run("frontend without backend: refused", func(t *testing.T) {
		bs, err := e.maps.Backends()
		must(t, err)
		for _, b := range bs {
			if b.Addr4 == a("10.244.2.30") {
				must(t, e.maps.DeleteBackends([]uint32{b.ID}))
			}
		}
		k, err := e.dec.Decide(ap("10.244.2.30:80"), tcp, 0, 0)
		must(t, err)
		if k.Err != syscall.ECONNREFUSED || k.Path != bpf.PathRefuse {
			t.Fatalf("got %+v, want ECONNREFUSED", k)
		}
		st, err := e.maps.Stats()
		must(t, err)
		if st["no_backend"] != 1 {
			t.Errorf("no_backend counter %d, want 1", st["no_backend"])
		}
	})
}

// TestPrivilegedDecideDifferential: for random meshes (weights, health,
// localities, policies, waypoints, networks, families, per-endpoint ports)
// and random connections and random numbers, the kernel's decision equals
// Pick's, field by field. The tunnel balances iptables-captured connections
// with Pick, so this is what makes both paths balance alike.
func TestPrivilegedDecideDifferential(t *testing.T) {
	here := dataplane.Topology{Node: "n1", Cluster: "c1", Network: "net1", Locality: dataplane.Locality{Region: "r1", Zone: "z1"}}
	e := newDecideEnv(t, here)
	r := rand.New(rand.NewPCG(1, 2))
	nodes := []string{"n1", "n2", "n3"}
	zones := []string{"z1", "z2"}
	networks := []string{"", "net1", "net2"}
	var ws []dataplane.Workload
	var dsts []netip.AddrPort
	for i := range 60 {
		w := dataplane.Workload{UID: fmt.Sprintf("w%d", i), Capacity: uint32(r.IntN(4)), Healthy: r.IntN(5) > 0,
			HBONE: r.IntN(4) > 0, Waypoint: r.IntN(8) == 0, Policies: r.IntN(4) == 0,
			Topology: dataplane.Topology{Node: nodes[r.IntN(3)], Cluster: "c1", Network: networks[r.IntN(3)],
				Locality: dataplane.Locality{Region: "r1", Zone: zones[r.IntN(2)]}}}
		if r.IntN(6) > 0 {
			w.Addrs = append(w.Addrs, netip.AddrFrom4([4]byte{10, 244, byte(i / 200), byte(i + 1)}))
		}
		if r.IntN(3) == 0 {
			w.Addrs = append(w.Addrs, netip.MustParseAddr(fmt.Sprintf("fd00:244::%x", i+1)))
		}
		ws = append(ws, w)
		for _, a := range w.Addrs {
			dsts = append(dsts, netip.AddrPortFrom(a, uint16(8000+r.IntN(3))), netip.AddrPortFrom(a, bpf.HBONEPort))
		}
	}
	if errs := e.dp.Apply(dataplane.Batch{Workloads: ws}); len(errs) > 0 {
		t.Fatal(errs)
	}
	modes := []bpf.LBMode{bpf.LBStandard, bpf.LBStrict, bpf.LBFailover, bpf.LBPassthrough}
	scopes := []dataplane.Scope{dataplane.ScopeRegion, dataplane.ScopeZone, dataplane.ScopeNode, dataplane.ScopeNetwork}
	for i := range 25 {
		s := dataplane.Service{Key: fmt.Sprintf("ns/s%d", i), VIPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 96, 0, byte(i + 1)})},
			Waypoint: r.IntN(6) == 0, LB: dataplane.LoadBalancing{Mode: modes[r.IntN(4)], AllowUnhealthy: r.IntN(3) == 0},
			Virtual: r.IntN(2) == 0}
		if r.IntN(2) == 0 {
			s.VIPs = append(s.VIPs, netip.MustParseAddr(fmt.Sprintf("fd00:96::%x", i+1)))
		}
		for range r.IntN(3) {
			s.LB.RoutingPreference = append(s.LB.RoutingPreference, scopes[r.IntN(len(scopes))])
		}
		for p := range 1 + r.IntN(2) {
			s.Ports = append(s.Ports, dataplane.Port{ServicePort: uint16(80 + p), TargetPort: uint16(r.IntN(2) * (8080 + p))})
		}
		for _, j := range r.Perm(len(ws))[:r.IntN(8)] {
			ep := dataplane.Endpoint{WorkloadUID: ws[j].UID}
			if r.IntN(3) == 0 {
				ep.Ports = []dataplane.Port{{ServicePort: 80, TargetPort: uint16(9000 + r.IntN(3))}}
			}
			s.Endpoints = append(s.Endpoints, ep)
		}
		must(t, e.dp.SetService(s))
		for _, vip := range s.VIPs {
			for _, p := range s.Ports {
				dsts = append(dsts, netip.AddrPortFrom(vip, p.ServicePort))
			}
			dsts = append(dsts, netip.AddrPortFrom(vip, 1))
		}
	}
	seen := map[bpf.Path]int{}
	errsSeen := map[syscall.Errno]int{}
	const runs = 20000
	for range runs {
		dst := dsts[r.IntN(len(dsts))]
		proto := []bpf.Proto{bpf.TCP, bpf.UDP}[r.IntN(2)]
		d := e.both(t, dst, proto, r.Uint32(), r.Uint32())
		seen[d.Path]++
		errsSeen[d.Err]++
	}
	t.Logf("%d decisions agreed; verdicts %v; errors %v", runs, seen, errsSeen)
	// The random mesh must exercise every verdict, or the comparison is weak.
	for p := bpf.PathRefuse; p <= bpf.PathPassthrough; p++ {
		if p != bpf.PathBalance && seen[p] == 0 {
			t.Errorf("verdict %s never decided: widen the random mesh", p)
		}
	}
}
