package cluster_test

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	securityapi "istio.io/api/security/v1"
	typeapi "istio.io/api/type/v1beta1"
	securityclient "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/integration/sim"
)

// The shop: namespace shop in the mesh (ambient), Service web with a pod
// on each node, a client beside web-1 and a second identity (intruder)
// beside web-2; namespace outside, not in the mesh, with a pod on node-1.
const appImage = "kmesh.dev/test/app:latest" // this test binary; KMESH_PODNET_HELPER picks the app

var shopOnce struct {
	sync.Once
	err error
	vip string
}

// appPod runs a built-in app of this binary (podnet helpers: Istio's echo
// server, sleep) with args; the scheduler places it on node (its node
// selector).
func appPod(ns, name, node, sa string, labels map[string]string, app string, args ...string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
		Spec: corev1.PodSpec{NodeSelector: map[string]string{"kubernetes.io/hostname": node}, ServiceAccountName: sa,
			Containers: []corev1.Container{{Name: "app", Image: appImage, Command: []string{app}, Args: args,
				Env: []corev1.EnvVar{{Name: "KMESH_PODNET_HELPER", Value: app}}}}},
	}
}

// theShop creates the shop once and waits for its pods.
func theShop(t *testing.T) (*sim.Cluster, string) {
	t.Helper()
	c := installed(t)
	kube := shared.cp.Kube
	shopOnce.Do(func() {
		ctx := context.Background()
		for _, ns := range []*corev1.Namespace{
			{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}},
			{ObjectMeta: metav1.ObjectMeta{Name: "outside"}},
		} {
			if _, err := kube.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
				shopOnce.err = err
				return
			}
		}
		for _, sa := range []struct{ ns, name string }{{"shop", "web"}, {"shop", "client"}, {"shop", "intruder"}, {"outside", "outsider"}} {
			if _, err := kube.CoreV1().ServiceAccounts(sa.ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa.name}}, metav1.CreateOptions{}); err != nil {
				shopOnce.err = err
				return
			}
		}
		svc, err := kube.CoreV1().Services("shop").Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "web"},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}, {Name: "tcp", Port: 90, TargetPort: intstr.FromInt32(9090)}}},
		}, metav1.CreateOptions{})
		if err != nil {
			shopOnce.err = err
			return
		}
		shopOnce.vip = svc.Spec.ClusterIP
		web := map[string]string{"app": "web"}
		for _, p := range []*corev1.Pod{
			appPod("shop", "web-1", "node-1", "web", web, "echo", "-http", "8080", "-tcp", "9090"),
			appPod("shop", "web-2", "node-2", "web", web, "echo", "-http", "8080", "-tcp", "9090"),
			appPod("shop", "client", "node-1", "client", nil, "sleep"),
			appPod("shop", "intruder", "node-2", "intruder", nil, "sleep"),
			appPod("outside", "outsider", "node-1", "outsider", nil, "sleep"),
		} {
			if _, err := kube.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{}); err != nil {
				shopOnce.err = err
				return
			}
		}
		for _, p := range []struct{ ns, name string }{{"shop", "web-1"}, {"shop", "web-2"}, {"shop", "client"}, {"shop", "intruder"}, {"outside", "outsider"}} {
			if err := waitReady(p.ns, p.name, 60*time.Second); err != nil {
				shopOnce.err = err
				return
			}
		}
	})
	if shopOnce.err != nil {
		dumpPods(t)
		t.Fatalf("the shop: %v", shopOnce.err)
	}
	return c, shopOnce.vip
}

// meshPod is a running pod of the shop, as the tests use it.
type meshPod struct {
	node         *sim.Node
	ns, name, ip string
}

// Helper runs a client helper (integration/podnet) inside the pod, as
// `kubectl exec` does (the simulated kubelet enters the container's
// namespaces and cgroup): this binary, the pod's image, re-executed.
func (p *meshPod) Helper(out any, helper string, args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	argv := append([]string{"env", "KMESH_PODNET_HELPER=" + helper, "/.kmesh-sim/" + filepath.Base(mesh.self)}, args...)
	var b []byte
	var err error
	for i := 0; ; i++ {
		b, err = p.node.Exec(ctx, p.ns, p.name, "", argv...)
		// A container without a readiness probe is Ready as soon as its
		// process starts, which may be before its root is built: the
		// program is not there yet for a moment.
		if err == nil || i == 50 || !strings.Contains(string(b), "No such file or directory") {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("exec in %s/%s: %w: %s", p.ns, p.name, err, b)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), out); err != nil {
		return fmt.Errorf("helper %s in %s/%s: %w: %s", helper, p.ns, p.name, err, b)
	}
	return nil
}

