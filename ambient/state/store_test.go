package state

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"istio.io/istio/pkg/workloadapi"
	"istio.io/istio/pkg/workloadapi/security"
)

func ip(s string) []byte { return netip.MustParseAddr(s).AsSlice() }

func xdsWorkload(uid, addr, node string, services ...string) *workloadapi.Workload {
	w := &workloadapi.Workload{Uid: uid, Name: uid, Namespace: "default", Addresses: [][]byte{ip(addr)}, Node: node,
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE, Services: map[string]*workloadapi.PortList{}}
	for _, s := range services {
		w.Services[s] = &workloadapi.PortList{Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}
	}
	return w
}

func mustWorkload(t *testing.T, w *workloadapi.Workload) *Workload {
	t.Helper()
	c, err := ConvertWorkload(w)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func keys(m map[string]struct{}) []string {
	return slices.Sorted(func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	})
}

func TestConvertValidation(t *testing.T) {
	for _, tc := range []struct {
		name string
		conv func() error
		want string
	}{
		{"workload without uid", func() error { _, err := ConvertWorkload(&workloadapi.Workload{Name: "x"}); return err }, "without uid"},
		{"bad workload address", func() error {
			_, err := ConvertWorkload(&workloadapi.Workload{Uid: "u", Addresses: [][]byte{{1, 2, 3}}})
			return err
		}, "address 0: address of 3 bytes"},
		{"bad target port", func() error {
			w := xdsWorkload("u", "10.0.0.1", "n")
			w.Services["ns/h"] = &workloadapi.PortList{Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 70000}}}
			_, err := ConvertWorkload(w)
			return err
		}, "target port 70000"},
		{"bad service VIP", func() error {
			_, err := ConvertService(&workloadapi.Service{Namespace: "ns", Hostname: "h", Addresses: []*workloadapi.NetworkAddress{{Address: []byte{1}}}})
			return err
		}, "service ns/h: address 0"},
		{"service without hostname", func() error { _, err := ConvertService(&workloadapi.Service{Namespace: "ns"}); return err }, "without namespace or hostname"},
		{"policy prefix too long", func() error {
			_, err := ConvertPolicy(&security.Authorization{Name: "p", Namespace: "ns", Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{SourceIps: []*security.Address{{Address: ip("10.0.0.0"), Length: 40}}}}}}}}})
			return err
		}, "prefix /40"},
		{"policy with an unknown action", func() error {
			_, err := ConvertPolicy(&security.Authorization{Name: "p", Namespace: "ns", Action: security.Action(7)})
			return err
		}, "unknown action 7"},
		{"policy with an unknown scope", func() error {
			_, err := ConvertPolicy(&security.Authorization{Name: "p", Namespace: "ns", Scope: security.Scope(9)})
			return err
		}, "unknown scope 9"},
		{"policy with a field this daemon does not know", func() error {
			m := &security.Match{}
			// Field 99, varint 1: what a newer istiod's match condition looks like to us.
			m.ProtoReflect().SetUnknown(protowire.AppendVarint(protowire.AppendTag(nil, 99, protowire.VarintType), 1))
			_, err := ConvertPolicy(&security.Authorization{Name: "p", Namespace: "ns", Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{m}}}}}})
			return err
		}, "policy.groups[0].rules[0].matches[0]"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.conv()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one mentioning %q", err, tc.want)
			}
		})
	}
	w := mustWorkload(t, &workloadapi.Workload{Uid: "u", Addresses: [][]byte{netip.MustParseAddr("::ffff:10.0.0.1").AsSlice()}, Capacity: wrapperspb.UInt32(0)})
	if w.Addresses[0] != netip.MustParseAddr("10.0.0.1") || w.Capacity != 0 || w.Meta().ServiceAccount != "default" || w.Meta().TrustDomain != "cluster.local" {
		t.Fatalf("conversion defaults wrong: %+v", w)
	}
	if w := mustWorkload(t, &workloadapi.Workload{Uid: "u"}); w.Capacity != 1 {
		t.Fatalf("unset capacity must be 1, got %d", w.Capacity)
	}
}

