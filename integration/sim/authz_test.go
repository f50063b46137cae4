package sim_test

import (
	"context"
	"fmt"
	"testing"

	securityapi "istio.io/api/security/v1"
	typeapi "istio.io/api/type/v1beta1"
	securityclient "istio.io/client-go/pkg/apis/security/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// An AuthorizationPolicy as a user writes it, through Istio's own
// conversion, enforced by the destination's node proxy on another node
// (always tunnelled) and by the kernel at connect() on the same node (the
// source identity is the one the kernel attests).
func TestPrivilegedSimAuthorizationPolicy(t *testing.T) {
	c := startCluster(t)
	// A second identity in the mesh, on the other node: same node as
	// web-1, across from web-0.
	intruder := clientPod("demo", "intruder", "node-2")
	intruder.Spec.ServiceAccountName = "intruder"
	// The second identity on the same node as web-0 and the client.
	neighbour := clientPod("demo", "neighbour", "node-1")
	neighbour.Spec.ServiceAccountName = "intruder"
	create(t, c,
		echoPod("demo", "web-0", "node-1", map[string]string{"app": "web"}),
		echoPod("demo", "web-1", "node-2", map[string]string{"app": "web"}),
		clientPod("demo", "client", "node-1"),
		intruder, neighbour,
	)
	client, _ := c.Pod("demo", "client")
	other, _ := c.Pod("demo", "intruder")
	near, _ := c.Pod("demo", "neighbour")
	web0, _ := c.Pod("demo", "web-0")
	web0URL := "http://" + web0.IPs()[0].String() + ":8080/"
	stats := func() map[string]uint64 {
		t.Helper()
		m, done, err := c.Nodes[0].Maps()
		if err != nil {
			t.Fatal(err)
		}
		defer done()
		st, err := m.Stats()
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	eventually(t, "both backends", func() (bool, string) {
		return sameKeys(httpFrom(t, client, "http://10.96.0.10/", 40), "web-0", "web-1")
	})
	// Without policies the second identity is served (so its refusal
	// below is the policy's doing).
	eventually(t, "both backends from the second identity", func() (bool, string) {
		return sameKeys(httpFrom(t, other, "http://10.96.0.10/", 40), "web-0", "web-1")
	})
	policy := func(action securityapi.AuthorizationPolicy_Action, sa string) *securityclient.AuthorizationPolicy {
		return &securityclient.AuthorizationPolicy{
			ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "demo"},
			Spec: securityapi.AuthorizationPolicy{
				Selector: &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "web"}},
				Action:   action,
				Rules: []*securityapi.Rule{{From: []*securityapi.Rule_From{{Source: &securityapi.Source{
					Principals: []string{"cluster.local/ns/demo/sa/" + sa}}}}}},
			},
		}
	}
	aps := c.CP.Kube().Istio().SecurityV1().AuthorizationPolicies("demo")
	ctx := context.Background()

	// ALLOW only the client's identity: both backends still answer, now
	// both through the tunnel.
	if _, err := aps.Create(ctx, policy(securityapi.AuthorizationPolicy_ALLOW, "default"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "allowed by identity, same node and across", func() (bool, string) {
		return sameKeys(httpFrom(t, client, "http://10.96.0.10/", 40), "web-0", "web-1")
	})
	// On the same node the kernel authorizes it at connect() with the
	// client's identity (its enrolment): served, and not through the
	// tunnel (no connection sent to the node proxy).
	eventually(t, "same node: authorized in the kernel, not tunnelled", func() (bool, string) {
		before := stats()
		res := httpFrom(t, client, web0URL, 10)
		after := stats()
		return res.Names["web-0"] == 10 && after["authz_allow"]-before["authz_allow"] == 10 && after["tunnel"] == before["tunnel"],
			fmt.Sprintf("%+v, authz_allow +%d, tunnel +%d", res, after["authz_allow"]-before["authz_allow"], after["tunnel"]-before["tunnel"])
	})
	// The identity the ALLOW does not name, on the same node: its connect
	// is refused by the kernel, counted.
	eventually(t, "same node: another identity refused at connect", func() (bool, string) {
		before := stats()
		res := httpFrom(t, near, web0URL, 10)
		after := stats()
		return len(res.Names) == 0 && res.Errors["ECONNREFUSED"] == 10 && after["authz_deny"]-before["authz_deny"] == 10,
			fmt.Sprintf("%+v, authz_deny +%d", res, after["authz_deny"]-before["authz_deny"])
	})
	// Another identity, which the ALLOW does not name, is refused by both
	// backends (same node and across).
	eventually(t, "an identity the ALLOW does not name is refused", func() (bool, string) {
		res := httpFrom(t, other, "http://10.96.0.10/", 20)
		return len(res.Names) == 0 && res.Errors.Total() == 20, fmt.Sprintf("%+v", res)
	})
	// DENY the client's identity: nothing answers, on either node.
	if err := aps.Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := aps.Create(ctx, policy(securityapi.AuthorizationPolicy_DENY, "default"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "denied on both nodes", func() (bool, string) {
		res := httpFrom(t, client, "http://10.96.0.10/", 20)
		return len(res.Names) == 0 && res.Errors.Total() == 20, ""
	})
	// A DENY for another identity denies nothing.
	if err := aps.Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := aps.Create(ctx, policy(securityapi.AuthorizationPolicy_DENY, "someone-else"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "other identities' DENY lets the client through", func() (bool, string) {
		return sameKeys(httpFrom(t, client, "http://10.96.0.10/", 40), "web-0", "web-1")
	})
}