func pod(t *testing.T, c *sim.Cluster, ns, name string) *meshPod {
	t.Helper()
	p, err := shared.cp.Kube.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n := c.Node(p.Spec.NodeName)
	if n == nil || p.Status.PodIP == "" {
		t.Fatalf("pod %s/%s: node %q, IP %q", ns, name, p.Spec.NodeName, p.Status.PodIP)
	}
	return &meshPod{node: n, ns: ns, name: name, ip: p.Status.PodIP}
}

// waitReady waits for a pod to be Ready (its containers run).
func waitReady(ns, name string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		p, err := shared.cp.Kube.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err == nil && ready(*p) {
			return nil
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = fmt.Errorf("phase %s, conditions %v", p.Status.Phase, p.Status.Conditions)
			}
			return fmt.Errorf("pod %s/%s not ready after %s: %v", ns, name, timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func httpFrom(t *testing.T, p *meshPod, url string, n int) podnet.ClientResult {
	t.Helper()
	var res podnet.ClientResult
	if err := p.Helper(&res, "http", "-url", url, "-n", fmt.Sprint(n), "-timeout", "2s"); err != nil {
		t.Fatal(err)
	}
	return res
}

// eventually retries cond for up to a minute (the mesh converges: xDS
// pushes, enrolment, certificates).
func eventually(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	last := ""
	for time.Now().Before(deadline) {
		ok, s := cond()
		if ok {
			return
		}
		last = s
		time.Sleep(200 * time.Millisecond)
	}
	dumpPods(t)
	t.Fatalf("timed out waiting for %s; last: %s", what, last)
}

func only(res podnet.ClientResult, want ...string) (bool, string) {
	if len(res.Errors) > 0 || len(res.Names) != len(want) {
		return false, fmt.Sprintf("names %v errors %v", res.Names, res.Errors)
	}
	for _, w := range want {
		if res.Names[w] == 0 {
			return false, fmt.Sprintf("names %v", res.Names)
		}
	}
	return true, ""
}

func refused(res podnet.ClientResult, n int) (bool, string) {
	return res.Errors.Total() == n && len(res.Names) == 0, fmt.Sprintf("names %v errors %v", res.Names, res.Errors)
}

// ztunnelOn finds the kmesh-daemon pod (DaemonSet ztunnel) on a node.
func ztunnelOn(t *testing.T, node string) corev1.Pod {
	t.Helper()
	for _, p := range podsOf(t, "ztunnel-") {
		if p.Spec.NodeName == node && ready(p) {
			return p
		}
	}
	t.Fatalf("no ready ztunnel pod on %s", node)
	return corev1.Pod{}
}

// TestPrivilegedClusterTraffic: on the installed mesh, the shop's service
// answers from both backends; a pod on the same node is reached through
// the kernel path, one on the other node over HBONE (the destination's
// daemon counts a mutual-TLS connection for it).
func TestPrivilegedClusterTraffic(t *testing.T) {
	c, vip := theShop(t)
	client := pod(t, c, "shop", "client")
	web1, web2 := pod(t, c, "shop", "web-1"), pod(t, c, "shop", "web-2")
	eventually(t, "both backends through the service", func() (bool, string) {
		return only(httpFrom(t, client, "http://"+vip+"/", 40), "web-1", "web-2")
	})
	eventually(t, "web-1, same node", func() (bool, string) {
		return only(httpFrom(t, client, "http://"+web1.ip+":8080/", 5), "web-1")
	})
	eventually(t, "web-2, across nodes", func() (bool, string) {
		return only(httpFrom(t, client, "http://"+web2.ip+":8080/", 5), "web-2")
	})
	z := ztunnelOn(t, "node-2")
	eventually(t, "node-2's daemon counting mutual-TLS connections to web-2", func() (bool, string) {
		m, err := daemonGet(c.Node("node-2"), z.Status.PodIP, 15020, "/metrics")
		if err != nil {
			return false, err.Error()
		}
		for _, l := range strings.Split(m, "\n") {
			if strings.HasPrefix(l, "istio_tcp_connections_opened_total{") && strings.Contains(l, `reporter="destination"`) &&
				strings.Contains(l, `destination_workload="web-2"`) && strings.Contains(l, `connection_security_policy="mutual_tls"`) {
				return true, ""
			}
		}
		return false, "no such istio_tcp_connections_opened_total line"
	})
}

// TestPrivilegedClusterAuthorization: AuthorizationPolicy ALLOW and DENY
// written to the API server reach the daemons through real istiod and are
// enforced on both paths; PeerAuthentication STRICT refuses plaintext
// from a pod outside the mesh.
func TestPrivilegedClusterAuthorization(t *testing.T) {
	c, vip := theShop(t)
	client := pod(t, c, "shop", "client")
	intruder := pod(t, c, "shop", "intruder")
	outsider := pod(t, c, "outside", "outsider")
	web1 := pod(t, c, "shop", "web-1")
	web1URL := "http://" + web1.ip + ":8080/"
	ctx := context.Background()
	aps := mesh.istio.SecurityV1().AuthorizationPolicies("shop")
	policy := func(action securityapi.AuthorizationPolicy_Action, sa string) *securityclient.AuthorizationPolicy {
		return &securityclient.AuthorizationPolicy{
			ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop"},
			Spec: securityapi.AuthorizationPolicy{
				Selector: &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "web"}},
				Action:   action,
				Rules: []*securityapi.Rule{{From: []*securityapi.Rule_From{{Source: &securityapi.Source{
					Principals: []string{"cluster.local/ns/shop/sa/" + sa}}}}}},
			},
		}
	}
	t.Cleanup(func() { _ = aps.Delete(context.Background(), "web", metav1.DeleteOptions{}) })

	// Without policies both identities are served, and the outsider's
	// plaintext reaches web-1 (so the refusals below are the policies').
	eventually(t, "both identities served", func() (bool, string) {
		if ok, s := only(httpFrom(t, client, "http://"+vip+"/", 20), "web-1", "web-2"); !ok {
			return ok, "client: " + s
		}
		ok, s := only(httpFrom(t, intruder, "http://"+vip+"/", 20), "web-1", "web-2")
		return ok, "intruder: " + s
	})
	eventually(t, "plaintext from outside the mesh served without STRICT", func() (bool, string) {
		return only(httpFrom(t, outsider, web1URL, 3), "web-1")
	})

	// ALLOW the client only.
	if _, err := aps.Create(ctx, policy(securityapi.AuthorizationPolicy_ALLOW, "client"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "ALLOW: the intruder refused on both backends", func() (bool, string) {
		return refused(httpFrom(t, intruder, "http://"+vip+"/", 10), 10)
	})
	eventually(t, "ALLOW: the client served by both", func() (bool, string) {
		return only(httpFrom(t, client, "http://"+vip+"/", 20), "web-1", "web-2")
	})

	// DENY the client.
	if _, err := sim.Modify(ctx, "web", aps.Get, aps.Update, func(p *securityclient.AuthorizationPolicy) {
		p.Spec.Action = securityapi.AuthorizationPolicy_DENY
	}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "DENY: the client refused on both backends", func() (bool, string) {
		return refused(httpFrom(t, client, "http://"+vip+"/", 10), 10)
	})
	eventually(t, "DENY: the intruder served again", func() (bool, string) {
		return only(httpFrom(t, intruder, "http://"+vip+"/", 20), "web-1", "web-2")
	})
	if err := aps.Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}

	// STRICT: plaintext from outside the mesh refused, the mesh served.
	pas := mesh.istio.SecurityV1().PeerAuthentications("shop")
	if _, err := pas.Create(ctx, &securityclient.PeerAuthentication{
		ObjectMeta: metav1.ObjectMeta{Name: "strict", Namespace: "shop"},
		Spec:       securityapi.PeerAuthentication{Mtls: &securityapi.PeerAuthentication_MutualTLS{Mode: securityapi.PeerAuthentication_MutualTLS_STRICT}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pas.Delete(context.Background(), "strict", metav1.DeleteOptions{}) })
	eventually(t, "STRICT: plaintext from outside refused", func() (bool, string) {
		return refused(httpFrom(t, outsider, web1URL, 3), 3)
	})
	eventually(t, "STRICT: the mesh still served", func() (bool, string) {
		return only(httpFrom(t, client, "http://"+vip+"/", 20), "web-1", "web-2")
	})
}
