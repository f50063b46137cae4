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
// conversion, enforced by the destination's node proxy: on another node
// (always tunnelled) and on the same node (the policy sends same-node
// clients through the tunnel too).
func TestPrivilegedSimAuthorizationPolicy(t *testing.T) {
	c := startCluster(t)
	// A second identity in the mesh, on the other node: same node as
	// web-1, across from web-0.
	intruder := clientPod("demo", "intruder", "node-2")
	intruder.Spec.ServiceAccountName = "intruder"
	create(t, c,
		echoPod("demo", "web-0", "node-1", map[string]string{"app": "web"}),
		echoPod("demo", "web-1", "node-2", map[string]string{"app": "web"}),
		clientPod("demo", "client", "node-1"),
		intruder,
	)
	client, _ := c.Pod("demo", "client")
	other, _ := c.Pod("demo", "intruder")
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
