package tunnel

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	securityapi "istio.io/istio/pkg/workloadapi/security"

	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/integration/podnet"
)

// TestPrivilegedInboundEnforcement: a pod outside the mesh dials an
// enrolled pod's IP directly, with no iptables anywhere. The kernel's
// inbound enforcement (sk_lookup in the enrolled pod's namespace) must put
// the connection in front of the destination's policies when it has any,
// and leave it alone (the zero-cost path) when it has none.
func TestPrivilegedInboundEnforcement(t *testing.T) {
	f := newTunnelFixture(t)
	near := netip.AddrPortFrom(f.near.IPv4, 9090)
	near6 := netip.AddrPortFrom(f.near.IPv6, 9090)
	from := func(t *testing.T, pod *podnet.Pod, dst netip.AddrPort, n int) podnet.ClientResult {
		t.Helper()
		var res podnet.ClientResult
		if err := pod.Helper(f.env.Cgroup, &res, "tcp", "-addr", dst.String(), "-n", fmt.Sprint(n)); err != nil {
			t.Fatal(err)
		}
		return res
	}
	stat := func(name string) uint64 {
		st, err := f.env.DP.Maps.Stats()
		if err != nil {
			t.Fatal(err)
		}
		return st[name]
	}
	setPolicies := func(t *testing.T, on bool) {
		t.Helper()
		w := f.dir.Workload("near")
		if err := f.dp.SetWorkload(dataplane.Workload{UID: "near", Addrs: w.Addresses, Capacity: 1, Healthy: true, HBONE: true,
			Policies: on, Topology: dataplane.Topology{Node: "n1"}}); err != nil {
			t.Fatal(err)
		}
	}
	policy := func(name string, action securityapi.Action, m *securityapi.Match) state.Policy {
		return state.Policy{Authorization: &securityapi.Authorization{Name: name, Namespace: "app", Scope: securityapi.Scope_NAMESPACE,
			Action: action, Groups: []*securityapi.Group{{Rules: []*securityapi.Rules{{Matches: []*securityapi.Match{m}}}}}}}
	}
	outsiderIP := &securityapi.Address{Address: f.outsider.IPv4.AsSlice(), Length: 32}

	t.Run("no policies: served directly, the proxy never sees it", func(t *testing.T) {
		before := stat("inbound_proxy")
		if res := from(t, f.outsider, near, 5); res.Names["near:9090"] != 5 {
			t.Fatalf("%+v", res)
		}
		if got := stat("inbound_proxy"); got != before {
			t.Fatalf("%d connections steered to the proxy, want none", got-before)
		}
	})

	t.Run("STRICT (no identity is refused): refused, counted", func(t *testing.T) {
		// istiod turns STRICT PeerAuthentication into a DENY of requests
		// without a principal: notPrincipals ["*"].
		strict := policy("istio_converted_static_strict", securityapi.Action_DENY, &securityapi.Match{
			NotPrincipals: []*securityapi.StringMatch{{MatchType: &securityapi.StringMatch_Presence{}}}})
		f.dir.Apply(state.Update{Policies: []state.Policy{strict}})
		defer f.dir.Apply(state.Update{RemovedPolicies: []string{"app/istio_converted_static_strict"}})
		setPolicies(t, true)
		defer setPolicies(t, false)
		steered, denied := stat("inbound_proxy"), counter(t, f.proxy, "inbound_plaintext", reasonDenied)
		for _, dst := range []netip.AddrPort{near, near6} {
			if res := from(t, f.outsider, dst, 3); res.Names["near:9090"] != 0 || res.Errors.Total() != 3 {
				t.Fatalf("%s: a plaintext connection got through STRICT: %+v", dst, res)
			}
		}
		if got := stat("inbound_proxy") - steered; got != 6 {
			t.Errorf("%d connections steered to 15006, want 6", got)
		}
		if got := counter(t, f.proxy, "inbound_plaintext", reasonDenied) - denied; got != 6 {
			t.Errorf("%v refusals counted, want 6", got)
		}
		// An ambient client on the same node keeps working: its
		// connection takes HBONE (15008), with its identity.
		var res podnet.ClientResult
		f.run(t, &res, "tcp", "-addr", near.String(), "-n", "3")
		if res.Names["near:9090"] != 3 {
			t.Fatalf("the ambient client was refused under STRICT: %+v", res)
		}
	})

	t.Run("DENY from its address: refused; ALLOW of another: refused; ALLOW of it: served", func(t *testing.T) {
		setPolicies(t, true)
		defer setPolicies(t, false)
		deny := policy("deny-outsider", securityapi.Action_DENY, &securityapi.Match{SourceIps: []*securityapi.Address{outsiderIP}})
		f.dir.Apply(state.Update{Policies: []state.Policy{deny}})
		if res := from(t, f.outsider, near, 3); res.Names["near:9090"] != 0 {
			t.Fatalf("denied source served: %+v", res)
		}
		other := &securityapi.Address{Address: netip.MustParseAddr("10.244.1.99").AsSlice(), Length: 32}
		f.dir.Apply(state.Update{RemovedPolicies: []string{"app/deny-outsider"},
			Policies: []state.Policy{policy("allow-other", securityapi.Action_ALLOW, &securityapi.Match{SourceIps: []*securityapi.Address{other}})}})
		if res := from(t, f.outsider, near, 3); res.Names["near:9090"] != 0 {
			t.Fatalf("a source the ALLOW policy does not name was served: %+v", res)
		}
		f.dir.Apply(state.Update{RemovedPolicies: []string{"app/allow-other"},
			Policies: []state.Policy{policy("allow-outsider", securityapi.Action_ALLOW, &securityapi.Match{SourceIps: []*securityapi.Address{outsiderIP}})}})
		defer f.dir.Apply(state.Update{RemovedPolicies: []string{"app/allow-outsider"}})
		steered := stat("inbound_proxy")
		if res := from(t, f.outsider, near, 4); res.Names["near:9090"] != 4 {
			t.Fatalf("the allowed source was refused: %+v", res)
		}
		if got := stat("inbound_proxy") - steered; got != 4 {
			t.Errorf("%d connections went through the proxy, want 4", got)
		}
	})

	t.Run("unknown destination: refused by the proxy", func(t *testing.T) {
		w := f.dir.Workload("near")
		f.dir.Apply(state.Update{RemovedAddresses: []string{"near"}})
		defer func() {
			f.dir.Apply(state.Update{Workloads: []*state.Workload{w}})
			setPolicies(t, false)
		}()
		if err := f.dp.DeleteWorkload("near"); err != nil {
			t.Fatal(err)
		}
		before := counter(t, f.proxy, "inbound_plaintext", reasonUnknownDst)
		if res := from(t, f.outsider, near, 2); res.Names["near:9090"] != 0 {
			t.Fatalf("a destination the control plane does not know was served: %+v", res)
		}
		if got := counter(t, f.proxy, "inbound_plaintext", reasonUnknownDst) - before; got != 2 {
			t.Errorf("%v unknown-destination refusals counted, want 2", got)
		}
	})

	t.Run("mismatched workload UID (CLUSTER_ID): refused, the log names both", func(t *testing.T) {
		// The daemon enrolled the pod as "near" (its CLUSTER_ID's UID);
		// istiod sends the same pod under its own cluster's UID.
		w := f.dir.Workload("near")
		theirs := *w
		theirs.UID = "Kubernetes//Pod/app/near"
		f.dir.Apply(state.Update{RemovedAddresses: []string{"near"}, Workloads: []*state.Workload{&theirs}})
		if err := f.dp.DeleteWorkload("near"); err != nil {
			t.Fatal(err)
		}
		if err := f.dp.SetWorkload(dataplane.Workload{UID: theirs.UID, Addrs: w.Addresses, Capacity: 1, Healthy: true, HBONE: true,
			Policies: true, Topology: dataplane.Topology{Node: "n1"}}); err != nil {
			t.Fatal(err)
		}
		defer func() {
			f.dir.Apply(state.Update{RemovedAddresses: []string{theirs.UID}, Workloads: []*state.Workload{w}})
			_ = f.dp.DeleteWorkload(theirs.UID)
			setPolicies(t, false)
		}()
		before := counter(t, f.proxy, "inbound_plaintext", reasonUIDMismatch)
		if res := from(t, f.outsider, near, 2); res.Names["near:9090"] != 0 {
			t.Fatalf("a pod whose workload UID does not match was served: %+v", res)
		}
		if got := counter(t, f.proxy, "inbound_plaintext", reasonUIDMismatch) - before; got != 2 {
			t.Errorf("%v mismatch refusals counted, want 2", got)
		}
		if want := `enrolled as workload \"near\" but the control plane has \"Kubernetes//Pod/app/near\" at this address`; !strings.Contains(f.logs.String(), want) {
			t.Errorf("the log does not name the cause (%s):\n%s", want, f.logs.String())
		}
	})
}