func TestStoreIndexesAndChanges(t *testing.T) {
	s := NewStore()
	svc, err := ConvertService(&workloadapi.Service{Name: "web", Namespace: "default", Hostname: "web.default.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: ip("10.96.0.1")}}, Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}})
	if err != nil {
		t.Fatal(err)
	}
	key := "default/web.default.svc.cluster.local"
	a := mustWorkload(t, xdsWorkload("a", "10.0.0.1", "n1", key))
	b := mustWorkload(t, xdsWorkload("b", "10.0.0.2", "n2", key))

	// A workload may arrive before its service: its endpoint is indexed anyway.
	ch := s.Apply(Update{Workloads: []*Workload{a}})
	if got := keys(ch.Services); !slices.Equal(got, []string{key}) {
		t.Fatalf("changed services %v", got)
	}
	ch = s.Apply(Update{Services: []*Service{svc}, Workloads: []*Workload{b}})
	if got := keys(ch.Workloads); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("changed workloads %v", got)
	}
	if eps := s.Endpoints(key); len(eps) != 2 || eps[0].Workload.UID != "a" || eps[0].Ports[0].TargetPort != 8080 {
		t.Fatalf("endpoints %+v", eps)
	}
	if got := s.ServiceByVIP(NetworkAddr{Addr: netip.MustParseAddr("10.96.0.1")}); got == nil || got.Key() != key {
		t.Fatalf("by VIP: %v", got)
	}
	if got := s.WorkloadByAddr(NetworkAddr{Addr: netip.MustParseAddr("10.0.0.2")}); got == nil || got.UID != "b" {
		t.Fatalf("by address: %v", got)
	}
	if got := s.WorkloadsOnNode("n1"); len(got) != 1 || got[0].UID != "a" {
		t.Fatalf("on node: %v", got)
	}

	// Re-sending identical objects changes nothing.
	if ch := s.Apply(Update{Workloads: []*Workload{mustWorkload(t, xdsWorkload("a", "10.0.0.1", "n1", key))}, Services: []*Service{svc}}); !ch.Empty() {
		t.Fatalf("identical update reported changes: %+v", ch)
	}

	// Moving a to another address re-indexes it and touches its service.
	a2 := mustWorkload(t, xdsWorkload("a", "10.0.0.9", "n1", key))
	ch = s.Apply(Update{Workloads: []*Workload{a2}})
	if s.WorkloadByAddr(NetworkAddr{Addr: netip.MustParseAddr("10.0.0.1")}) != nil {
		t.Fatal("old address still indexed")
	}
	if _, ok := ch.Services[key]; !ok {
		t.Fatal("service of a changed workload not reported")
	}

	// Removal by resource name: a UID, then a service key.
	ch = s.Apply(Update{RemovedAddresses: []string{"b", key, "unknown"}})
	if got := keys(ch.Workloads); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("removed workloads %v", got)
	}
	if s.Service(key) != nil || len(s.Endpoints(key)) != 1 {
		t.Fatalf("after removal: service %v, endpoints %v", s.Service(key), s.Endpoints(key))
	}
}

func TestPolicyScopes(t *testing.T) {
	s := NewStore()
	mk := func(name, ns string, scope security.Scope) Policy {
		p, err := ConvertPolicy(&security.Authorization{Name: name, Namespace: ns, Scope: scope})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	s.Apply(Update{Policies: []Policy{
		mk("global", "istio-system", security.Scope_GLOBAL),
		mk("ns", "default", security.Scope_NAMESPACE),
		mk("other", "other", security.Scope_NAMESPACE),
		mk("selected", "default", security.Scope_WORKLOAD_SELECTOR),
		mk("unselected", "default", security.Scope_WORKLOAD_SELECTOR),
	}})
	w := mustWorkload(t, xdsWorkload("a", "10.0.0.1", "n"))
	w.AuthorizationPolicies = []string{"default/selected"}
	var got []string
	for _, p := range s.PoliciesFor(w) {
		got = append(got, p.Key())
	}
	if want := []string{"default/ns", "default/selected", "istio-system/global"}; !slices.Equal(got, want) {
		t.Fatalf("policies %v, want %v", got, want)
	}
	if ch := s.Apply(Update{RemovedPolicies: []string{"default/ns"}}); len(ch.Policies) != 1 {
		t.Fatalf("removal not reported: %+v", ch)
	}
}
