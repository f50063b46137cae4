package authz_test

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"istio.io/istio/pkg/workloadapi/security"

	"kmesh.dev/kmesh/ambient/authz"
	"kmesh.dev/kmesh/ambient/authz/authztest"
	"kmesh.dev/kmesh/ambient/identity/spiffe"
	"kmesh.dev/kmesh/ambient/state"
)

var (
	kNamespaces = []string{"shop", "web", "db"}
	kSAs        = []string{"default", "cart", "admin"}
	kPorts      = []uint32{80, 443, 8080, 9090}
)

func kpeers(r *rand.Rand) []authz.Peer {
	var out []authz.Peer
	for i := range 5 {
		p := authz.Peer{ID: uint32(i + 1),
			Addrs:    []netip.Addr{netip.AddrFrom4([4]byte{10, 244, 1, byte(10 + i)}), netip.AddrFrom16([16]byte{0xfd, 0, 15: byte(10 + i)})},
			Identity: &spiffe.Identity{TrustDomain: "cluster.local", Namespace: kNamespaces[r.IntN(3)], ServiceAccount: kSAs[r.IntN(3)]}}
		if i == 4 {
			p.Identity = nil // unknown: no verdict, its connections take the tunnel
		}
		out = append(out, p)
	}
	return out
}

// verdictFor is what a kernel entry says for a port.
func verdictFor(pv authz.PairVerdict, port uint16) bool {
	if slices.Contains(pv.Except, port) {
		return !pv.Allow
	}
	return pv.Allow
}

// TestKernelVerdictsEqualEvaluate: for random policies, every entry answers
// exactly what Evaluate answers, for the ports the policies may name and a
// thousand others (every port in trial 0); every
// source with an identity and an address of the family gets an entry.
func TestKernelVerdictsEqualEvaluate(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 14))
	var ips []netip.Addr
	for trial := range 200 {
		peers := kpeers(r)
		if ips == nil {
			for _, p := range peers {
				ips = append(ips, p.Addrs...)
			}
		}
		ps := authztest.RandPolicies(r, ips, kNamespaces, kSAs, kPorts)
		set := authz.Compile(ps)
		dst := peers[r.IntN(4)]
		if why := set.KernelReason(dst.Addrs); why != "" {
			t.Fatalf("trial %d: %s for a set the kernel can hold", trial, why)
		}
		got := set.KernelVerdicts(dst, peers)
		if len(got) != 8 { // 4 sources with identity x 2 families
			t.Fatalf("trial %d: %d verdicts, want 8: %+v", trial, len(got), got)
		}
		for _, pv := range got {
			src := peers[pv.Src-1]
			srcIP, dstIP := src.Addrs[0], dst.Addrs[0]
			if pv.V6 {
				srcIP, dstIP = src.Addrs[1], dst.Addrs[1]
			}
			n := 1024
			if trial == 0 {
				n = 65536
			}
			for i := range n + len(kPorts) {
				port := i
				if i >= n {
					port = int(kPorts[i-n])
				}
				want := set.Evaluate(authz.Conn{SrcIP: srcIP, DstIP: dstIP, DstPort: uint16(port), SrcIdentity: src.Identity}).Allow
				if verdictFor(pv, uint16(port)) != want {
					t.Fatalf("trial %d: %s -> %s:%d: kernel entry %+v says %v, Evaluate %v\npolicies %v", trial, srcIP, dstIP, port, pv, !want, want, ps)
				}
			}
		}
	}
}

func TestKernelReason(t *testing.T) {
	a := netip.MustParseAddr
	manyPorts := &security.Match{}
	for p := range uint32(17) {
		manyPorts.DestinationPorts = append(manyPorts.DestinationPorts, 1000+p)
	}
	pol := func(dry bool, m *security.Match) state.Policy {
		return state.Policy{Authorization: &security.Authorization{Name: "p", Namespace: "ns", Action: security.Action_ALLOW, DryRun: dry,
			Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{m}}}}}}}
	}
	dstIP := &security.Match{DestinationIps: []*security.Address{{Address: a("10.0.0.1").AsSlice(), Length: 32}}}
	for _, tc := range []struct {
		name  string
		ps    []state.Policy
		addrs []netip.Addr
		want  string
	}{
		{"no policies", nil, nil, ""},
		{"16 ports fit", []state.Policy{pol(false, &security.Match{DestinationPorts: manyPorts.DestinationPorts[:16]})}, nil, ""},
		{"17 ports do not", []state.Policy{pol(false, manyPorts)}, nil, authz.KernelTooManyPorts},
		{"dry run", []state.Policy{pol(true, &security.Match{DestinationPorts: []uint32{80}})}, nil, authz.KernelDryRun},
		{"destination IPs, one address per family", []state.Policy{pol(false, dstIP)}, []netip.Addr{a("10.0.0.1"), a("fd00::1")}, ""},
		{"destination IPs, two IPv4 addresses", []state.Policy{pol(false, dstIP)}, []netip.Addr{a("10.0.0.1"), a("10.0.0.2")}, authz.KernelDestinationAddresses},
		{"two IPv4 addresses, no destination IPs named", []state.Policy{pol(false, manyPorts)}[:0], []netip.Addr{a("10.0.0.1"), a("10.0.0.2")}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := authz.Compile(tc.ps).KernelReason(tc.addrs); got != tc.want {
				t.Errorf("KernelReason = %q, want %q", got, tc.want)
			}
		})
	}
}

// A source with two addresses of a family that the policies tell apart
// gets no verdict (the kernel does not know which one a socket uses); one
// whose addresses the policies treat alike gets one.
func TestKernelVerdictsAmbiguousSource(t *testing.T) {
	a := netip.MustParseAddr
	allowOne := state.Policy{Authorization: &security.Authorization{Name: "p", Namespace: "ns", Action: security.Action_ALLOW,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{SourceIps: []*security.Address{{Address: a("10.0.0.1").AsSlice(), Length: 32}}}}}}}}}}
	set := authz.Compile([]state.Policy{allowOne})
	id := &spiffe.Identity{TrustDomain: "cluster.local", Namespace: "ns", ServiceAccount: "sa"}
	dst := authz.Peer{ID: 9, Addrs: []netip.Addr{a("10.0.0.9")}}
	two := authz.Peer{ID: 1, Addrs: []netip.Addr{a("10.0.0.1"), a("10.0.0.2")}, Identity: id}
	alike := authz.Peer{ID: 2, Addrs: []netip.Addr{a("10.0.0.3"), a("10.0.0.4")}, Identity: id}
	got := set.KernelVerdicts(dst, []authz.Peer{two, alike})
	if len(got) != 1 || got[0].Src != 2 || got[0].Allow || len(got[0].Except) != 0 {
		t.Errorf("verdicts %+v, want only source 2, denied", got)
	}
}
