package dataplane_test

import (
	"math/rand/v2"
	"net/netip"
	"syscall"
	"testing"

	"kmesh.dev/kmesh/ambient/authz"
	"kmesh.dev/kmesh/ambient/authz/authztest"
	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/ambient/identity/spiffe"
	"kmesh.dev/kmesh/bpf"
)

// TestPrivilegedAuthzDifferential: the kernel's same-node authorization
// (decide() then authz_decide(), kmesh_decide.h, through BPF_PROG_RUN on
// the product's maps as the dataplane wrote them) answers exactly what
// ambient/authz's Evaluate answers -- the tunnel's inbound decision -- for
// random policies on random local workloads and random connections between
// them, by workload address and through a service VIP (whose target port
// is the port authorized). Policies change between rounds, so entries are
// rewritten and deleted under the same records.
func TestPrivilegedAuthzDifferential(t *testing.T) {
	here := dataplane.Topology{Node: "n1", Network: "net1"}
	e := newDecideEnv(t, here)
	r := rand.New(rand.NewPCG(14, 1))
	namespaces, sas := []string{"shop", "web", "db"}, []string{"default", "cart", "admin"}
	ports := []uint32{80, 443, 8080, 9090}
	const n = 6
	var ws []dataplane.Workload
	var ips []netip.Addr
	for i := range n {
		w := dataplane.Workload{UID: string(rune('a' + i)), Capacity: 1, Healthy: true, HBONE: true, Topology: here,
			Addrs:    []netip.Addr{netip.AddrFrom4([4]byte{10, 244, 1, byte(10 + i)}), netip.AddrFrom16([16]byte{0xfd, 0, 15: byte(10 + i)})},
			Identity: &spiffe.Identity{TrustDomain: "cluster.local", Namespace: namespaces[r.IntN(3)], ServiceAccount: sas[r.IntN(3)]}}
		ips = append(ips, w.Addrs...)
		ws = append(ws, w)
	}
	svc := dataplane.Service{Key: "ns/svc", VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.1")}, Ports: []dataplane.Port{{ServicePort: 80, TargetPort: 8080}}}
	var decided, denied, allowed int
	for round := range 20 {
		sets := make([]*authz.Set, n)
		for i := range ws {
			ws[i].Policies, ws[i].Authz = false, nil
			if r.IntN(4) > 0 {
				ps := authztest.RandPolicies(r, ips, namespaces, sas, ports)
				if len(ps) > 0 {
					sets[i] = authz.Compile(ps)
					ws[i].Policies, ws[i].Authz = true, sets[i]
				}
			}
		}
		svc.Endpoints = []dataplane.Endpoint{{WorkloadUID: ws[r.IntN(n)].UID}}
		if errs := e.dp.Apply(dataplane.Batch{Workloads: ws, Services: []dataplane.Service{svc}}); len(errs) > 0 {
			t.Fatal(errs)
		}
		ids := map[netip.Addr]uint32{}
		bes, err := e.maps.Backends()
		must(t, err)
		for _, b := range bes {
			ids[b.Addr4] = b.ID
		}
		for range 500 {
			si, di := r.IntN(n), r.IntN(n)
			src, dst := ws[si], ws[di]
			v6 := r.IntN(2) == 1
			fam := 0
			if v6 {
				fam = 1
			}
			port := uint16(ports[r.IntN(len(ports))])
			if r.IntN(4) == 0 {
				port = uint16(1 + r.IntN(65535))
			}
			to := netip.AddrPortFrom(dst.Addrs[fam], port)
			authzPort := port
			if r.IntN(5) == 0 { // through the service: the target port is authorized
				for i := range ws {
					if ws[i].UID == svc.Endpoints[0].WorkloadUID {
						di, dst = i, ws[i]
					}
				}
				fam, to, authzPort = 0, netip.AddrPortFrom(svc.VIPs[0], 80), 8080
			}
			k, err := e.dec.DecideFrom(ids[src.Addrs[0]], to, bpf.TCP, r.Uint32(), r.Uint32())
			must(t, err)
			want := bpf.PathDirect
			if sets[di] != nil {
				d := sets[di].Evaluate(authz.Conn{SrcIP: src.Addrs[fam], DstIP: dst.Addrs[fam], DstPort: authzPort, SrcIdentity: src.Identity})
				if !d.Allow {
					want = bpf.PathRefuse
				}
			}
			if k.Path != want || (want == bpf.PathRefuse) != (k.Err == syscall.ECONNREFUSED) || k.Backend != ids[dst.Addrs[0]] {
				t.Fatalf("round %d: %s (%v) -> %s (%s, policies %v): kernel %+v, want %s", round, src.UID, src.Identity, to, dst.UID, sets[di] != nil, k, want)
			}
			decided++
			if sets[di] != nil {
				if want == bpf.PathRefuse {
					denied++
				} else {
					allowed++
				}
			}
		}
	}
	// The random policies must exercise both answers, or the test proves little.
	if denied < 100 || allowed < 100 {
		t.Fatalf("%d decisions, %d denied and %d allowed by policies: too few of one kind", decided, denied, allowed)
	}
	t.Logf("%d decisions: %d denied, %d allowed by policies", decided, denied, allowed)
	st, err := e.maps.Stats()
	must(t, err)
	if st["authz_deny"] != uint64(denied) || st["authz_allow"] != uint64(allowed) || st["authz_no_entry"] != 0 {
		t.Errorf("counters %d denied, %d allowed, %d without entry; want %d, %d, 0", st["authz_deny"], st["authz_allow"], st["authz_no_entry"], denied, allowed)
	}
}

// An enrolled source whose workload the kernel has no entry for (unknown
// identity, or not yet known: id 0) takes the tunnel, counted, never the
// kernel path.
func TestPrivilegedAuthzNoEntryTunnels(t *testing.T) {
	here := dataplane.Topology{Node: "n1", Network: "net1"}
	e := newDecideEnv(t, here)
	a := netip.MustParseAddr
	dst := dataplane.Workload{UID: "dst", Capacity: 1, Healthy: true, HBONE: true, Topology: here, Addrs: []netip.Addr{a("10.244.1.1")},
		Identity: &spiffe.Identity{TrustDomain: "cluster.local", Namespace: "ns", ServiceAccount: "dst"}}
	anon := dataplane.Workload{UID: "anon", Capacity: 1, Healthy: true, HBONE: true, Topology: here, Addrs: []netip.Addr{a("10.244.1.2")}}
	dst.Policies, dst.Authz = true, authz.Compile(nil)
	must(t, joinErrs(e.dp.Apply(dataplane.Batch{Workloads: []dataplane.Workload{dst, anon}})))
	bes, _ := e.maps.Backends()
	var anonID uint32
	for _, b := range bes {
		if b.Addr4 == a("10.244.1.2") {
			anonID = b.ID
		}
	}
	for _, src := range []uint32{anonID, 999} { // (0 is the harness's "no source")
		k, err := e.dec.DecideFrom(src, netip.MustParseAddrPort("10.244.1.1:80"), bpf.TCP, 0, 0)
		must(t, err)
		if k.Path != bpf.PathTunnel || k.Err != 0 {
			t.Errorf("source %d: %+v, want the tunnel", src, k)
		}
	}
	if st, _ := e.maps.Stats(); st["authz_no_entry"] != 2 {
		t.Errorf("authz_no_entry = %d, want 2", st["authz_no_entry"])
	}
}

func joinErrs(errs []*dataplane.ObjectError) error {
	if len(errs) > 0 {
		return errs[0]
	}
	return nil
}
