package tunnel

import (
	"testing"

	"kmesh.dev/kmesh/ambient/state"
)

// A destination the control plane does not know is refused; when the
// control plane has the pod's address under another UID, the refusal says
// so, and names the CLUSTER_ID mismatch when that is what differs.
func TestUnknownDestination(t *testing.T) {
	at := func(uid string) *state.Workload { return &state.Workload{UID: uid} }
	for _, tc := range []struct {
		name, enrolledAs string
		atAddr           *state.Workload
		reason, msg      string
	}{
		{"nothing at the address", "c1//Pod/shop/cart", nil, reasonUnknownDst,
			`the destination workload "c1//Pod/shop/cart" is unknown to the control plane (just created, or not yet synced?)`},
		{"the same UID at the address (a lookup race)", "c1//Pod/shop/cart", at("c1//Pod/shop/cart"), reasonUnknownDst,
			`the destination workload "c1//Pod/shop/cart" is unknown to the control plane (just created, or not yet synced?)`},
		{"another cluster's UID", "Kubernetes//Pod/shop/cart", at("east//Pod/shop/cart"), reasonUIDMismatch,
			`the pod was enrolled as workload "Kubernetes//Pod/shop/cart" but the control plane has "east//Pod/shop/cart" at this address: ` +
				`the daemon's CLUSTER_ID "Kubernetes" differs from istiod's "east" (set CLUSTER_ID=east on the daemon)`},
		{"another workload, same cluster (address reuse)", "c1//Pod/shop/cart", at("c1//Pod/shop/old"), reasonUIDMismatch,
			`the pod was enrolled as workload "c1//Pod/shop/cart" but the control plane has "c1//Pod/shop/old" at this address`},
		{"a UID without a cluster", "cart", at("c1//Pod/shop/cart"), reasonUIDMismatch,
			`the pod was enrolled as workload "cart" but the control plane has "c1//Pod/shop/cart" at this address`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := unknownDestination(tc.enrolledAs, tc.atAddr)
			if r.status != 401 || r.reason != tc.reason || r.msg != tc.msg {
				t.Errorf("got %d %s %q\nwant 401 %s %q", r.status, r.reason, r.msg, tc.reason, tc.msg)
			}
		})
	}
}
