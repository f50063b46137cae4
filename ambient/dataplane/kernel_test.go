package dataplane_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/kerneltest"
	"kmesh.dev/kmesh/integration/podnet"
)

func TestMain(m *testing.M) {
	podnet.MaybeRunHelper()
	os.Exit(m.Run())
}

var (
	vip4 = netip.MustParseAddr("10.96.0.10")
	vip6 = netip.MustParseAddr("fd00:10:96::10")
)

// fixture: one node; a managed client, an unmanaged outsider and three
// backends a, b, c, each answering with its name on TCP 8080 and 9090 and
// UDP 5353, over IPv4 and IPv6.
type fixture struct {
	env      *kerneltest.Env
	dp       *dataplane.Dataplane
	node     dataplane.Topology
	client   *podnet.Pod
	outsider *podnet.Pod
	backends map[string]*podnet.Pod
}

func newFixture(t testing.TB, cfg bpf.Config) *fixture {
	env := kerneltest.New(t, cfg)
	node, err := podnet.NewNode("n1", netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("fd00:10:244:1::/64"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { node.Close() })
	f := &fixture{env: env, node: dataplane.Topology{Node: "n1", Cluster: "c1", Locality: dataplane.Locality{Region: "r1", Zone: "z1"}},
		backends: map[string]*podnet.Pod{}}
	f.dp = dataplane.New(env.DP.Maps, dataplane.Options{Node: f.node})

	addPod := func(name string, host int) *podnet.Pod {
		p, err := node.AddPod(name, netip.MustParseAddr(fmt.Sprintf("10.244.1.%d", host)), netip.MustParseAddr(fmt.Sprintf("fd00:10:244:1::%d", host)))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	f.client = addPod("client", 2)
	f.outsider = addPod("outsider", 3)
	for i, name := range []string{"a", "b", "c"} {
		p := addPod(name, 11+i)
		f.backends[name] = p
		for _, port := range []string{":8080", ":9090"} {
			l, err := p.Listen("tcp", port)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			go podnet.ServeTCPName(l, name+port)
		}
		u, err := p.ListenPacket("udp", ":5353")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { u.Close() })
		go podnet.ServeUDPName(u, name)
		if err := f.dp.SetWorkload(f.workload(name, 1, true, f.node)); err != nil {
			t.Fatal(err)
		}
	}
	cookie, err := f.client.NS.Cookie()
	if err != nil {
		t.Fatal(err)
	}
	if err := f.dp.Enroll(cookie, "client"); err != nil {
		t.Fatal(err)
	}
	return f
}

// workload is a plaintext (non-HBONE) workload: these tests are about the
// load balancer; TestPrivilegedTunnelRedirect covers HBONE destinations.
func (f *fixture) workload(name string, capacity uint32, healthy bool, topo dataplane.Topology) dataplane.Workload {
	p := f.backends[name]
	return dataplane.Workload{UID: name, Addrs: []netip.Addr{p.IPv4, p.IPv6}, Capacity: capacity, Healthy: healthy, Topology: topo}
}

func (f *fixture) service(lb dataplane.LoadBalancing, ports []dataplane.Port, eps ...string) dataplane.Service {
	s := dataplane.Service{Key: "default/web.default.svc.cluster.local", VIPs: []netip.Addr{vip4, vip6}, Ports: ports, LB: lb}
	for _, e := range eps {
		s.Endpoints = append(s.Endpoints, dataplane.Endpoint{WorkloadUID: e})
	}
	return s
}

var web = []dataplane.Port{{ServicePort: 80, TargetPort: 8080}, {ServicePort: 53, TargetPort: 5353}}

func (f *fixture) run(t testing.TB, pod *podnet.Pod, helper string, args ...string) podnet.ClientResult {
	t.Helper()
	var res podnet.ClientResult
	if err := pod.Helper(f.env.Cgroup, &res, helper, args...); err != nil {
		t.Fatal(err)
	}
	return res
}

// expectShares checks counts against expected probabilities within six
// standard deviations of a binomial: a correct kernel fails this about once
// in 10^9 runs, a wrong weight fails it every time.
func expectShares(t *testing.T, got podnet.Tally, want map[string]float64) {
	t.Helper()
	n := float64(got.Total())
	for name, p := range want {
		mean, sd := n*p, math.Sqrt(n*p*(1-p))
		if c := float64(got[name]); math.Abs(c-mean) > 6*sd+1 {
			t.Errorf("%s: %v of %v, want %.0f±%.0f (all: %v)", name, c, n, mean, 6*sd, got)
		}
	}
	for name := range got {
		if _, ok := want[name]; !ok {
			t.Errorf("unexpected backend %s reached (%d times): %v", name, got[name], got)
		}
	}
}

func expectOnly(t *testing.T, got podnet.Tally, key string, n int) {
	t.Helper()
	if got[key] != n || len(got) != 1 {
		t.Errorf("want %d × %q only, got %v", n, key, got)
	}
}

func TestPrivilegedServiceLoadBalancing(t *testing.T) {
	f := newFixture(t, bpf.Config{})
	third := map[string]float64{"a:8080": 1.0 / 3, "b:8080": 1.0 / 3, "c:8080": 1.0 / 3}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(f.dp.SetService(f.service(dataplane.LoadBalancing{}, web, "a", "b", "c")))

	t.Run("tcp4 spreads evenly and getpeername shows the VIP", func(t *testing.T) {
		res := f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "1500", "-network", "tcp4")
		expectOnly(t, res.Peers, "10.96.0.10:80", 1500)
		expectShares(t, res.Names, third)
	})
	t.Run("tcp6 spreads evenly and getpeername shows the VIP", func(t *testing.T) {
		res := f.run(t, f.client, "tcp", "-addr", "[fd00:10:96::10]:80", "-n", "1500", "-network", "tcp6")
		expectOnly(t, res.Peers, "[fd00:10:96::10]:80", 1500)
		expectShares(t, res.Names, third)
	})
	t.Run("dual-stack socket to an IPv4 VIP (v4-mapped)", func(t *testing.T) {
		res := f.run(t, f.client, "udp", "-addr", "10.96.0.10:53", "-n", "300", "-network", "udp")
		expectOnly(t, res.Peers, "10.96.0.10:53", 300)
		expectShares(t, res.Names, map[string]float64{"a": 1.0 / 3, "b": 1.0 / 3, "c": 1.0 / 3})
	})
	t.Run("udp4 unconnected both ways", func(t *testing.T) {
		res := f.run(t, f.client, "udp", "-addr", "10.96.0.10:53", "-n", "600", "-network", "udp4")
		expectOnly(t, res.Peers, "10.96.0.10:53", 600)
		expectShares(t, res.Names, map[string]float64{"a": 1.0 / 3, "b": 1.0 / 3, "c": 1.0 / 3})
	})
	t.Run("udp6 connected both ways", func(t *testing.T) {
		res := f.run(t, f.client, "udp", "-addr", "[fd00:10:96::10]:53", "-n", "300", "-network", "udp6", "-connected")
		expectOnly(t, res.Peers, "[fd00:10:96::10]:53", 300)
		expectShares(t, res.Names, map[string]float64{"a": 1.0 / 3, "b": 1.0 / 3, "c": 1.0 / 3})
	})
	t.Run("udp socket keeps its backend", func(t *testing.T) {
		res := f.run(t, f.client, "udp", "-addr", "10.96.0.10:53", "-n", "200", "-network", "udp4", "-shared")
		if len(res.Names) != 1 || res.Names.Total() != 200 {
			t.Fatalf("one socket's datagrams went to %v, want one backend", res.Names)
		}
	})
	t.Run("unmanaged pod is untouched", func(t *testing.T) {
		// No route to the VIP range exists: untouched means unreachable.
		res := f.run(t, f.outsider, "tcp", "-addr", "10.96.0.10:80", "-n", "5", "-network", "tcp4")
		expectOnly(t, res.Errors, "ENETUNREACH", 5)
		res = f.run(t, f.outsider, "udp", "-addr", "10.96.0.10:53", "-n", "5", "-network", "udp4")
		expectOnly(t, res.Errors, "ENETUNREACH", 5)
	})
	t.Run("unknown port of a VIP passes untouched", func(t *testing.T) {
		res := f.run(t, f.client, "tcp", "-addr", "10.96.0.10:81", "-n", "3", "-network", "tcp4")
		expectOnly(t, res.Errors, "ENETUNREACH", 3)
	})
	t.Run("unknown port of a Kubernetes Service's VIP is refused", func(t *testing.T) {
		virt := f.service(dataplane.LoadBalancing{}, web, "a", "b", "c")
		virt.Virtual = true
		must(f.dp.SetService(virt))
		defer func() { must(f.dp.SetService(f.service(dataplane.LoadBalancing{}, web, "a", "b", "c"))) }()
		before, err := f.env.DP.Maps.Stats()
		must(err)
		res := f.run(t, f.client, "tcp", "-addr", "10.96.0.10:81", "-n", "3", "-network", "tcp4")
		expectOnly(t, res.Errors, "ECONNREFUSED", 3)
		res = f.run(t, f.client, "tcp", "-addr", "[fd00:10:96::10]:81", "-n", "3", "-network", "tcp6")
		expectOnly(t, res.Errors, "ECONNREFUSED", 3)
		res = f.run(t, f.client, "udp", "-addr", "10.96.0.10:54", "-n", "3", "-network", "udp4")
		expectOnly(t, res.Errors, "ECONNREFUSED", 3)
		after, err := f.env.DP.Maps.Stats()
		must(err)
		if n := after["vip_no_port"] - before["vip_no_port"]; n < 9 {
			t.Errorf("vip_no_port counted %d refusals, want at least 9", n)
		}
		// Its own ports still balance.
		res = f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "30", "-network", "tcp4")
		expectOnly(t, res.Peers, "10.96.0.10:80", 30)
	})
	t.Run("pod IP is reached directly", func(t *testing.T) {
		res := f.run(t, f.client, "tcp", "-addr", "10.244.1.12:8080", "-n", "3", "-network", "tcp4")
		expectOnly(t, res.Names, "b:8080", 3)
		expectOnly(t, res.Peers, "10.244.1.12:8080", 3)
	})
	t.Run("capacity weights", func(t *testing.T) {
		must(f.dp.SetWorkload(f.workload("b", 2, true, f.node)))
		must(f.dp.SetWorkload(f.workload("c", 3, true, f.node)))
		defer func() {
			must(f.dp.SetWorkload(f.workload("b", 1, true, f.node)))
			must(f.dp.SetWorkload(f.workload("c", 1, true, f.node)))
		}()
		res := f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "3000", "-network", "tcp4")
		expectShares(t, res.Names, map[string]float64{"a:8080": 1.0 / 6, "b:8080": 2.0 / 6, "c:8080": 3.0 / 6})
	})
	t.Run("unhealthy endpoints are skipped unless ALLOW_ALL", func(t *testing.T) {
		must(f.dp.SetWorkload(f.workload("b", 1, false, f.node)))
		defer func() { must(f.dp.SetWorkload(f.workload("b", 1, true, f.node))) }()
		res := f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "600", "-network", "tcp4")
		expectShares(t, res.Names, map[string]float64{"a:8080": 0.5, "c:8080": 0.5})

		must(f.dp.SetService(f.service(dataplane.LoadBalancing{AllowUnhealthy: true}, web, "a", "b", "c")))
		defer func() { must(f.dp.SetService(f.service(dataplane.LoadBalancing{}, web, "a", "b", "c"))) }()
		res = f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "900", "-network", "tcp4")
		expectShares(t, res.Names, third)
	})
	t.Run("failover prefers the closest rank and fails over", func(t *testing.T) {
		otherZone := dataplane.Topology{Node: "n2", Cluster: "c1", Locality: dataplane.Locality{Region: "r1", Zone: "z2"}}
		otherRegion := dataplane.Topology{Node: "n3", Cluster: "c1", Locality: dataplane.Locality{Region: "r2", Zone: "z9"}}
		must(f.dp.SetWorkload(f.workload("b", 1, true, otherZone)))
		must(f.dp.SetWorkload(f.workload("c", 1, true, otherRegion)))
		defer func() {
			must(f.dp.SetWorkload(f.workload("b", 1, true, f.node)))
			must(f.dp.SetWorkload(f.workload("c", 1, true, f.node)))
		}()
		lb := dataplane.LoadBalancing{Mode: bpf.LBFailover, RoutingPreference: []dataplane.Scope{dataplane.ScopeRegion, dataplane.ScopeZone}}
		must(f.dp.SetService(f.service(lb, web, "a", "b", "c")))
		defer func() { must(f.dp.SetService(f.service(dataplane.LoadBalancing{}, web, "a", "b", "c"))) }()

		res := f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "100", "-network", "tcp4")
		expectOnly(t, res.Names, "a:8080", 100)
		must(f.dp.SetWorkload(f.workload("a", 1, false, f.node))) // same zone gone: same region next
		res = f.run(t, f.client, "tcp", "-addr", "[fd00:10:96::10]:80", "-n", "100", "-network", "tcp6")
		expectOnly(t, res.Names, "b:8080", 100)
		must(f.dp.SetWorkload(f.workload("b", 1, false, otherZone))) // then anything
		res = f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "100", "-network", "tcp4")
		expectOnly(t, res.Names, "c:8080", 100)
		must(f.dp.SetWorkload(f.workload("a", 1, true, f.node)))
		must(f.dp.SetWorkload(f.workload("b", 1, true, otherZone)))
	})
	t.Run("strict keeps traffic local or refuses", func(t *testing.T) {
		elsewhere := dataplane.Topology{Node: "n2", Cluster: "c1", Locality: dataplane.Locality{Region: "r1", Zone: "z1"}}
		must(f.dp.SetWorkload(f.workload("b", 1, true, elsewhere)))
		must(f.dp.SetWorkload(f.workload("c", 1, true, elsewhere)))
		defer func() {
			must(f.dp.SetWorkload(f.workload("b", 1, true, f.node)))
			must(f.dp.SetWorkload(f.workload("c", 1, true, f.node)))
		}()
		local := dataplane.LoadBalancing{Mode: bpf.LBStrict, RoutingPreference: []dataplane.Scope{dataplane.ScopeNode}}
		must(f.dp.SetService(f.service(local, web, "a", "b", "c")))
		defer func() { must(f.dp.SetService(f.service(dataplane.LoadBalancing{}, web, "a", "b", "c"))) }()
		res := f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "100", "-network", "tcp4")
		expectOnly(t, res.Names, "a:8080", 100)
		must(f.dp.SetWorkload(f.workload("a", 1, true, elsewhere)))
		defer func() { must(f.dp.SetWorkload(f.workload("a", 1, true, f.node))) }()
		res = f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "5", "-network", "tcp4")
		expectOnly(t, res.Errors, "ECONNREFUSED", 5)
	})
	t.Run("per-endpoint target ports (named port)", func(t *testing.T) {
		s := f.service(dataplane.LoadBalancing{}, []dataplane.Port{{ServicePort: 80, TargetPort: 0}}, "a", "b", "c")
		s.Endpoints[0].Ports = []dataplane.Port{{80, 9090}} // a serves it on 9090
		s.Endpoints[1].Ports = []dataplane.Port{{80, 8080}} // b on 8080, c not at all
		must(f.dp.SetService(s))
		defer func() { must(f.dp.SetService(f.service(dataplane.LoadBalancing{}, web, "a", "b", "c"))) }()
		res := f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "600", "-network", "tcp4")
		expectShares(t, res.Names, map[string]float64{"a:9090": 0.5, "b:8080": 0.5})
	})
	t.Run("passthrough leaves the destination alone", func(t *testing.T) {
		must(f.dp.SetService(f.service(dataplane.LoadBalancing{Mode: bpf.LBPassthrough}, web, "a", "b", "c")))
		defer func() { must(f.dp.SetService(f.service(dataplane.LoadBalancing{}, web, "a", "b", "c"))) }()
		res := f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "3", "-network", "tcp4")
		expectOnly(t, res.Errors, "ENETUNREACH", 3)
	})
	t.Run("no endpoint refuses, never leaks the VIP", func(t *testing.T) {
		must(f.dp.SetService(f.service(dataplane.LoadBalancing{}, web)))
		defer func() { must(f.dp.SetService(f.service(dataplane.LoadBalancing{}, web, "a", "b", "c"))) }()
		res := f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "5", "-network", "tcp4")
		expectOnly(t, res.Errors, "ECONNREFUSED", 5)
		res = f.run(t, f.client, "udp", "-addr", "[fd00:10:96::10]:53", "-n", "5", "-network", "udp6")
		expectOnly(t, res.Errors, "ECONNREFUSED", 5)
	})
	t.Run("no endpoint of the socket family refuses", func(t *testing.T) {
		v4only := f.workload("a", 1, true, f.node)
		v4only.Addrs = v4only.Addrs[:1]
		must(f.dp.SetWorkload(v4only))
		defer func() { must(f.dp.SetWorkload(f.workload("a", 1, true, f.node))) }()
		must(f.dp.SetService(f.service(dataplane.LoadBalancing{}, web, "a")))
		defer func() { must(f.dp.SetService(f.service(dataplane.LoadBalancing{}, web, "a", "b", "c"))) }()
		res := f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "3", "-network", "tcp4")
		expectOnly(t, res.Names, "a:8080", 3)
		// The service has IPv6 VIPs but its only endpoint has no IPv6 address.
		res = f.run(t, f.client, "tcp", "-addr", "[fd00:10:96::10]:80", "-n", "3", "-network", "tcp6")
		expectOnly(t, res.Errors, "ECONNREFUSED", 3)
	})
	t.Run("scale down and up", func(t *testing.T) {
		must(f.dp.SetService(f.service(dataplane.LoadBalancing{}, web, "c")))
		res := f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "50", "-network", "tcp4")
		expectOnly(t, res.Names, "c:8080", 50)
		must(f.dp.SetService(f.service(dataplane.LoadBalancing{}, web, "a", "b", "c")))
		res = f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "900", "-network", "tcp4")
		expectShares(t, res.Names, third)
	})
	t.Run("deleting the service makes connects fail cleanly", func(t *testing.T) {
		must(f.dp.DeleteService("default/web.default.svc.cluster.local"))
		res := f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "3", "-network", "tcp4")
		expectOnly(t, res.Errors, "ENETUNREACH", 3)
		fes, err := f.env.DP.Maps.Frontends()
		must(err)
		for _, fe := range fes {
			if fe.Kind == bpf.FrontendService {
				t.Errorf("service frontend left behind: %+v", fe)
			}
		}
		svcs, err := f.env.DP.Maps.Services()
		must(err)
		eps, err := f.env.DP.Maps.Endpoints()
		must(err)
		if len(svcs) != 0 || len(eps) != 0 {
			t.Errorf("left behind: %d services, %d endpoint slots", len(svcs), len(eps))
		}
	})
}

