package cluster_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"kmesh.dev/kmesh/integration/cluster"
	"kmesh.dev/kmesh/integration/cluster/bins"
	"kmesh.dev/kmesh/integration/installpkg"
	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/integration/sim"
)

// The install is shared by the tests that use it (it takes a minute):
// the simulator's nodes, in External mode, play kubelet for this API
// server; istioctl installs Istio with the kmesh profile; the
// kube-proxy stand-in serves ClusterIPs on the nodes. TestMain tears it
// down (TestPrivilegedClusterUninstall, last, uninstalls first).
var mesh struct {
	once      sync.Once
	c         *sim.Cluster
	istio     istioclient.Interface
	manifests string
	istioctl  string
	self      string // this test binary: the apps' image
	kubelets  []*cluster.KubeletAPI
	cancel    context.CancelFunc
	// stopProxy stops the kube-proxy stand-in and waits for its loop: it
	// enters the nodes' namespaces, so it must stop before they close.
	stopProxy func()
	took      time.Duration
	out       string
	err       error
}

// installed installs Istio with the kmesh profile on two simulated nodes
// (once), or fails the test with what went wrong.
func installed(t *testing.T) *sim.Cluster {
	t.Helper()
	cp := controlPlane(t)
	daemon, paths := binaries(t)
	mesh.once.Do(func() {
		ctx, cancel := context.WithCancel(context.Background())
		mesh.cancel = cancel
		host := strings.TrimPrefix(cp.REST.Host, "https://")
		images := cluster.ImageBinaries(installpkg.DefaultImage, daemon, paths)
		self, err := os.Executable()
		if err != nil {
			mesh.err = err
			return
		}
		mesh.self = self
		c, err := sim.Start(ctx, sim.Options{
			Nodes: 2,
			External: &sim.External{
				Config: cp.REST, APIServer: host,
				Image: func(image string) (sim.Image, bool) {
					if image == appImage { // the test's own apps (echo, clients): this binary
						return sim.Image{Entrypoint: self}, true
					}
					img, ok := images(image)
					return sim.Image{Entrypoint: img.Entrypoint, Files: img.Files}, ok
				},
				// ClusterIPs: the kube-proxy stand-in below DNATs them on the
				// nodes; names resolve through /etc/hosts (no cluster DNS).
				ServiceCIDR: serviceCIDR,
				Hosts:       serviceHosts,
			},
			Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		})
		if err != nil {
			mesh.err = fmt.Errorf("starting the simulated nodes: %w", err)
			return
		}
		mesh.c = c
		// The API server's calls to the cluster (istiod's webhooks, the
		// kubelets) are dialed from inside a node: for a pod, its own node
		// (its source is then the node's address on the pod bridge, which
		// the pod routes back to; pods have no route to the nodes' fabric
		// addresses), for anything else node-1.
		shared.egress.SetDialer(func(ctx context.Context, network, addr string) (net.Conn, error) {
			n := c.Nodes[0]
			if ap, err := netip.ParseAddrPort(addr); err == nil && podPrefix.Contains(ap.Addr()) {
				if m := c.Node(fmt.Sprintf("node-%d", ap.Addr().As4()[2])); m != nil {
					n = m // the fabric gives node i the pod prefix 10.244.i.0/24
				}
			}
			return n.DialContext(ctx, network, addr)
		})
		sp := &cluster.ServiceProxy{Kube: cp.Kube, Nodes: func() []*podnet.Netns {
			var out []*podnet.Netns
			for _, n := range c.Nodes {
				out = append(out, n.Net.NS)
			}
			return out
		}, Logf: func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) }}
		spCtx, spCancel := context.WithCancel(ctx)
		spDone := make(chan struct{})
		mesh.stopProxy = func() { spCancel(); <-spDone }
		go func() { defer close(spDone); sp.Run(spCtx, 300*time.Millisecond) }()
		// Each node's kubelet API (port-forward: istioctl ztunnel-config),
		// inside the node at its address.
		for _, n := range c.Nodes {
			var ln net.Listener
			if err := n.Net.NS.Do(func() (err error) {
				ln, err = net.Listen("tcp", net.JoinHostPort(n.Net.Uplink4().String(), fmt.Sprint(sim.KubeletPort)))
				return err
			}); err != nil {
				mesh.err = fmt.Errorf("kubelet API on %s: %w", n.Name, err)
				return
			}
			k := &cluster.KubeletAPI{DialPod: func(ctx context.Context, ns, name string, port uint16) (net.Conn, error) {
				return n.DialInPod(ctx, ns, name, "tcp", net.JoinHostPort("127.0.0.1", fmt.Sprint(port)))
			}}
			if err := k.Serve(ln); err != nil {
				mesh.err = err
				return
			}
			mesh.kubelets = append(mesh.kubelets, k)
		}
		if mesh.istio, err = istioclient.NewForConfig(cp.REST); err != nil {
			mesh.err = err
			return
		}
		mesh.manifests = filepath.Join(shared.run.Dir, "manifests")
		if err := cluster.AssembleManifests(mesh.manifests); err != nil {
			mesh.err = fmt.Errorf("make manifests: %w", err)
			return
		}
		mesh.istioctl = paths[bins.Istioctl]
		start := time.Now()
		ictx, icancel := context.WithTimeout(ctx, 5*time.Minute)
		defer icancel()
		mesh.out, mesh.err = cluster.IstioctlInstall(ictx, mesh.istioctl, cp.Kubeconfig, mesh.manifests, filepath.Join(cp.Dir, "istioctl.log"), 3*time.Minute)
		mesh.took = time.Since(start)
	})
	if mesh.err != nil {
		dumpPods(t)
		t.Fatalf("istioctl install --set profile=kmesh: %v", mesh.err)
	}
	return mesh.c
}

