package dataplane

import (
	"math"
	"net/netip"
	"testing"

	"kmesh.dev/kmesh/bpf"
)

func TestRank(t *testing.T) {
	node := Topology{Node: "n1", Cluster: "c1", Network: "net1", Locality: Locality{"r1", "z1", "s1"}}
	sameZone := Topology{Node: "n2", Cluster: "c1", Network: "net1", Locality: Locality{"r1", "z1", "s2"}}
	otherZone := Topology{Node: "n3", Cluster: "c1", Network: "net1", Locality: Locality{"r1", "z2", "s1"}}
	otherRegion := Topology{Node: "n4", Cluster: "c1", Network: "net1", Locality: Locality{"r2", "z1", "s1"}}
	otherNet := Topology{Node: "n5", Cluster: "c1", Network: "net2", Locality: Locality{"r1", "z1", "s1"}}
	nrz := []Scope{ScopeNetwork, ScopeRegion, ScopeZone}

	for _, tc := range []struct {
		name   string
		lb     LoadBalancing
		ep     Topology
		rank   uint8
		strict bool // excluded
	}{
		{"standard ignores locality", LoadBalancing{Mode: bpf.LBStandard, RoutingPreference: nrz}, otherNet, 0, false},
		{"failover full match", LoadBalancing{Mode: bpf.LBFailover, RoutingPreference: nrz}, sameZone, 0, false},
		{"failover zone differs", LoadBalancing{Mode: bpf.LBFailover, RoutingPreference: nrz}, otherZone, 1, false},
		{"failover region differs", LoadBalancing{Mode: bpf.LBFailover, RoutingPreference: nrz}, otherRegion, 2, false},
		// Matching stops at the first mismatch, even if later scopes match.
		{"failover network differs", LoadBalancing{Mode: bpf.LBFailover, RoutingPreference: nrz}, otherNet, 3, false},
		{"strict full match", LoadBalancing{Mode: bpf.LBStrict, RoutingPreference: nrz}, sameZone, 0, false},
		{"strict partial match excluded", LoadBalancing{Mode: bpf.LBStrict, RoutingPreference: nrz}, otherZone, 0, true},
		{"strict node (internalTrafficPolicy Local)", LoadBalancing{Mode: bpf.LBStrict, RoutingPreference: []Scope{ScopeNode}}, sameZone, 0, true},
		{"strict node on this node", LoadBalancing{Mode: bpf.LBStrict, RoutingPreference: []Scope{ScopeNode}}, node, 0, false},
		{"duplicate scopes count once", LoadBalancing{Mode: bpf.LBFailover, RoutingPreference: []Scope{ScopeZone, ScopeZone, ScopeZone, ScopeZone, ScopeZone, ScopeZone, ScopeZone, ScopeZone, ScopeZone}}, otherZone, 1, false},
		{"all six scopes, nothing matches", LoadBalancing{Mode: bpf.LBFailover, RoutingPreference: []Scope{ScopeNetwork, ScopeCluster, ScopeRegion, ScopeZone, ScopeSubzone, ScopeNode}}, Topology{Network: "x"}, 6, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, ok := Rank(tc.lb, node, tc.ep)
			if ok == tc.strict {
				t.Fatalf("included=%v, want %v", ok, !tc.strict)
			}
			if ok && r != tc.rank {
				t.Fatalf("rank %d, want %d", r, tc.rank)
			}
			if r >= bpf.MaxRanks {
				t.Fatalf("rank %d does not fit the kernel's %d ranks", r, bpf.MaxRanks)
			}
		})
	}
}

// aliasProbabilities computes exactly what the kernel's draw yields.
func aliasProbabilities(slots []AliasSlot, n int) []float64 {
	p := make([]float64, n)
	for _, s := range slots {
		t := float64(s.Threshold) / (1 << 32)
		p[s.Primary] += t / float64(len(slots))
		p[s.Alias] += (1 - t) / float64(len(slots))
	}
	return p
}