func TestPrivilegedNoPeerVIP(t *testing.T) {
	f := newFixture(t, bpf.Config{NoPeerVIP: true})
	if err := f.dp.SetService(f.service(dataplane.LoadBalancing{}, web, "b")); err != nil {
		t.Fatal(err)
	}
	res := f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "3", "-network", "tcp4")
	expectOnly(t, res.Names, "b:8080", 3)
	expectOnly(t, res.Peers, "10.244.1.12:8080", 3)
}

func TestPrivilegedMapFullKeepsServing(t *testing.T) {
	// Room for one 3-endpoint service per family only twice over (the
	// make-before-break copy), not for a 4th endpoint.
	f := newFixture(t, bpf.Config{Sizes: bpf.MapSizes{Endpoint: 8}})
	if err := f.dp.SetService(f.service(dataplane.LoadBalancing{}, web, "a", "b")); err != nil {
		t.Fatal(err)
	}
	// a, b, c in both families is 6 new slots next to 4 live ones: no room.
	err := f.dp.SetService(f.service(dataplane.LoadBalancing{}, web, "a", "b", "c"))
	var full *bpf.MapFullError
	if !errors.As(err, &full) || full.Map != "kmesh_endpoint" {
		t.Fatalf("want a MapFullError naming kmesh_endpoint, got %v", err)
	}
	if f.dp.Stats.MapFull.Load() != 1 {
		t.Errorf("map-full counter %d, want 1", f.dp.Stats.MapFull.Load())
	}
	res := f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "600", "-network", "tcp4")
	expectShares(t, res.Names, map[string]float64{"a:8080": 0.5, "b:8080": 0.5})
	eps, err := f.env.DP.Maps.Endpoints()
	if err != nil {
		t.Fatal(err)
	}
	if len(eps) != 4 {
		t.Errorf("%d endpoint slots in the kernel, want the 4 live ones (no half-written generation)", len(eps))
	}
}

