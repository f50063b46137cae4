package cluster_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"

	"kmesh.dev/kmesh/integration/cluster"
	"kmesh.dev/kmesh/integration/kerneltest"
	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/integration/sim"
)

// forward opens a port-forward to ns/name:port through the API server (as
// kubectl port-forward and istioctl do) and returns the local address.
func forward(t *testing.T, cp *cluster.ControlPlane, ns, name string, port int) string {
	t.Helper()
	rt, upgrader, err := spdy.RoundTripperFor(cp.REST)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(cp.REST.Host + fmt.Sprintf("/api/v1/namespaces/%s/pods/%s/portforward", ns, name))
	if err != nil {
		t.Fatal(err)
	}
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: rt}, http.MethodPost, u)
	stop, readyc := make(chan struct{}), make(chan struct{})
	fw, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, []string{"0:" + strconv.Itoa(port)}, stop, readyc, io.Discard, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- fw.ForwardPorts() }()
	t.Cleanup(func() { close(stop) })
	select {
	case <-readyc:
	case err := <-errc:
		t.Fatalf("port-forward to %s/%s:%d: %v", ns, name, port, err)
	case <-time.After(20 * time.Second):
		t.Fatalf("port-forward to %s/%s:%d not ready after 20s", ns, name, port)
	}
	ports, err := fw.GetPorts()
	if err != nil || len(ports) != 1 {
		t.Fatalf("port-forward ports: %v %v", ports, err)
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(int(ports[0].Local)))
}

// TestPrivilegedClusterPortForward: `kubectl port-forward` (client-go's
// port-forward, which istioctl uses) reaches a pod on a simulated node:
// the API server calls the node's kubelet API at its InternalIP through
// the egress proxy, and the simulated kubelet (KubeletAPI, inside the
// node) dials the pod.
func TestPrivilegedClusterPortForward(t *testing.T) {
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
	node, err := fabric.AddNode("pf", 243)
	if err != nil {
		t.Fatal(err)
	}
	podIP := netip.MustParseAddr("10.244.243.10")
	p, err := node.AddPod("target", podIP, netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	// On the pod's loopback: what a port-forward reaches (and the pod's
	// own address is not, on purpose).
	ln, err := p.Listen("tcp", "127.0.0.1:8080")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go podnet.ServeTCPName(ln, "target")
	dial := netnsDialer(node.NS)
	prev := shared.egress.SetDialer(dial)
	t.Cleanup(func() { shared.egress.SetDialer(prev) })

	nodeIP := node.Uplink4()
	var kl net.Listener
	if err := node.NS.Do(func() error {
		var err error
		kl, err = net.Listen("tcp", netip.AddrPortFrom(nodeIP, sim.KubeletPort).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	k := &cluster.KubeletAPI{Logf: t.Logf, DialPod: func(ctx context.Context, ns, name string, port uint16) (net.Conn, error) {
		if name != "target" {
			return nil, fmt.Errorf("no pod %s/%s on this node", ns, name)
		}
		return netnsDialer(p.NS)(ctx, "tcp", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port).String())
	}}
	if err := k.Serve(kl); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k.Close() })

	if _, err := kube.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "pf-node"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = kube.CoreV1().Nodes().Delete(context.Background(), "pf-node", metav1.DeleteOptions{}) })
	// The node lifecycle controller taints a new node at once: the status
	// write retries on its conflict (a CI run failed here without it).
	nodes := kube.CoreV1().Nodes()
	if _, err := sim.Modify(ctx, "pf-node", nodes.Get, nodes.UpdateStatus, func(n *corev1.Node) {
		n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: nodeIP.String()}, {Type: corev1.NodeHostName, Address: "pf-node"}}
		n.Status.DaemonEndpoints.KubeletEndpoint.Port = sim.KubeletPort
	}); err != nil {
		t.Fatal(err)
	}
	const ns = "kmesh-pf"
	if _, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = kube.CoreV1().Pods(ns).Delete(context.Background(), "target", metav1.DeleteOptions{GracePeriodSeconds: ptr(int64(0))})
		_ = kube.CoreV1().Namespaces().Delete(context.Background(), ns, metav1.DeleteOptions{})
	})
	pods := kube.CoreV1().Pods(ns)
	if _, err := pods.Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "target"},
		Spec: corev1.PodSpec{NodeName: "pf-node", Containers: []corev1.Container{{Name: "app", Image: "x"}}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := sim.Modify(ctx, "target", pods.Get, pods.UpdateStatus, func(pod *corev1.Pod) {
		pod.Status.Phase, pod.Status.PodIP = corev1.PodRunning, podIP.String()
		pod.Status.PodIPs = []corev1.PodIP{{IP: podIP.String()}}
	}); err != nil {
		t.Fatal(err)
	}

	local := forward(t, cp, ns, "target", 8080)
	for i := 0; i < 3; i++ { // one port-forward, several connections
		c, err := net.DialTimeout("tcp", local, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(c)
		c.Close()
		if err != nil || string(b) != "target\n" {
			t.Fatalf("through the port-forward: %q, %v; egress %+v", b, err, shared.egressProxy.Events())
		}
	}
	kubelet := net.JoinHostPort(nodeIP.String(), strconv.Itoa(sim.KubeletPort))
	if !hasEvent(shared.egressProxy.Events(), func(e cluster.EgressEvent) bool { return e.Target == kubelet && e.Dialed == kubelet }) {
		t.Errorf("the API server did not reach the kubelet through the egress proxy: %+v", shared.egressProxy.Events())
	}
}