// stopMesh tears the simulated nodes down (TestMain).
func stopMesh() error {
	if mesh.c == nil {
		return nil
	}
	shared.egress.SetDialer(nil)
	for _, k := range mesh.kubelets {
		_ = k.Close()
	}
	// The stand-in writes DNAT rules into the nodes' namespaces: stopped
	// and waited for first, so that it never enters a closed (and perhaps
	// reused) namespace descriptor.
	if mesh.stopProxy != nil {
		mesh.stopProxy()
	}
	err := mesh.c.Close()
	mesh.cancel()
	return err
}

func dumpPods(t *testing.T) {
	t.Helper()
	if shared.cp == nil {
		return
	}
	pods, err := shared.cp.Kube.CoreV1().Pods("").List(context.Background(), metav1.ListOptions{})
	if err != nil {
		return
	}
	for _, p := range pods.Items {
		var conds []string
		for _, c := range p.Status.Conditions {
			conds = append(conds, fmt.Sprintf("%s=%s %s", c.Type, c.Status, c.Message))
		}
		t.Logf("pod %s/%s node=%s ip=%s phase=%s %v", p.Namespace, p.Name, p.Spec.NodeName, p.Status.PodIP, p.Status.Phase, conds)
	}
}

// podsOf lists the istio-system pods whose name starts with prefix.
func podsOf(t *testing.T, prefix string) []corev1.Pod {
	t.Helper()
	pods, err := shared.cp.Kube.CoreV1().Pods(cluster.IstioNamespace).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var out []corev1.Pod
	for _, p := range pods.Items {
		if strings.HasPrefix(p.Name, prefix) && p.DeletionTimestamp == nil {
			out = append(out, p)
		}
	}
	return out
}

func ready(p corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// TestPrivilegedClusterInstall: `istioctl install --set profile=kmesh`
// with the assembled manifests succeeds against the real API server:
// istioctl itself waits until istiod's Deployment and the istio-cni-node
// and ztunnel DaemonSets are ready, so their pods run (as processes on
// the simulated nodes: pilot-discovery, Istio's CNI node agent, the
// kmesh-daemon) and pass their readiness probes. Then: one of each
// DaemonSet's pods per node, the API server reaches istiod's validation
// webhook through the egress proxy (from inside a node), and nothing
// listens outside loopback in this machine's network namespace.
func TestPrivilegedClusterInstall(t *testing.T) {
	c := installed(t)
	t.Logf("istioctl install took %s:\n%s", mesh.took.Round(time.Millisecond), mesh.out)
	if !strings.Contains(mesh.out, "Installation complete") {
		t.Errorf("istioctl did not report the installation complete:\n%s", mesh.out)
	}
	for _, ds := range []string{"ztunnel-", "istio-cni-node-"} {
		pods := podsOf(t, ds)
		nodes := map[string]bool{}
		for _, p := range pods {
			if !ready(p) {
				t.Errorf("%s/%s on %s is not ready", p.Namespace, p.Name, p.Spec.NodeName)
			}
			nodes[p.Spec.NodeName] = true
		}
		if len(pods) != len(c.Nodes) || len(nodes) != len(c.Nodes) {
			t.Errorf("%s pods: %d on %v, want one on each of %d nodes", ds, len(pods), nodes, len(c.Nodes))
		}
	}
	istiod := podsOf(t, "istiod-")
	if len(istiod) != 1 || !ready(istiod[0]) {
		dumpPods(t)
		t.Fatalf("istiod pods: %d (want 1, ready)", len(istiod))
	}

	// istiod's validation webhook, called by the API server through the
	// egress proxy: an invalid Istio resource is refused by istiod.
	ctx := context.Background()
	svc, err := shared.cp.Kube.CoreV1().Services(cluster.IstioNamespace).Get(ctx, "istiod", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	target := net.JoinHostPort(svc.Spec.ClusterIP, "443")
	dialed := net.JoinHostPort(istiod[0].Status.PodIP, "15017")
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := createInvalidSidecar(ctx, t)
		if err != nil && strings.Contains(err.Error(), "validation.istio.io") {
			t.Logf("istiod's webhook refused an invalid Sidecar: %v", err)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("istiod's validation webhook never refused an invalid Sidecar (last: %v); egress: %+v", err, shared.egressProxy.Events())
		}
		time.Sleep(500 * time.Millisecond)
	}
	if !hasEvent(shared.egressProxy.Events(), func(e cluster.EgressEvent) bool {
		return e.Target == target && e.Dialed == dialed && e.Err == ""
	}) {
		t.Errorf("no egress event %s → %s: %+v", target, dialed, shared.egressProxy.Events())
	}
	cpBad, err := shared.cp.NonLoopbackListeners()
	if err != nil || len(cpBad) > 0 {
		t.Errorf("control-plane sockets outside loopback: %v (%v)", cpBad, err)
	}
}

// createInvalidSidecar creates a Sidecar whose egress host lacks the
// namespace/ part: the CRD's schema accepts it, istiod's validation
// refuses it.
func createInvalidSidecar(ctx context.Context, t *testing.T) error {
	u := map[string]any{
		"apiVersion": "networking.istio.io/v1",
		"kind":       "Sidecar",
		"metadata":   map[string]any{"name": "invalid", "namespace": "default"},
		"spec":       map[string]any{"egress": []any{map[string]any{"hosts": []any{"no-namespace"}}}},
	}
	return createUnstructured(ctx, u)
}

// daemonGet reads a path of a node's kmesh-daemon (its pod's address, from
// inside the node).
func daemonGet(n *sim.Node, podIP string, port int, path string) (string, error) {
	cl := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: n.DialContext}}
	resp, err := cl.Get((&url.URL{Scheme: "http", Host: net.JoinHostPort(podIP, fmt.Sprint(port)), Path: path}).String())
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

