package e2e

import (
	"context"
	"fmt"
	"testing"

	istioapi "istio.io/api/networking/v1alpha3"
	istionet "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/podnet"
)

func expectOnly(t *testing.T, got podnet.Tally, want ...string) {
	t.Helper()
	if got.Total() == 0 {
		t.Fatalf("nothing answered")
	}
	allowed := map[string]bool{}
	for _, w := range want {
		allowed[w] = true
		if got[w] == 0 {
			t.Errorf("%s never answered: %v", w, got)
		}
	}
	for k := range got {
		if !allowed[k] {
			t.Errorf("unexpected answer from %s: %v", k, got)
		}
	}
}

// A Service and its pods as the real istiod describes them end up in the
// kernel, and every change to them reaches the kernel and the traffic.
func TestPrivilegedXDSServiceLifecycle(t *testing.T) {
	c := newCluster(t, bpf.MapSizes{})
	c.addPod("web-0", 11, "node-1", "web")
	c.addPod("web-1", 12, "node-1", "web")
	c.addPod("web-2", 13, "node-2", "web")
	c.startControlPlane()
	ctx := context.Background()
	svcs := c.core().Services(ns)
	if _, err := svcs.Create(ctx, webService(80, 8080, nil), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	c.startAgent()
	all := []string{"web-0:8080", "web-1:8080", "web-2:8080"}
	c.eventually("3 endpoints for 10.96.0.10:80", func() (bool, string) {
		n := c.slots("10.96.0.10", 80)
		return n == 3, fmt.Sprint(n)
	})
	res := c.run("tcp", "-addr", "10.96.0.10:80", "-n", "300", "-network", "tcp4")
	expectOnly(t, res.Names, all...)
	expectOnly(t, res.Peers, "10.96.0.10:80")

	t.Run("scale down to one and back", func(t *testing.T) {
		for _, p := range []string{"web-1", "web-2"} {
			if err := c.core().Pods(ns).Delete(ctx, p, metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		c.eventually("1 endpoint", func() (bool, string) { n := c.slots("10.96.0.10", 80); return n == 1, fmt.Sprint(n) })
		expectOnly(t, c.run("tcp", "-addr", "10.96.0.10:80", "-n", "50", "-network", "tcp4").Names, "web-0:8080")
		for name, node := range map[string]string{"web-1": "node-1", "web-2": "node-2"} {
			ip := c.pods[name].IPv4.String()
			if _, err := c.core().Pods(ns).Create(ctx, c.kubePod(name, ip, node, "web"), metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		c.eventually("3 endpoints again", func() (bool, string) { n := c.slots("10.96.0.10", 80); return n == 3, fmt.Sprint(n) })
		expectOnly(t, c.run("tcp", "-addr", "10.96.0.10:80", "-n", "300", "-network", "tcp4").Names, all...)
	})

	t.Run("port change", func(t *testing.T) {
		if _, err := svcs.Update(ctx, webService(81, 9090, nil), metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		c.eventually("port 81 in, port 80 out", func() (bool, string) {
			a, b := c.slots("10.96.0.10", 81), c.slots("10.96.0.10", 80)
			return a == 3 && b == -1, fmt.Sprint(a, b)
		})
		expectOnly(t, c.run("tcp", "-addr", "10.96.0.10:81", "-n", "300", "-network", "tcp4").Names, "web-0:9090", "web-1:9090", "web-2:9090")
		// The ClusterIP on a port its Service no longer has: refused in
		// the kernel (kmesh_vip), not sent off the node.
		expectOnly(t, c.run("tcp", "-addr", "10.96.0.10:80", "-n", "3", "-network", "tcp4").Errors, "ECONNREFUSED")
		if _, err := svcs.Update(ctx, webService(80, 8080, nil), metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		c.eventually("port 80 back", func() (bool, string) { n := c.slots("10.96.0.10", 80); return n == 3, fmt.Sprint(n) })
	})

	t.Run("ServiceEntry with a VIP", func(t *testing.T) {
		se := &istionet.ServiceEntry{
			ObjectMeta: metav1.ObjectMeta{Name: "api", Namespace: ns},
			Spec: istioapi.ServiceEntry{
				Hosts: []string{"api.example.com"}, Addresses: []string{"240.240.0.10"},
				Ports:            []*istioapi.ServicePort{{Number: 80, Name: "http", Protocol: "TCP", TargetPort: 8080}},
				Resolution:       istioapi.ServiceEntry_STATIC,
				WorkloadSelector: &istioapi.WorkloadSelector{Labels: map[string]string{"app": "web"}},
			},
		}
		if _, err := c.cp.Kube().Istio().NetworkingV1().ServiceEntries(ns).Create(ctx, se, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		c.eventually("ServiceEntry VIP in the kernel", func() (bool, string) { n := c.slots("240.240.0.10", 80); return n == 3, fmt.Sprint(n) })
		expectOnly(t, c.run("tcp", "-addr", "240.240.0.10:80", "-n", "300", "-network", "tcp4").Names, all...)
		// A ServiceEntry's address may be a real host's: other ports pass
		// untouched (here: no route).
		expectOnly(t, c.run("tcp", "-addr", "240.240.0.10:81", "-n", "3", "-network", "tcp4").Errors, "ENETUNREACH")
	})

	t.Run("internalTrafficPolicy Local", func(t *testing.T) {
		local := corev1.ServiceInternalTrafficPolicyLocal
		if _, err := svcs.Update(ctx, webService(80, 8080, func(s *corev1.Service) { s.Spec.InternalTrafficPolicy = &local }), metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		c.eventually("only node-1 endpoints", func() (bool, string) { n := c.slots("10.96.0.10", 80); return n == 2, fmt.Sprint(n) })
		expectOnly(t, c.run("tcp", "-addr", "10.96.0.10:80", "-n", "200", "-network", "tcp4").Names, "web-0:8080", "web-1:8080")
	})

	t.Run("trafficDistribution PreferClose", func(t *testing.T) {
		close := "PreferClose"
		if _, err := svcs.Update(ctx, webService(80, 8080, func(s *corev1.Service) { s.Spec.TrafficDistribution = &close }), metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		// All three are in the tables, web-2 (zone z2) in a worse rank.
		c.eventually("three endpoints in two ranks", func() (bool, string) { n := c.slots("10.96.0.10", 80); return n == 3, fmt.Sprint(n) })
		expectOnly(t, c.run("tcp", "-addr", "10.96.0.10:80", "-n", "200", "-network", "tcp4").Names, "web-0:8080", "web-1:8080")
		// Same-zone endpoints gone: traffic fails over to the other zone.
		for _, p := range []string{"web-0", "web-1"} {
			if err := c.core().Pods(ns).Delete(ctx, p, metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		c.eventually("one endpoint left", func() (bool, string) { n := c.slots("10.96.0.10", 80); return n == 1, fmt.Sprint(n) })
		expectOnly(t, c.run("tcp", "-addr", "10.96.0.10:80", "-n", "50", "-network", "tcp4").Names, "web-2:8080")
	})

	t.Run("service deleted", func(t *testing.T) {
		if err := svcs.Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		c.eventually("VIP gone from the kernel", func() (bool, string) { n := c.slots("10.96.0.10", 80); return n == -1, fmt.Sprint(n) })
		// No Service, no VIP: the address is nothing of Kmesh's and passes
		// untouched (kmesh_vip let go of it too).
		expectOnly(t, c.run("tcp", "-addr", "10.96.0.10:80", "-n", "3", "-network", "tcp4").Errors, "ENETUNREACH")
	})
}
