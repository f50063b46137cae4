package state

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"unsafe"

	"istio.io/istio/pkg/workloadapi"
)

func TestWidSetGrowsIntoAMap(t *testing.T) {
	var s widSet
	for i := range 100 {
		s.add(wid(i))
		s.add(wid(i)) // a set: adding twice counts once
		if s.len() != i+1 {
			t.Fatalf("after %d adds: len %d", i+1, s.len())
		}
		if (s.big != nil) != (i >= smallSet) {
			t.Fatalf("after %d adds: map %v", i+1, s.big != nil)
		}
	}
	for i := 0; i < 100; i += 2 {
		s.remove(wid(i))
	}
	s.remove(wid(1000)) // absent
	got := slices.Sorted(s.all())
	if len(got) != 50 || got[0] != 1 || got[49] != 99 {
		t.Fatalf("after removals: %v", got)
	}
	var small widSet
	for _, id := range []wid{3, 1, 2} {
		small.add(id)
	}
	small.remove(1)
	if got := slices.Sorted(small.all()); !slices.Equal(got, []wid{2, 3}) {
		t.Fatalf("small set %v", got)
	}
}

func TestSharedTableCountsHolders(t *testing.T) {
	var tab sharedTable[[]string]
	a, b := []string{"x"}, []string{"x"}
	key := appendStringsKey(nil, a)
	if got := tab.take(key, a); &got[0] != &a[0] {
		t.Fatal("first holder's value not kept")
	}
	if got := tab.take(key, b); &got[0] != &a[0] {
		t.Fatal("equal value not shared")
	}
	tab.release(key)
	if tab.len() != 1 {
		t.Fatal("released while held")
	}
	tab.release(key)
	tab.release(key) // one too many: harmless
	if tab.len() != 0 {
		t.Fatal("kept with no holder")
	}
	// Keys tell apart what DeepEqual tells apart.
	for _, pair := range [][2][]ServicePorts{
		{{{Service: "a", Ports: nil}}, {{Service: "a", Ports: []Port{}}}},
		{{{Service: "ab"}}, {{Service: "a"}, {Service: "b"}}},
		{{{Service: "a", Ports: []Port{{1, 2}}}}, {{Service: "a", Ports: []Port{{2, 1}}}}},
	} {
		if string(appendServicesKey(nil, pair[0])) == string(appendServicesKey(nil, pair[1])) {
			t.Errorf("%v and %v share a key", pair[0], pair[1])
		}
	}
	g1 := &GatewayAddress{Hostname: "ns/wp", HBONEMTLSPort: 15008}
	g2 := &GatewayAddress{Address: &NetworkAddr{Addr: netip.MustParseAddr("10.0.0.1")}, HBONEMTLSPort: 15008}
	if string(appendGatewayKey(nil, g1)) == string(appendGatewayKey(nil, g2)) {
		t.Error("gateways by name and by address share a key")
	}
}

func TestMetaRoundTripAndSharing(t *testing.T) {
	m := WorkloadMeta{Namespace: "ns", Network: "net", TrustDomain: "td", ServiceAccount: "sa", Node: "n1", ClusterID: "c",
		Locality: Locality{Region: "r", Zone: "z", Subzone: "s"}, CanonicalName: "app", CanonicalRevision: "v1",
		WorkloadName: "app", WorkloadType: "deployment"}
	var a, b Workload
	a.SetMeta(m)
	if a.Meta() != m || a.Node() != "n1" || a.Network() != "net" || a.Namespace() != "ns" {
		t.Fatalf("meta %+v", a.Meta())
	}
	// Pods of one deployment on two nodes share the deployment's record.
	m2 := m
	m2.Node = "n2"
	b.SetMeta(m2)
	if a.deploy != b.deploy || a.place == b.place {
		t.Fatal("deployment record not shared, or node record shared across nodes")
	}
	var zero Workload
	if zero.Meta() != (WorkloadMeta{}) || zero.Node() != "" || zero.Network() != "" || zero.Namespace() != "" {
		t.Fatal("a workload without meta has some")
	}
}

func TestConvertedNameSharesTheUID(t *testing.T) {
	w := mustWorkload(t, &workloadapi.Workload{Uid: "Kubernetes//Pod/ns/pod-7", Name: "pod-7"})
	if w.Name != "pod-7" || unsafeData(w.Name) != unsafeData(w.UID[len(w.UID)-len("pod-7"):]) {
		t.Fatal("name not a suffix of the UID's bytes")
	}
	if w := mustWorkload(t, &workloadapi.Workload{Uid: "u1", Name: "other"}); w.Name != "other" {
		t.Fatalf("name %q", w.Name)
	}
}