func TestAliasTable(t *testing.T) {
	for _, tc := range []struct {
		name    string
		weights []uint32
	}{
		{"single", []uint32{1}},
		{"uniform", []uint32{1, 1, 1}},
		{"two to one", []uint32{2, 1}},
		{"skewed", []uint32{1, 10, 100, 1000}},
		{"with zero", []uint32{3, 0, 1}},
		{"large weights", []uint32{math.MaxUint32, 1, math.MaxUint32 / 3}},
		{"many", func() []uint32 {
			w := make([]uint32, 1000)
			for i := range w {
				w[i] = uint32(i%7 + 1)
			}
			return w
		}()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			slots := AliasTable(tc.weights)
			if len(slots) != len(tc.weights) {
				t.Fatalf("%d slots for %d weights", len(slots), len(tc.weights))
			}
			var total float64
			for _, w := range tc.weights {
				total += float64(w)
			}
			got := aliasProbabilities(slots, len(tc.weights))
			for i, w := range tc.weights {
				want := float64(w) / total
				if math.Abs(got[i]-want) > 1e-9 {
					t.Errorf("item %d: probability %.12f, want %.12f", i, got[i], want)
				}
				if w == 0 && got[i] != 0 {
					t.Errorf("zero-weight item %d selectable (%g)", i, got[i])
				}
			}
		})
	}
	if AliasTable(nil) != nil || AliasTable([]uint32{0, 0}) != nil {
		t.Fatal("no selectable item must give no table")
	}
}

func TestResolvePort(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    Port
		ep   Endpoint
		want uint16
		ok   bool
	}{
		{"service target port", Port{80, 8080}, Endpoint{}, 8080, true},
		{"endpoint override wins", Port{80, 8080}, Endpoint{Ports: []Port{{80, 9090}}}, 9090, true},
		{"named port resolved by endpoint", Port{80, 0}, Endpoint{Ports: []Port{{80, 7070}}}, 7070, true},
		{"named port unmapped excludes endpoint", Port{80, 0}, Endpoint{Ports: []Port{{443, 7070}}}, 0, false},
		{"override for another port ignored", Port{80, 8080}, Endpoint{Ports: []Port{{443, 1}}}, 8080, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := resolvePort(tc.p, tc.ep)
			if got != tc.want || ok != tc.ok {
				t.Fatalf("resolvePort = %d,%v; want %d,%v", got, ok, tc.want, tc.ok)
			}
		})
	}
}

func wl(uid string, addrs ...string) *Workload {
	w := &Workload{UID: uid, Healthy: true, Capacity: 1}
	for _, a := range addrs {
		w.Addrs = append(w.Addrs, netip.MustParseAddr(a))
	}
	return w
}