// A daemon restart or upgrade: the process goes away (handles closed, pins
// kept) and a new one loads the same layout. Connections through the VIP
// must keep working throughout, with no daemon at all in between.
func TestPrivilegedRestartKeepsServing(t *testing.T) {
	f := newFixture(t, bpf.Config{})
	if err := f.dp.SetService(f.service(dataplane.LoadBalancing{}, web, "a", "b", "c")); err != nil {
		t.Fatal(err)
	}
	done := make(chan podnet.ClientResult)
	go func() {
		var res podnet.ClientResult
		if err := f.client.Helper(f.env.Cgroup, &res, "tcp", "-addr", "10.96.0.10:80", "-n", "3000", "-network", "tcp4"); err != nil {
			t.Error(err)
		}
		done <- res
	}()
	var res podnet.ClientResult
	restarts := 0
	for running := true; running; {
		select {
		case res = <-done:
			running = false
		default:
			if err := f.env.DP.Close(); err != nil {
				t.Fatal(err)
			}
			// No process holds the programs or maps now: only the pins do.
			time.Sleep(time.Millisecond)
			f.env.DP = f.env.Load(t)
			if !f.env.DP.Reused {
				t.Fatal("reload did not reuse the pinned maps")
			}
			restarts++
		}
	}
	if restarts < 3 {
		t.Fatalf("only %d restarts happened while the client ran", restarts)
	}
	t.Logf("%d restarts during %d connections", restarts, res.Names.Total())
	if res.Errors.Total() != 0 {
		t.Fatalf("connections failed across restarts: %v", res.Errors)
	}
	expectShares(t, res.Names, map[string]float64{"a:8080": 1.0 / 3, "b:8080": 1.0 / 3, "c:8080": 1.0 / 3})
	svcs, err := f.env.DP.Maps.Services()
	if err != nil || len(svcs) != 1 {
		t.Fatalf("after restarts: %d services (%v), want the 1 written before", len(svcs), err)
	}
}