func TestAddressIndexKeys(t *testing.T) {
	s := NewStore()
	mk := func(uid, addr, network string) *Workload {
		w := mustWorkload(t, xdsWorkload(uid, addr, "n"))
		m := w.Meta()
		m.Network = network
		w.SetMeta(m)
		return w
	}
	s.Apply(Update{Workloads: []*Workload{mk("a", "10.0.0.1", ""), mk("b", "10.0.0.1", "west"), mk("c", "fd00::1", "")}})
	for _, tc := range []struct {
		addr NetworkAddr
		want string
	}{
		{NetworkAddr{Addr: netip.MustParseAddr("10.0.0.1")}, "a"},
		{NetworkAddr{Network: "west", Addr: netip.MustParseAddr("10.0.0.1")}, "b"},
		{NetworkAddr{Network: "east", Addr: netip.MustParseAddr("10.0.0.1")}, ""},
		{NetworkAddr{Addr: netip.MustParseAddr("::ffff:10.0.0.1")}, ""}, // as netip: not the same address
		{NetworkAddr{Addr: netip.MustParseAddr("fd00::1")}, "c"},
	} {
		got := ""
		if w := s.WorkloadByAddr(tc.addr); w != nil {
			got = w.UID
		}
		if got != tc.want {
			t.Errorf("%v: %q, want %q", tc.addr, got, tc.want)
		}
	}
	// A newer workload claiming an address takes it; the older one's
	// removal leaves it alone.
	s.Apply(Update{Workloads: []*Workload{mk("d", "10.0.0.1", "")}})
	s.Apply(Update{RemovedAddresses: []string{"a"}})
	if w := s.WorkloadByAddr(NetworkAddr{Addr: netip.MustParseAddr("10.0.0.1")}); w == nil || w.UID != "d" {
		t.Fatalf("address owner %v, want d", w)
	}
}

// Replacing and removing workloads keeps every index exact, and handles of
// removed workloads are reused.
func TestIndexesFollowReplacements(t *testing.T) {
	s := NewStore()
	svc := func(i int) string { return fmt.Sprintf("ns/svc-%d", i) }
	var ws []*Workload
	for i := range 200 {
		ws = append(ws, mustWorkload(t, xdsWorkload(fmt.Sprintf("w%03d", i), fmt.Sprintf("10.0.%d.%d", i/250, i%250+1), fmt.Sprintf("n%d", i%3), svc(i%4))))
	}
	s.Apply(Update{Workloads: ws})
	if got := len(s.Endpoints(svc(1))); got != 50 {
		t.Fatalf("%d endpoints, want 50", got)
	}
	// Move every workload to the next service and node, and a new address.
	var moved []*Workload
	for i := range 200 {
		moved = append(moved, mustWorkload(t, xdsWorkload(fmt.Sprintf("w%03d", i), fmt.Sprintf("10.1.%d.%d", i/250, i%250+1), fmt.Sprintf("n%d", (i+1)%3), svc((i+1)%4))))
	}
	ch := s.Apply(Update{Workloads: moved})
	if len(ch.Workloads) != 200 || len(ch.Services) != 4 {
		t.Fatalf("changes: %d workloads, %d services", len(ch.Workloads), len(ch.Services))
	}
	eps := s.Endpoints(svc(2))
	if len(eps) != 50 || eps[0].Workload.UID != "w001" || !slices.IsSortedFunc(eps, func(a, b Endpoint) int { return cmpStr(a.Workload.UID, b.Workload.UID) }) {
		t.Fatalf("endpoints of %s after the move: %d, first %s", svc(2), len(eps), eps[0].Workload.UID)
	}
	if w := s.WorkloadByAddr(NetworkAddr{Addr: netip.MustParseAddr("10.0.0.1")}); w != nil {
		t.Fatalf("old address still indexed: %s", w.UID)
	}
	if w := s.WorkloadByAddr(NetworkAddr{Addr: netip.MustParseAddr("10.1.0.1")}); w == nil || w.UID != "w000" {
		t.Fatalf("new address: %v", w)
	}
	if got := len(s.WorkloadsOnNode("n1")); got != 67 {
		t.Fatalf("%d workloads on n1, want 67", got)
	}
	// Workloads of one service share one Services slice.
	if a, b := s.Workload("w001"), s.Workload("w005"); &a.Services[0] != &b.Services[0] {
		t.Fatal("equal Services slices not shared")
	}
	var gone []string
	for i := 0; i < 200; i += 2 {
		gone = append(gone, fmt.Sprintf("w%03d", i))
	}
	s.Apply(Update{RemovedAddresses: gone})
	if n, _, _ := s.Counts(); n != 100 || len(s.free) != 100 {
		t.Fatalf("%d workloads, %d free handles", n, len(s.free))
	}
	s.Apply(Update{Workloads: []*Workload{mustWorkload(t, xdsWorkload("new", "10.2.0.1", "n0", svc(0)))}})
	if len(s.wl) != 200 {
		t.Fatalf("handle not reused: %d slots", len(s.wl))
	}
	total := 0
	for i := range 4 {
		total += len(s.Endpoints(svc(i)))
	}
	// The odd workloads left are in svc-0 and svc-2 only.
	if total != 101 || s.svcPorts.len() != 2 {
		t.Fatalf("%d endpoints, %d shared service lists", total, s.svcPorts.len())
	}
	if got := len(s.WorkloadsOnNode("n0")) + len(s.WorkloadsOnNode("n1")) + len(s.WorkloadsOnNode("n2")); got != 101 {
		t.Fatalf("%d workloads on nodes", got)
	}
}