func TestBuildTables(t *testing.T) {
	node := Topology{Node: "n1", Locality: Locality{Zone: "z1"}}
	a := wl("a", "10.0.0.1", "fd00::1")
	a.Topology = node
	b := wl("b", "10.0.0.2")
	b.Topology = Topology{Node: "n2", Locality: Locality{Zone: "z2"}}
	c := wl("c", "fd00::3")
	c.Capacity = 3
	sick := wl("sick", "10.0.0.4")
	sick.Healthy = false
	noAddr := wl("noaddr")
	drained := wl("drained", "10.0.0.6")
	drained.Capacity = 0
	all := map[string]*resolvedWorkload{}
	for i, w := range []*Workload{a, b, c, sick, noAddr, drained} {
		r := resolve(w, uint32(i+1))
		all[w.UID] = &r
	}
	lookup := func(uid string) *resolvedWorkload { return all[uid] }
	eps := func(uids ...string) []Endpoint {
		var out []Endpoint
		for _, u := range uids {
			out = append(out, Endpoint{WorkloadUID: u})
		}
		return out
	}

	t.Run("families, health, drained and unknown workloads", func(t *testing.T) {
		svc := &Service{Ports: []Port{{80, 8080}}, Endpoints: eps("a", "b", "c", "sick", "noaddr", "drained", "ghost")}
		sets := buildTables(svc, lookup, node)
		if len(sets) != 1 {
			t.Fatalf("%d sets, want 1", len(sets))
		}
		got := sets[0].counts()
		if got[bpf.FamilyV4][0] != 2 || got[bpf.FamilyV6][0] != 2 {
			t.Fatalf("counts %v: want 2 IPv4 (a,b) and 2 IPv6 (a,c) in rank 0", got)
		}
		if sets[0].target(80) != 8080 {
			t.Fatalf("frontend target %d, want 8080", sets[0].target(80))
		}
	})
	t.Run("allow unhealthy", func(t *testing.T) {
		svc := &Service{Ports: []Port{{80, 80}}, LB: LoadBalancing{AllowUnhealthy: true}, Endpoints: eps("a", "sick")}
		if got := buildTables(svc, lookup, node)[0].counts()[bpf.FamilyV4][0]; got != 2 {
			t.Fatalf("%d IPv4 endpoints, want 2 with ALLOW_ALL", got)
		}
	})
	t.Run("failover ranks", func(t *testing.T) {
		svc := &Service{Ports: []Port{{80, 80}}, LB: LoadBalancing{Mode: bpf.LBFailover, RoutingPreference: []Scope{ScopeZone}}, Endpoints: eps("a", "b")}
		got := buildTables(svc, lookup, node)[0].counts()[bpf.FamilyV4]
		if got[0] != 1 || got[1] != 1 {
			t.Fatalf("ranks %v: want a in rank 0, b in rank 1", got)
		}
	})
	t.Run("strict drops the rest", func(t *testing.T) {
		svc := &Service{Ports: []Port{{80, 80}}, LB: LoadBalancing{Mode: bpf.LBStrict, RoutingPreference: []Scope{ScopeNode}}, Endpoints: eps("a", "b")}
		got := buildTables(svc, lookup, node)[0].counts()[bpf.FamilyV4]
		if got[0] != 1 || got[1] != 0 {
			t.Fatalf("ranks %v: want only a", got)
		}
	})
	t.Run("passthrough has no table", func(t *testing.T) {
		svc := &Service{Ports: []Port{{80, 80}}, LB: LoadBalancing{Mode: bpf.LBPassthrough}, Endpoints: eps("a")}
		if sets := buildTables(svc, lookup, node); sets != nil {
			t.Fatalf("sets %v for passthrough", sets)
		}
	})
	t.Run("ports with equal endpoints share one set", func(t *testing.T) {
		svc := &Service{Ports: []Port{{443, 8443}, {80, 8080}}, Endpoints: eps("a", "b")}
		sets := buildTables(svc, lookup, node)
		if len(sets) != 1 || len(sets[0].ports) != 2 || sets[0].target(443) != 8443 || sets[0].target(80) != 8080 {
			t.Fatalf("sets %v targets %v", sets, sets[0].targets)
		}
		for _, s := range sets[0].bucket(int(bpf.FamilyV4), 0) {
			if s.Port != 0 || s.AliasPort != 0 {
				t.Fatalf("uniform target port must live in the frontend, slot %+v", s)
			}
		}
	})
	t.Run("named port with divergent endpoint ports", func(t *testing.T) {
		svc := &Service{Ports: []Port{{80, 0}, {90, 9000}}, Endpoints: []Endpoint{
			{WorkloadUID: "a", Ports: []Port{{80, 8081}}},
			{WorkloadUID: "b", Ports: []Port{{80, 8082}}},
		}}
		sets := buildTables(svc, lookup, node)
		if len(sets) != 2 {
			t.Fatalf("%d sets, want 2 (port 80 per-endpoint, port 90 shared)", len(sets))
		}
		if sets[0].target(80) != 0 {
			t.Fatalf("divergent ports must not set a frontend target: %v", sets[0].targets)
		}
		ports := map[uint32]uint16{}
		for _, s := range sets[0].bucket(int(bpf.FamilyV4), 0) {
			ports[s.Backend] = s.Port
		}
		if ports[1] != 8081 || ports[2] != 8082 {
			t.Fatalf("slot ports %v", ports)
		}
	})
	t.Run("named port unmapped by some endpoints", func(t *testing.T) {
		svc := &Service{Ports: []Port{{80, 0}}, Endpoints: []Endpoint{
			{WorkloadUID: "a", Ports: []Port{{80, 8081}}},
			{WorkloadUID: "b"},
		}}
		sets := buildTables(svc, lookup, node)
		if got := sets[0].counts()[bpf.FamilyV4][0]; got != 1 || sets[0].target(80) != 8081 {
			t.Fatalf("count %d target %d: want only a, on 8081", got, sets[0].target(80))
		}
	})
	t.Run("deterministic", func(t *testing.T) {
		s1 := buildTables(&Service{Ports: []Port{{80, 80}}, Endpoints: eps("b", "a", "c")}, lookup, node)
		s2 := buildTables(&Service{Ports: []Port{{80, 80}}, Endpoints: eps("c", "a", "b")}, lookup, node)
		if !s1[0].equalSlots(s2[0]) {
			t.Fatal("endpoint order changed the tables: every xDS push would rewrite the kernel")
		}
	})
}