// BenchmarkPrivilegedConnectProgram reports what the kernel spends in
// kmesh_connect4 per connect (kernel.bpf_stats run time / run count) to a
// service VIP, to a pod IP, and from an unmanaged pod, next to the wall time
// of a whole connect+read+close as seen by the client.
// drainConnEvents reads kmesh_events as the daemon's telemetry reader does
// (drain without waiting, then wait up to 100 ms in the network poller),
// so the programs' cost includes waking a live reader, as on a node.
func drainConnEvents(b *testing.B, f *fixture) {
	ev, err := f.env.DP.Maps.OpenConnEvents()
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		ev.SetDeadline(time.Unix(1, 0))
		for {
			for {
				_, err := ev.Read()
				if errors.Is(err, bpf.ErrEventsClosed) {
					return
				}
				if err != nil {
					break
				}
			}
			if errors.Is(ev.Wait(time.Now().Add(100*time.Millisecond)), bpf.ErrEventsClosed) {
				return
			}
		}
	}()
	b.Cleanup(func() {
		ev.Close()
		<-done
	})
}

func BenchmarkPrivilegedConnectProgram(b *testing.B) {
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Fatalf("enabling BPF run-time stats: %v", err)
	}
	defer stats.Close()
	for _, peerVIP := range []bool{true, false} {
		f := newFixture(b, bpf.Config{NoPeerVIP: !peerVIP})
		if err := f.dp.SetService(f.service(dataplane.LoadBalancing{}, web, "a", "b", "c")); err != nil {
			b.Fatal(err)
		}
		drainConnEvents(b, f)
		cases := []struct {
			name string
			pod  *podnet.Pod
			addr string
		}{
			{"vip", f.client, "10.96.0.10:80"},
			{"pod-ip", f.client, "10.244.1.12:8080"},
			{"unmanaged", f.outsider, "10.244.1.12:8080"},
			// c as an HBONE workload on another node: sent to the node
			// proxy's listener (here a stand-in that takes the record).
			{"tunnel", f.client, "10.244.1.13:8080"},
		}
		if peerVIP {
			c := f.workload("c", 1, true, dataplane.Topology{Node: "n2", Cluster: "c1"})
			c.HBONE = true
			if err := f.dp.SetWorkload(c); err != nil {
				b.Fatal(err)
			}
			cookie, err := f.client.NS.Cookie()
			if err != nil {
				b.Fatal(err)
			}
			l, err := f.client.Listen("tcp", "127.0.0.1:15001")
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { l.Close() })
			go (&fakeOutbound{}).serve(b, l, f.env.DP.Maps, cookie)
		}
		if !peerVIP {
			cases = []struct {
				name string
				pod  *podnet.Pod
				addr string
			}{{"vip-no-peer-vip", f.client, "10.96.0.10:80"}}
		}
		for _, tc := range cases {
			b.Run(tc.name, func(b *testing.B) {
				before, opsBefore := programStats(b, f, "connect4"), programStats(b, f, "sockops")
				start := time.Now()
				res := f.run(b, tc.pod, "tcp", "-addr", tc.addr, "-n", strconv.Itoa(b.N), "-network", "tcp4", "-rst")
				wall := time.Since(start)
				after, opsAfter := programStats(b, f, "connect4"), programStats(b, f, "sockops")
				if res.Errors.Total() != 0 {
					b.Fatalf("errors: %v", res.Errors)
				}
				runs := after.RunCount - before.RunCount
				if runs < uint64(b.N) {
					b.Fatalf("connect4 ran %d times for %d connects", runs, b.N)
				}
				b.ReportMetric(float64(after.RunTimeNs-before.RunTimeNs)/float64(runs), "bpf-ns/connect")
				// sockops runs on every TCP socket of the cgroup, several
				// times per connection (both ends when both are in it).
				b.ReportMetric(float64(opsAfter.RunTimeNs-opsBefore.RunTimeNs)/float64(b.N), "sockops-ns/conn")
				b.ReportMetric(float64(wall.Microseconds())/float64(b.N), "wall-us/connect")
			})
		}
	}
}

