package sim_test

import (
	"context"
	"fmt"
	"testing"

	securityapi "istio.io/api/security/v1"
	securitybeta "istio.io/api/security/v1beta1"
	securityclient "istio.io/client-go/pkg/apis/security/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// A pod outside the mesh dials ambient pods' IPs directly, on the same node
// and across nodes, with Kmesh's own enrolment (no iptables anywhere):
// served with no policy, refused under a STRICT PeerAuthentication and under
// a DENY of other namespaces, both as users write them and through Istio's
// own conversion; the ambient client keeps reaching both through the VIP.
func TestPrivilegedSimStrictInbound(t *testing.T) {
	c := startCluster(t)
	create(t, c,
		echoPod("demo", "web-0", "node-1", map[string]string{"app": "web"}),
		echoPod("demo", "web-1", "node-2", map[string]string{"app": "web"}),
		clientPod("demo", "client", "node-1"),
		clientPod("legacy", "outsider", "node-1"),
	)
	client, _ := c.Pod("demo", "client")
	outsider, _ := c.Pod("legacy", "outsider")
	web0, _ := c.Pod("demo", "web-0")
	web1, _ := c.Pod("demo", "web-1")
	direct := func() (int, int) {
		served, refused := 0, 0
		for _, w := range []string{web0.Net.IPv4.String(), web1.Net.IPv4.String()} {
			res := httpFrom(t, outsider, fmt.Sprintf("http://%s:8080/", w), 3)
			served += res.Names.Total()
			refused += res.Errors.Total()
		}
		return served, refused
	}
	eventually(t, "the mesh works and the outsider is served with no policy", func() (bool, string) {
		ok, msg := sameKeys(httpFrom(t, client, "http://10.96.0.10/", 40), "web-0", "web-1")
		if served, _ := direct(); !ok || served != 6 {
			return false, fmt.Sprintf("%s; outsider served %d of 6", msg, served)
		}
		return true, ""
	})
	ctx := context.Background()
	pas := c.CP.Kube().Istio().SecurityV1().PeerAuthentications("demo")
	strict := &securityclient.PeerAuthentication{ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: "demo"},
		Spec: securityapi.PeerAuthentication{Mtls: &securitybeta.PeerAuthentication_MutualTLS{Mode: securitybeta.PeerAuthentication_MutualTLS_STRICT}}}
	if _, err := pas.Create(ctx, strict, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "STRICT: plaintext refused on both nodes, mTLS served", func() (bool, string) {
		if served, refused := direct(); served != 0 || refused != 6 {
			return false, fmt.Sprintf("outsider served %d, refused %d", served, refused)
		}
		return sameKeys(httpFrom(t, client, "http://10.96.0.10/", 40), "web-0", "web-1")
	})
	if err := pas.Delete(ctx, "default", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	aps := c.CP.Kube().Istio().SecurityV1().AuthorizationPolicies("demo")
	deny := &securityclient.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "only-demo", Namespace: "demo"},
		Spec: securityapi.AuthorizationPolicy{Action: securityapi.AuthorizationPolicy_DENY,
			Rules: []*securityapi.Rule{{From: []*securityapi.Rule_From{{Source: &securityapi.Source{NotNamespaces: []string{"demo"}}}}}}}}
	if _, err := aps.Create(ctx, deny, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "DENY of other namespaces: plaintext refused, the mesh served", func() (bool, string) {
		if served, refused := direct(); served != 0 || refused != 6 {
			return false, fmt.Sprintf("outsider served %d, refused %d", served, refused)
		}
		return sameKeys(httpFrom(t, client, "http://10.96.0.10/", 40), "web-0", "web-1")
	})
	if err := aps.Delete(ctx, "only-demo", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "no policy: the outsider is served again", func() (bool, string) {
		served, _ := direct()
		return served == 6, fmt.Sprintf("outsider served %d of 6", served)
	})
}
