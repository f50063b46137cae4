package tunnel

import (
	"fmt"
	"net/netip"
	"testing"

	securityapi "istio.io/istio/pkg/workloadapi/security"

	"kmesh.dev/kmesh/ambient/authz"
	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/ambient/identity/spiffe"
	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/integration/podnet"
)

// TestPrivilegedSameNodeAuthzAtConnect: real pods on one node, the real
// programs, the real proxy. The destination ("near") has STRICT plus an
// ALLOW policy; the same-node client ("sleep", enrolled) is authorized in
// its connect() with the identity its enrolment gives it and goes straight
// to the application -- no HBONE, not re-steered to 15006 -- while a pod
// outside the mesh is still steered to 15006 and refused, and a DENY of
// the client's principal fails its connect with ECONNREFUSED.
func TestPrivilegedSameNodeAuthzAtConnect(t *testing.T) {
	f := newTunnelFixture(t)
	near := netip.AddrPortFrom(f.near.IPv4, 9090)
	near6 := netip.AddrPortFrom(f.near.IPv6, 9090)
	stat := func(name string) uint64 {
		st, err := f.env.DP.Maps.Stats()
		if err != nil {
			t.Fatal(err)
		}
		return st[name]
	}
	ident := func(sa string) *spiffe.Identity {
		return &spiffe.Identity{TrustDomain: "cluster.local", Namespace: "app", ServiceAccount: sa}
	}
	policy := func(name string, action securityapi.Action, m *securityapi.Match) state.Policy {
		return state.Policy{Authorization: &securityapi.Authorization{Name: name, Namespace: "app", Scope: securityapi.Scope_NAMESPACE,
			Action: action, Groups: []*securityapi.Group{{Rules: []*securityapi.Rules{{Matches: []*securityapi.Match{m}}}}}}}
	}
	strict := policy("istio_converted_static_strict", securityapi.Action_DENY, &securityapi.Match{
		NotPrincipals: []*securityapi.StringMatch{{MatchType: &securityapi.StringMatch_Presence{}}}})
	principal := func(sa string) []*securityapi.StringMatch {
		return []*securityapi.StringMatch{{MatchType: &securityapi.StringMatch_Exact{Exact: "cluster.local/ns/app/sa/" + sa}}}
	}
	allowSleep := policy("allow-sleep", securityapi.Action_ALLOW, &securityapi.Match{Principals: principal("sleep")})
	denySleep := policy("deny-sleep", securityapi.Action_DENY, &securityapi.Match{Principals: principal("sleep")})
	// The daemon's reconciler does this from the store (PoliciesFor): the
	// tunnel's inbound side and the kernel get the same policies.
	setPolicies := func(t *testing.T, ps ...state.Policy) {
		t.Helper()
		f.dir.Apply(state.Update{Policies: ps})
		for _, uid := range []string{"sleep", "near"} {
			w := f.dir.Workload(uid)
			dw := dataplane.Workload{UID: uid, Addrs: w.Addresses, Capacity: 1, Healthy: true, HBONE: true,
				Topology: dataplane.Topology{Node: "n1"}, Identity: ident(uid)}
			if uid == "near" && len(ps) > 0 {
				dw.Policies, dw.Authz = true, authz.Compile(f.dir.PoliciesFor(w))
			}
			if err := f.dp.SetWorkload(dw); err != nil {
				t.Fatal(err)
			}
		}
	}
	clear := func() {
		var names []string
		for _, p := range []state.Policy{strict, allowSleep, denySleep} {
			names = append(names, p.Key())
		}
		f.dir.Apply(state.Update{RemovedPolicies: names})
		setPolicies(t)
	}
	from := func(t *testing.T, pod *podnet.Pod, dst netip.AddrPort, n int) podnet.ClientResult {
		t.Helper()
		var res podnet.ClientResult
		if err := pod.Helper(f.env.Cgroup, &res, "tcp", "-addr", dst.String(), "-n", fmt.Sprint(n)); err != nil {
			t.Fatal(err)
		}
		return res
	}

	t.Run("STRICT + ALLOW of the client: served in the kernel, no tunnel, not re-steered", func(t *testing.T) {
		defer clear()
		setPolicies(t, strict, allowSleep)
		hs := counter(t, f.proxy, "inbound", reasonDenied)
		allow, steered, authed, tunnel := stat("authz_allow"), stat("inbound_proxy"), stat("inbound_authed"), stat("tunnel")
		for _, dst := range []netip.AddrPort{near, near6} {
			if res := from(t, f.sleep, dst, 3); res.Names["near:9090"] != 3 {
				t.Fatalf("%s: the allowed same-node client was not served: %+v", dst, res)
			}
		}
		if got := stat("authz_allow") - allow; got != 6 {
			t.Errorf("authz_allow +%d, want 6", got)
		}
		if got := stat("inbound_authed") - authed; got != 6 {
			t.Errorf("inbound_authed +%d, want 6 (recognized at the destination)", got)
		}
		if stat("tunnel") != tunnel || stat("inbound_proxy") != steered || counter(t, f.proxy, "inbound", reasonDenied) != hs {
			t.Errorf("the proxy saw them: tunnel +%d, steered to 15006 +%d", stat("tunnel")-tunnel, stat("inbound_proxy")-steered)
		}
		// A pod outside the mesh is still held to STRICT at 15006.
		if res := from(t, f.outsider, near, 3); res.Names["near:9090"] != 0 {
			t.Fatalf("a plaintext connection from outside the mesh got through STRICT: %+v", res)
		}
		if got := stat("inbound_proxy") - steered; got != 3 {
			t.Errorf("%d outsider connections steered to 15006, want 3", got)
		}
	})

	t.Run("DENY of the client's principal: connect refused, counted", func(t *testing.T) {
		defer clear()
		setPolicies(t, strict, denySleep)
		deny, tunnel := stat("authz_deny"), stat("tunnel")
		res := from(t, f.sleep, near, 3)
		if res.Names["near:9090"] != 0 || res.Errors.Total() != 3 {
			t.Fatalf("the denied client was served: %+v", res)
		}
		if res.Errors["ECONNREFUSED"] != 3 {
			t.Errorf("errors %+v, want 3 ECONNREFUSED", res.Errors)
		}
		if got := stat("authz_deny") - deny; got != 3 {
			t.Errorf("authz_deny +%d, want 3", got)
		}
		if stat("tunnel") != tunnel {
			t.Error("a denied connection went to the tunnel")
		}
	})

	t.Run("ALLOW of another principal: refused (allow policies exist, none allowed)", func(t *testing.T) {
		defer clear()
		setPolicies(t, policy("allow-echo", securityapi.Action_ALLOW, &securityapi.Match{Principals: principal("echo")}))
		if res := from(t, f.sleep, near, 3); res.Names["near:9090"] != 0 {
			t.Fatalf("served: %+v", res)
		}
	})
}