func cmpStr(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func unsafeData(s string) *byte { return unsafe.StringData(s) }

// hashIndex against a map, with hashes that collide a lot (so that probes,
// runs and backward shifts are exercised) and workloads that hold several
// keys or lose theirs to another.
func TestHashIndexAgainstAMap(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	keysOf := map[wid][]int{} // the "workloads": which keys each holds
	var x hashIndex[int]
	x.holds = func(id wid, k int) bool { return slices.Contains(keysOf[id], k) }
	// Distinct hashes, but only 37 distinct slot positions.
	hash := func(k int) uint64 { return uint64(k)<<32 | uint64(k%37)*0x9e3779b9>>3 }
	want := map[int]wid{}
	for step := range 20000 {
		k, id := rng.IntN(500), wid(rng.IntN(300))
		switch rng.IntN(3) {
		case 0, 1: // id takes k
			if !slices.Contains(keysOf[id], k) {
				keysOf[id] = append(keysOf[id], k)
			}
			x.put(hash(k), k, id)
			want[k] = id
		case 2: // id drops k: only its own entry goes
			x.del(hash(k), k, id)
			if want[k] == id {
				delete(want, k)
			}
			keysOf[id] = slices.DeleteFunc(keysOf[id], func(v int) bool { return v == k })
		}
		if step%97 == 0 || step == 19999 {
			if x.len() != len(want) {
				t.Fatalf("step %d: %d entries, want %d", step, x.len(), len(want))
			}
			for k := range 500 {
				got, ok := x.get(hash(k), k)
				w, wok := want[k]
				if ok != wok || (ok && got != w) {
					t.Fatalf("step %d: key %d -> %d %v, want %d %v", step, k, got, ok, w, wok)
				}
			}
		}
	}
}

func TestServicesByHostname(t *testing.T) {
	s := NewStore()
	mk := func(ns string) *Service {
		svc, err := ConvertService(&workloadapi.Service{Name: "web", Namespace: ns, Hostname: "web.example.com"})
		if err != nil {
			t.Fatal(err)
		}
		return svc
	}
	s.Apply(Update{Services: []*Service{mk("b"), mk("a"), mk("a")}})
	var got []string
	for _, svc := range s.ServicesByHostname("web.example.com") {
		got = append(got, svc.Key())
	}
	if !slices.Equal(got, []string{"a/web.example.com", "b/web.example.com"}) {
		t.Fatalf("by hostname: %v", got)
	}
	s.Apply(Update{RemovedAddresses: []string{"a/web.example.com"}})
	if got := s.ServicesByHostname("web.example.com"); len(got) != 1 || got[0].Namespace != "b" {
		t.Fatalf("after removal: %v", got)
	}
	s.Apply(Update{RemovedAddresses: []string{"b/web.example.com"}})
	if got := s.ServicesByHostname("web.example.com"); len(got) != 0 || len(s.svcByHost) != 0 {
		t.Fatalf("after removing both: %v", got)
	}
}
