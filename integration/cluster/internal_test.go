package cluster

import (
	"net/netip"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestEgressTarget(t *testing.T) {
	tcp := corev1.ProtocolTCP
	name := func(s string) *string { return &s }
	port := func(p int32) *int32 { return &p }
	no := false
	svcs := []corev1.Service{
		{ObjectMeta: metav1.ObjectMeta{Namespace: "istio-system", Name: "istiod"}, Spec: corev1.ServiceSpec{
			ClusterIP: "10.96.0.20", ClusterIPs: []string{"10.96.0.20"},
			Ports: []corev1.ServicePort{{Name: "https-webhook", Port: 443, Protocol: tcp}, {Name: "grpc-xds", Port: 15012, Protocol: tcp}}}},
		{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "empty"}, Spec: corev1.ServiceSpec{
			ClusterIP: "10.96.0.30", Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}},
		{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "outside"}, Spec: corev1.ServiceSpec{
			ClusterIP: "10.96.0.40", Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}},
	}
	slices := []discoveryv1.EndpointSlice{
		{ObjectMeta: metav1.ObjectMeta{Namespace: "istio-system", Name: "istiod-x", Labels: map[string]string{discoveryv1.LabelServiceName: "istiod"}},
			Ports: []discoveryv1.EndpointPort{{Name: name("https-webhook"), Port: port(15017), Protocol: &tcp}, {Name: name("grpc-xds"), Port: port(15012), Protocol: &tcp}},
			Endpoints: []discoveryv1.Endpoint{
				{Addresses: []string{"10.244.1.9"}, Conditions: discoveryv1.EndpointConditions{Ready: &no}},
				{Addresses: []string{"10.244.2.10"}},
			}},
		{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "outside-x", Labels: map[string]string{discoveryv1.LabelServiceName: "outside"}},
			Ports:     []discoveryv1.EndpointPort{{Name: name("http"), Port: port(8080)}},
			Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"192.168.1.5"}}}},
	}
	inside := []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("10.255.0.0/24")}
	for _, tc := range []struct {
		target, want, err string
	}{
		{target: "10.96.0.20:443", want: "10.244.2.10:15017"},            // ClusterIP → the ready endpoint, target port by name
		{target: "10.96.0.20:15012", want: "10.244.2.10:15012"},          // another port of the same service
		{target: "10.96.0.20:8080", err: "has no TCP port 8080"},         // a port the service lacks
		{target: "10.96.0.30:80", err: "no ready endpoint"},              // no endpoints: refused, not dialed
		{target: "10.96.0.40:80", err: "no ready endpoint"},              // an endpoint outside the cluster: never dialed
		{target: "10.244.1.7:15000", want: "10.244.1.7:15000"},           // a pod address
		{target: "10.255.0.1:10250", want: "10.255.0.1:10250"},           // a node (kubelet) address
		{target: "10.96.0.99:443", err: "neither a Service's ClusterIP"}, // an unknown ClusterIP
		{target: "203.0.113.7:443", err: "neither a Service's ClusterIP"},
		{target: "istiod.istio-system.svc:443", err: "not an address"},
		{target: "[::ffff:10.244.1.7]:80", want: "10.244.1.7:80"},
		{target: "10.244.1.7", err: "bad target"},
	} {
		got, err := egressTarget(tc.target, svcs, slices, inside)
		switch {
		case tc.err != "":
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: got %v, %v; want error %q", tc.target, got, err, tc.err)
			}
		case err != nil || got.String() != tc.want:
			t.Errorf("%s: got %v, %v; want %s", tc.target, got, err, tc.want)
		}
	}
}

func TestServiceRules(t *testing.T) {
	tcp := corev1.ProtocolTCP
	name := func(s string) *string { return &s }
	port := func(p int32) *int32 { return &p }
	no := false
	svcs := []corev1.Service{
		{ObjectMeta: metav1.ObjectMeta{Namespace: "istio-system", Name: "istiod"}, Spec: corev1.ServiceSpec{
			ClusterIP: "10.96.0.20", Ports: []corev1.ServicePort{{Name: "https-dns", Port: 15012, Protocol: tcp}, {Name: "https-webhook", Port: 443, Protocol: tcp}}}},
		{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "headless"}, Spec: corev1.ServiceSpec{ClusterIP: "None", Ports: []corev1.ServicePort{{Name: "x", Port: 1}}}},
	}
	eps := []discoveryv1.EndpointSlice{{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "istio-system", Name: "istiod-1", Labels: map[string]string{discoveryv1.LabelServiceName: "istiod"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: name("https-dns"), Port: port(15012), Protocol: &tcp}, {Name: name("https-webhook"), Port: port(15017), Protocol: &tcp}},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.244.2.7"}}, {Addresses: []string{"10.244.1.7"}},
			{Addresses: []string{"10.244.1.8"}, Conditions: discoveryv1.EndpointConditions{Ready: &no}},
		},
	}}
	got := serviceRules(svcs, eps)
	want := `*nat
:KMESH-SERVICES - [0:0]
-A KMESH-SERVICES -d 10.96.0.20/32 -p tcp --dport 15012 -m comment --comment istio-system/istiod:https-dns -m statistic --mode random --probability 0.50000 -j DNAT --to-destination 10.244.1.7:15012
-A KMESH-SERVICES -d 10.96.0.20/32 -p tcp --dport 15012 -m comment --comment istio-system/istiod:https-dns -j DNAT --to-destination 10.244.2.7:15012
-A KMESH-SERVICES -d 10.96.0.20/32 -p tcp --dport 443 -m comment --comment istio-system/istiod:https-webhook -m statistic --mode random --probability 0.50000 -j DNAT --to-destination 10.244.1.7:15017
-A KMESH-SERVICES -d 10.96.0.20/32 -p tcp --dport 443 -m comment --comment istio-system/istiod:https-webhook -j DNAT --to-destination 10.244.2.7:15017
COMMIT
`
	if got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
}

func TestImageBinaries(t *testing.T) {
	f := ImageBinaries("ghcr.io/kmesh-dev/kmesh:latest", "/run/x/kmesh-daemon", map[string]string{
		"pilot-discovery": "/c/pilot-discovery", "install-cni": "/c/install-cni", "istio-cni": "/c/istio-cni"})
	for img, want := range map[string]string{
		"ghcr.io/kmesh-dev/kmesh:latest":                          "/run/x/kmesh-daemon",
		"registry.istio.io/testing/pilot:latest-distroless":       "/c/pilot-discovery",
		"docker.io/istio/pilot:1.28.0":                            "/c/pilot-discovery",
		"localhost:5000/istio/install-cni@sha256:abc":             "/c/install-cni",
		"registry.istio.io/testing/install-cni:latest-distroless": "/c/install-cni",
		"ghcr.io/kmesh-dev/kmesh:v2":                              "", // another Kmesh image: not this run's daemon
		"registry.istio.io/testing/ztunnel:latest-distroless":     "", // real ztunnel: cannot run here
		"registry.istio.io/testing/proxyv2:latest":                "",
		"localhost:5000/pilot-x:1":                                "",
	} {
		got, ok := f(img)
		if got.Entrypoint != want || ok != (want != "") {
			t.Errorf("%s: got %q, %v; want %q", img, got.Entrypoint, ok, want)
		}
		if want == "/c/install-cni" && got.Files["/opt/cni/bin/istio-cni"] != "/c/istio-cni" {
			t.Errorf("%s: the istio-cni plugin is not in the image: %v", img, got.Files)
		}
	}
}
