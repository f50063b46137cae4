package cluster_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admission/v1"
	admregv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"kmesh.dev/kmesh/integration/cluster"
	"kmesh.dev/kmesh/integration/kerneltest"
	"kmesh.dev/kmesh/integration/podnet"
)

// selfSigned makes a serving certificate for dnsName that is its own CA.
func selfSigned(t *testing.T, dnsName string) (tls.Certificate, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: dnsName}, DNSNames: []string{dnsName},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// netnsDialer dials from inside a network namespace (a simulated node's).
func netnsDialer(ns *podnet.Netns) cluster.DialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := ns.Do(func() error {
			var d net.Dialer
			var err error
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
}

// TestPrivilegedClusterEgress: the API server's calls to the cluster (here
// a validating admission webhook) never dial from this machine's network
// namespace. They go through the egress selector's CONNECT proxy, which
// maps the webhook Service's ClusterIP to its ready endpoint and dials it
// from inside a simulated node's network namespace; a webhook whose
// address is outside the simulated cluster (a URL webhook on a public
// address) or a Service without endpoints is refused by the proxy without
// any dial, and the API server fails the request (failurePolicy Fail).
func TestPrivilegedClusterEgress(t *testing.T) {
	kerneltest.RequireRoot(t)
	cp := controlPlane(t)
	kube := cp.Kube
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// A node (its own fabric: nothing routes out of it) with one pod
	// serving the webhook.
	fabric, err := podnet.NewFabric(podPrefix, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fabric.Close() })
	node, err := fabric.AddNode("egress", 250)
	if err != nil {
		t.Fatal(err)
	}
	podIP := netip.MustParseAddr("10.244.250.10")
	pod, err := node.AddPod("webhook", podIP, netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	prev := shared.egress.SetDialer(netnsDialer(node.NS))
	t.Cleanup(func() { shared.egress.SetDialer(prev) })

	const ns, svcName = "kmesh-egress", "egress-webhook"
	cert, caPEM := selfSigned(t, svcName+"."+ns+".svc")
	ln, err := pod.Listen("tcp", netip.AddrPortFrom(podIP, 9443).String())
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var peers []string
	srv := &http.Server{
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}},
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			peers = append(peers, r.RemoteAddr)
			mu.Unlock()
			var rev admissionv1.AdmissionReview
			if err := json.NewDecoder(r.Body).Decode(&rev); err != nil || rev.Request == nil {
				http.Error(w, "bad review", http.StatusBadRequest)
				return
			}
			resp := &admissionv1.AdmissionResponse{UID: rev.Request.UID, Allowed: true}
			if strings.HasPrefix(rev.Request.Name, "deny-") {
				resp.Allowed = false
				resp.Result = &metav1.Status{Message: "denied by the kmesh egress test webhook"}
			}
			rev.Response, rev.Request = resp, nil
			_ = json.NewEncoder(w).Encode(&rev)
		}),
	}
	go func() { _ = srv.ServeTLS(ln, "", "") }()
	t.Cleanup(func() { _ = srv.Close() })

	if _, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = kube.AdmissionregistrationV1().ValidatingWebhookConfigurations().Delete(context.Background(), "kmesh-egress-test", metav1.DeleteOptions{})
		_ = kube.CoreV1().Namespaces().Delete(context.Background(), ns, metav1.DeleteOptions{})
	})
	svc, err := kube.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: svcName},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "https", Port: 443, TargetPort: intstr.FromInt32(9443)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kube.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "egress-empty"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "https", Port: 443}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// A selectorless Service's endpoints, as a user writes them.
	if _, err := kube.DiscoveryV1().EndpointSlices(ns).Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: svcName + "-1", Labels: map[string]string{
			discoveryv1.LabelServiceName: svcName, discoveryv1.LabelManagedBy: "kmesh-cluster-test"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("https"), Port: ptr(int32(9443)), Protocol: ptr(corev1.ProtocolTCP)}},
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{podIP.String()}, Conditions: discoveryv1.EndpointConditions{Ready: ptr(true)}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	fail, none := admregv1.Fail, admregv1.SideEffectClassNone
	hook := func(name, selector string, cc admregv1.WebhookClientConfig) admregv1.ValidatingWebhook {
		cc.CABundle = caPEM
		return admregv1.ValidatingWebhook{
			Name: name, ClientConfig: cc, FailurePolicy: &fail, SideEffects: &none,
			AdmissionReviewVersions: []string{"v1"}, TimeoutSeconds: ptr(int32(5)),
			Rules: []admregv1.RuleWithOperations{{Operations: []admregv1.OperationType{admregv1.Create},
				Rule: admregv1.Rule{APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"configmaps"}}}},
			NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": ns}},
			ObjectSelector:    &metav1.LabelSelector{MatchLabels: map[string]string{"kmesh-egress": selector}},
		}
	}
	if _, err := kube.AdmissionregistrationV1().ValidatingWebhookConfigurations().Create(ctx, &admregv1.ValidatingWebhookConfiguration{
		ObjectMeta: metav1.ObjectMeta{Name: "kmesh-egress-test"},
		Webhooks: []admregv1.ValidatingWebhook{
			hook("svc.egress.kmesh.dev", "svc", admregv1.WebhookClientConfig{Service: &admregv1.ServiceReference{Namespace: ns, Name: svcName, Path: ptr("/validate"), Port: ptr(int32(443))}}),
			hook("empty.egress.kmesh.dev", "empty", admregv1.WebhookClientConfig{Service: &admregv1.ServiceReference{Namespace: ns, Name: "egress-empty", Path: ptr("/validate"), Port: ptr(int32(443))}}),
			// TEST-NET-3: dialed from here it would leave the machine.
			hook("url.egress.kmesh.dev", "url", admregv1.WebhookClientConfig{URL: ptr("https://203.0.113.7:443/validate")}),
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	create := func(name, selector string) error {
		_, err := kube.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name,
			Labels: map[string]string{"kmesh-egress": selector}}}, metav1.CreateOptions{})
		return err
	}
	// The API server picks the configuration up within a second or so.
	var last error
	for i := 0; ; i++ {
		last = create(fmt.Sprintf("deny-%d", i), "svc")
		if last != nil && strings.Contains(last.Error(), "denied by the kmesh egress test webhook") {
			break
		}
		if i == 100 {
			t.Fatalf("the webhook never denied a ConfigMap through the egress proxy: last %v; proxy events %+v", last, shared.egressProxy.Events())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := create("allow-1", "svc"); err != nil {
		t.Fatalf("the webhook (through the egress proxy) refused an allowed ConfigMap: %v", err)
	}
	// It came from inside the node: its address on the pod bridge.
	mu.Lock()
	got := append([]string(nil), peers...)
	mu.Unlock()
	for _, p := range got {
		if ap, err := netip.ParseAddrPort(p); err != nil || ap.Addr() != netip.MustParseAddr("10.244.250.1") {
			t.Errorf("the webhook was called from %s, not from the node's address 10.244.250.1", p)
		}
	}
	want := cluster.EgressEvent{Target: netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 443).String(), Dialed: netip.AddrPortFrom(podIP, 9443).String()}
	if !hasEvent(shared.egressProxy.Events(), func(e cluster.EgressEvent) bool { return e == want }) {
		t.Errorf("the egress proxy did not map %s to %s: %+v", want.Target, want.Dialed, shared.egressProxy.Events())
	}

	// Fail closed: an address outside the simulated cluster and a Service
	// without endpoints are refused by the proxy, never dialed, and the
	// request fails.
	// A URL webhook goes through the "controlplane" egress (seen here:
	// the API server picks the egress type by how the webhook is
	// addressed), a Service one through "cluster".
	for _, c := range []struct {
		selector, target, why string
		proxy                 *cluster.EgressProxy
	}{
		{"url", "203.0.113.7:443", "the control-plane egress reaches loopback only", shared.loopbackProx},
		{"empty", "", "no ready endpoint", shared.egressProxy},
	} {
		err := create("x-"+c.selector, c.selector)
		if err == nil {
			t.Errorf("a ConfigMap whose webhook (%s) cannot be reached was created", c.selector)
			continue
		}
		if !hasEvent(c.proxy.Events(), func(e cluster.EgressEvent) bool {
			return e.Dialed == "" && strings.Contains(e.Err, c.why) && (c.target == "" || e.Target == c.target)
		}) {
			t.Errorf("%s: no refusal %q in the proxy's events (the API server said %v): %+v", c.selector, c.why, err, c.proxy.Events())
		}
		t.Logf("%s webhook refused as it should: %v", c.selector, err)
	}
	if bad, err := cluster.NonLoopbackListeners(cp.Pids()["kube-apiserver"]); err != nil || len(bad) > 0 {
		t.Errorf("kube-apiserver sockets outside loopback: %v (%v)", bad, err)
	}
}

func hasEvent(es []cluster.EgressEvent, f func(cluster.EgressEvent) bool) bool {
	for _, e := range es {
		if f(e) {
			return true
		}
	}
	return false
}