// BenchmarkPrivilegedInboundProgram reports what inbound enforcement
// (kmesh_inbound, sk_lookup in the destination pod's namespace) costs per
// incoming connection to a pod without policies, the zero-cost path that
// most pods take, and to one with policies (steered to a 15006 listener).
func BenchmarkPrivilegedInboundProgram(b *testing.B) {
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Fatalf("enabling BPF run-time stats: %v", err)
	}
	defer stats.Close()
	f := newFixture(b, bpf.Config{})
	a := f.backends["a"]
	nsf, err := a.NS.File()
	if err != nil {
		b.Fatal(err)
	}
	cookie, err := a.NS.Cookie()
	if err == nil {
		err = f.env.DP.AttachInbound(int(nsf.Fd()), cookie)
	}
	nsf.Close()
	if err != nil {
		b.Fatal(err)
	}
	// A stand-in for the proxy's 15006 in a: it answers as the application
	// would, so both cases measure one connection each.
	// Plain TCP (a sockhash takes no MPTCP socket), as the proxy listens.
	var l net.Listener
	err = a.NS.Do(func() (err error) {
		lc := net.ListenConfig{}
		lc.SetMultipathTCP(false)
		l, err = lc.Listen(context.Background(), "tcp", ":15006")
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	go podnet.ServeTCPName(l, "a:15006")
	rc, err := l.(*net.TCPListener).SyscallConn()
	if err != nil {
		b.Fatal(err)
	}
	for _, addr := range []netip.Addr{a.IPv4, a.IPv6} {
		var serr error
		if err := rc.Control(func(fd uintptr) { serr = f.env.DP.Maps.SetInboundListener(addr, fd) }); err != nil || serr != nil {
			b.Fatal(err, serr)
		}
	}
	for _, tc := range []struct {
		name     string
		policies bool
		want     string
	}{{"no-policies", false, "a:8080"}, {"policies", true, "a:15006"}} {
		w := f.workload("a", 1, true, f.node)
		w.HBONE, w.Policies = true, tc.policies
		if err := f.dp.SetWorkload(w); err != nil {
			b.Fatal(err)
		}
		b.Run(tc.name, func(b *testing.B) {
			before := programStats(b, f, "inbound")
			res := f.run(b, f.outsider, "tcp", "-addr", netip.AddrPortFrom(a.IPv4, 8080).String(), "-n", strconv.Itoa(b.N), "-network", "tcp4", "-rst")
			after := programStats(b, f, "inbound")
			if res.Names[tc.want] != b.N {
				b.Fatalf("want %d × %s, got %+v", b.N, tc.want, res)
			}
			runs := after.RunCount - before.RunCount
			if runs < uint64(b.N) {
				b.Fatalf("kmesh_inbound ran %d times for %d connections", runs, b.N)
			}
			b.ReportMetric(float64(after.RunTimeNs-before.RunTimeNs)/float64(runs), "bpf-ns/lookup")
		})
	}
}

func programStats(b *testing.B, f *fixture, name string) bpf.ProgramStats {
	ps, err := f.env.DP.Programs()
	if err != nil {
		b.Fatal(err)
	}
	for _, p := range ps {
		if p.Name == name {
			return p
		}
	}
	b.Fatalf("program %s not found", name)
	return bpf.ProgramStats{}
}

type kernelDump struct {
	fe  []bpf.Frontend
	svc []bpf.Service
	ep  []bpf.Endpoint
	be  []bpf.Backend
}

func dumpKernel(t testing.TB, m *bpf.Maps) kernelDump {
	t.Helper()
	var d kernelDump
	var err error
	if d.fe, err = m.Frontends(); err != nil {
		t.Fatal(err)
	}
	if d.svc, err = m.Services(); err != nil {
		t.Fatal(err)
	}
	if d.ep, err = m.Endpoints(); err != nil {
		t.Fatal(err)
	}
	if d.be, err = m.Backends(); err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(d.fe, func(a, b bpf.Frontend) int { return strings.Compare(a.Key.String(), b.Key.String()) })
	slices.SortFunc(d.svc, func(a, b bpf.Service) int { return int(a.ID) - int(b.ID) })
	slices.SortFunc(d.ep, func(a, b bpf.Endpoint) int { return strings.Compare(fmt.Sprint(a.Key), fmt.Sprint(b.Key)) })
	slices.SortFunc(d.be, func(a, b bpf.Backend) int { return int(a.ID) - int(b.ID) })
	return d
}

// A restarted daemon adopts the kernel state it finds: unchanged objects
// are not rewritten at all (same ids, same generation, same epoch), stale
// ones are swept after the first sync, and traffic never notices.
func TestPrivilegedAdoptAfterRestart(t *testing.T) {
	f := newFixture(t, bpf.Config{})
	svc := f.service(dataplane.LoadBalancing{}, web, "a", "b", "c")
	stale := dataplane.Service{Key: "default/gone", VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.99")}, Ports: web,
		Endpoints: []dataplane.Endpoint{{WorkloadUID: "a"}}}
	for _, err := range []error{f.dp.SetService(svc), f.dp.SetService(stale)} {
		if err != nil {
			t.Fatal(err)
		}
	}
	// A crash mid-update leaves slots of an unpublished generation behind.
	if err := f.env.DP.Maps.PutEndpoints([]bpf.Endpoint{{Key: bpf.EndpointKey{Service: 1, Gen: 1, Index: 7}, Slot: bpf.EndpointSlot{Backend: 1, Alias: 1}}}); err != nil {
		t.Fatal(err)
	}
	before := dumpKernel(t, f.env.DP.Maps)

	done := make(chan podnet.ClientResult)
	go func() {
		var res podnet.ClientResult
		if err := f.client.Helper(f.env.Cgroup, &res, "tcp", "-addr", "10.96.0.10:80", "-n", "2000", "-network", "tcp4"); err != nil {
			t.Error(err)
		}
		done <- res
	}()

	// The daemon dies; a new one starts and learns the same state again.
	f.env.DP.Close()
	f.env.DP = f.env.Load(t)
	dp2 := dataplane.New(f.env.DP.Maps, dataplane.Options{Node: f.node})
	if err := dp2.Adopt(); err != nil {
		t.Fatal(err)
	}
	b := dataplane.Batch{Services: []dataplane.Service{svc}}
	for _, name := range []string{"a", "b", "c"} {
		b.Workloads = append(b.Workloads, f.workload(name, 1, true, f.node))
	}
	if errs := dp2.Apply(b); len(errs) > 0 {
		t.Fatal(errs)
	}
	if n := dp2.Stats.ServiceWrites.Load(); n != 1 {
		t.Fatalf("%d service applies, want 1", n)
	}
	mid := dumpKernel(t, f.env.DP.Maps)
	if !reflect.DeepEqual(before, mid) {
		t.Fatalf("adoption rewrote the kernel state:\nbefore %+v\nafter  %+v", before, mid)
	}
	if err := dp2.Sweep(); err != nil {
		t.Fatal(err)
	}
	after := dumpKernel(t, f.env.DP.Maps)
	for _, fe := range after.fe {
		if fe.Key.Addr == netip.MustParseAddr("10.96.0.99") {
			t.Errorf("stale service frontend survived the sweep: %+v", fe)
		}
	}
	if len(after.svc) != 1 {
		t.Errorf("%d sets after sweep, want 1: %+v", len(after.svc), after.svc)
	}
	for _, e := range after.ep {
		if e.Key.Gen != after.svc[0].Gen || e.Key.Service != after.svc[0].ID {
			t.Errorf("stray slot survived the sweep: %+v", e.Key)
		}
	}
	res := <-done
	if res.Errors.Total() != 0 {
		t.Fatalf("connections failed across the restart: %v", res.Errors)
	}

	// The adopted daemon carries on normally: a change flips the generation.
	if err := dp2.SetService(f.service(dataplane.LoadBalancing{}, web, "b")); err != nil {
		t.Fatal(err)
	}
	got := f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "20", "-network", "tcp4")
	expectOnly(t, got.Names, "b:8080", 20)
	if eps := dumpKernel(t, f.env.DP.Maps).ep; len(eps) != 2 {
		t.Errorf("%d slots, want 2 (b in each family)", len(eps))
	}
}