func createUnstructured(ctx context.Context, obj map[string]any) error {
	u := &unstructured.Unstructured{Object: obj}
	gv, err := schema.ParseGroupVersion(u.GetAPIVersion())
	if err != nil {
		return err
	}
	gvr := gv.WithResource(strings.ToLower(u.GetKind()) + "s")
	_, err = shared.cp.Dynamic.Resource(gvr).Namespace(u.GetNamespace()).Create(ctx, u, metav1.CreateOptions{})
	return err
}

func init() { stopMeshHook = stopMesh }

// serviceHosts is what the simulated kubelet appends to every container's
// /etc/hosts: each Service's names and ClusterIP, as the cluster's DNS
// would answer them (istiod.istio-system.svc is the daemon's XDS_ADDRESS).
func serviceHosts() string {
	svcs, err := shared.cp.Kube.CoreV1().Services("").List(context.Background(), metav1.ListOptions{})
	if err != nil {
		return ""
	}
	var b strings.Builder
	for _, s := range svcs.Items {
		if s.Spec.ClusterIP == "" || s.Spec.ClusterIP == corev1.ClusterIPNone {
			continue
		}
		fmt.Fprintf(&b, "%s\t%s.%s.svc.cluster.local %s.%s.svc\n", s.Spec.ClusterIP, s.Name, s.Namespace, s.Name, s.Namespace)
	}
	return b.String()
}

// TestPrivilegedClusterZtunnelConfig: the real istioctl finds the node
// proxy as it finds ztunnel (DaemonSet ztunnel, label app=ztunnel in
// istio-system), port-forwards to its admin port 15000 through the API
// server and the node's kubelet API, and lists the daemon's workloads,
// services, policies and certificates.
func TestPrivilegedClusterZtunnelConfig(t *testing.T) {
	c, _ := theShop(t)
	kernelAndTunnel(t, c) // certificates exist once pods talked
	z := ztunnelOn(t, "node-1")
	zc := func(args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		args = append([]string{"ztunnel-config"}, append(args, "--kubeconfig", shared.cp.Kubeconfig, "-o", "json")...)
		out, err := exec.CommandContext(ctx, mesh.istioctl, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("istioctl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	target := z.Name + "." + cluster.IstioNamespace
	for _, c := range []struct {
		what string
		want []string
	}{
		{"workloads", []string{`"name": "web-1"`, `"name": "web-2"`, `"name": "client"`}},
		{"services", []string{`"hostname": "web.shop.svc.cluster.local"`}},
		{"certificates", []string{"spiffe://cluster.local/ns/shop/sa/client", `"state": "Available"`}},
		{"policies", nil}, // none now: must parse
		{"all", []string{"web.shop.svc.cluster.local"}},
	} {
		out := zc(c.what, target)
		for _, w := range c.want {
			if !strings.Contains(out, w) {
				t.Errorf("istioctl ztunnel-config %s %s: no %s in:\n%.3000s", c.what, target, w, out)
			}
		}
		t.Logf("istioctl ztunnel-config %s %s: %d bytes", c.what, target, len(out))
	}
}
