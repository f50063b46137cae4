package cluster_test

import (
	"context"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"kmesh.dev/kmesh/integration/cluster"
	"kmesh.dev/kmesh/integration/kerneltest"
	"kmesh.dev/kmesh/integration/podnet"
)

// serviceCIDR is the API server's --service-cluster-ip-range.
var serviceCIDR = netip.MustParsePrefix("10.96.0.0/16")

// TestPrivilegedClusterServiceProxy: the kube-proxy stand-in makes a
// Service's ClusterIP reach its endpoints from a pod on another node and
// from a pod on the endpoint's own node (replies come back through the
// node), and a ClusterIP without endpoints reaches nothing.
func TestPrivilegedClusterServiceProxy(t *testing.T) {
	kerneltest.RequireRoot(t)
	cp := controlPlane(t)
	kube := cp.Kube
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	fabric, err := podnet.NewFabric(podPrefix, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fabric.Close() })
	n1, err := fabric.AddNode("sp1", 241)
	if err != nil {
		t.Fatal(err)
	}
	n2, err := fabric.AddNode("sp2", 242)
	if err != nil {
		t.Fatal(err)
	}
	srvIP := netip.MustParseAddr("10.244.242.10")
	srv, err := n2.AddPod("server", srvIP, netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	local, err := n2.AddPod("local", netip.MustParseAddr("10.244.242.11"), netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	remote, err := n1.AddPod("remote", netip.MustParseAddr("10.244.241.10"), netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	// What a real pod has by its default route: the service range via the node.
	for _, p := range []struct {
		n *podnet.Node
		p *podnet.Pod
	}{{n2, local}, {n1, remote}} {
		if err := p.n.RouteVia(p.p, serviceCIDR); err != nil {
			t.Fatal(err)
		}
	}
	ln, err := srv.Listen("tcp", netip.AddrPortFrom(srvIP, 8080).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go podnet.ServeTCPName(ln, "server")

	const ns = "kmesh-svcproxy"
	if _, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = kube.CoreV1().Namespaces().Delete(context.Background(), ns, metav1.DeleteOptions{}) })
	mk := func(name string) *corev1.Service {
		s, err := kube.CoreV1().Services(ns).Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}}}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	svc, empty := mk("echo"), mk("empty")
	if _, err := kube.DiscoveryV1().EndpointSlices(ns).Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "echo-1", Labels: map[string]string{discoveryv1.LabelServiceName: "echo", discoveryv1.LabelManagedBy: "kmesh-cluster-test"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080)), Protocol: ptr(corev1.ProtocolTCP)}},
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{srvIP.String()}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	sp := &cluster.ServiceProxy{Kube: kube, Nodes: func() []*podnet.Netns { return []*podnet.Netns{n1.NS, n2.NS} }, Logf: t.Logf}
	if err := sp.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	dial := func(p *podnet.Pod, addr string) (string, error) {
		var name string
		err := p.NS.Do(func() error {
			c, err := net.DialTimeout("tcp", addr, 2*time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(2 * time.Second))
			b, err := io.ReadAll(c)
			name = string(b)
			return err
		})
		return name, err
	}
	vip := net.JoinHostPort(svc.Spec.ClusterIP, "80")
	for _, p := range []*podnet.Pod{remote, local} {
		got, err := dial(p, vip)
		if err != nil || got != "server\n" {
			t.Errorf("from %s to %s: %q, %v; want the server's name", p.Name, vip, got, err)
		}
	}
	if got, err := dial(remote, net.JoinHostPort(empty.Spec.ClusterIP, "80")); err == nil {
		t.Errorf("a ClusterIP without endpoints answered: %q", got)
	}
}
