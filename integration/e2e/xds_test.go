package e2e

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	typedcore "k8s.io/client-go/kubernetes/typed/core/v1"

	"kmesh.dev/kmesh/ambient/agent"
	"kmesh.dev/kmesh/ambient/config"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/controlplane"
	"kmesh.dev/kmesh/integration/kerneltest"
	"kmesh.dev/kmesh/integration/podnet"
)

func TestMain(m *testing.M) {
	podnet.MaybeRunHelper()
	os.Exit(m.Run())
}

const ns = "demo"

// cluster is one simulated node with pods, a Kmesh agent on it, and Istio's
// real control plane behind it.
type cluster struct {
	t        *testing.T
	cp       *controlplane.ControlPlane
	cpAddr   string
	objects  string
	env      *kerneltest.Env
	node     *podnet.Node
	agent    *agent.Agent
	client   *podnet.Pod
	pods     map[string]*podnet.Pod
	tlsDir   string
	rootFile string
	tls      *tls.Config
	sizes    bpf.MapSizes
	logs     *strings.Builder
	// plaintext: the control plane is a test server without TLS.
	plaintext bool
}

var baseObjects = `
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Node
metadata:
  name: node-1
  labels:
    topology.kubernetes.io/region: r1
    topology.kubernetes.io/zone: z1
---
apiVersion: v1
kind: Node
metadata:
  name: node-2
  labels:
    topology.kubernetes.io/region: r1
    topology.kubernetes.io/zone: z2
`

func newCluster(t *testing.T, sizes bpf.MapSizes) *cluster {
	c := &cluster{t: t, pods: map[string]*podnet.Pod{}, sizes: sizes, tlsDir: t.TempDir(), logs: &strings.Builder{}}
	c.env = kerneltest.New(t, bpf.Config{Sizes: sizes})
	// The agent loads the data path itself, as the daemon does.
	c.env.DP.Close()
	c.env.DP = nil
	node, err := podnet.NewNode("n1", netip.MustParsePrefix("10.244.1.0/24"), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	c.node = node
	t.Cleanup(func() { node.Close() })
	if c.client, err = node.AddPod("client", netip.MustParseAddr("10.244.1.2"), netip.Addr{}); err != nil {
		t.Fatal(err)
	}
	c.objects = baseObjects + podYAML("client", "10.244.1.2", "node-1", "client")
	return c
}

// podYAML is a plaintext pod (no ambient redirection annotation, so not
// HBONE): these tests follow istiod into the kernel's load balancer; a pod
// "on node-2" here shares the test's bridge and is reached directly. The
// tunnel between nodes has its own tests (ambient/tunnel, integration/sim).
func podYAML(name, ip, node, app string) string {
	return fmt.Sprintf(`---
apiVersion: v1
kind: Pod
metadata:
  name: %s
  namespace: demo
  labels: {app: %s}
spec:
  nodeName: %s
  serviceAccountName: %s
status:
  phase: Running
  podIP: %s
  podIPs: [{ip: %s}]
  conditions: [{type: Ready, status: "True"}]
`, name, app, node, app, ip, ip)
}

func (c *cluster) startControlPlane() {
	c.t.Helper()
	if c.tls == nil { // istiod keeps its certificate across restarts
		tlsCfg, rootFile, err := controlplane.ServingTLS(c.tlsDir)
		if err != nil {
			c.t.Fatal(err)
		}
		c.tls, c.rootFile = tlsCfg, rootFile
	}
	cp, err := controlplane.Start(controlplane.Options{Objects: c.objects, Addr: c.cpAddr, TLS: c.tls})
	if err != nil {
		c.t.Fatal(err)
	}
	c.cp, c.cpAddr = cp, cp.Addr
	c.t.Cleanup(func() {
		if c.cp != nil {
			c.cp.Stop()
		}
	})
}

func (c *cluster) stopControlPlane() {
	c.cp.Stop()
	c.cp = nil
}

// startAgent starts a Kmesh daemon for node-1, in this process, and waits
// until the first control-plane state is in the kernel.
func (c *cluster) startAgent() {
	c.t.Helper()
	cfg, err := config.Load(nil, func(string) string { return "" })
	if err != nil {
		c.t.Fatal(err)
	}
	cfg.CgroupPath, cfg.PinRoot = c.env.Config.CgroupPath, c.env.Config.PinRoot
	cfg.ReadinessAddr, cfg.AdminAddr, cfg.StatsAddr = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	cfg.XDSAddress, cfg.RootCertFile, cfg.XDSServerName = c.cpAddr, c.rootFile, controlplane.IstiodName
	cfg.XDSPlaintext = c.plaintext
	cfg.TokenFile = ""
	cfg.NodeName, cfg.PodName, cfg.PodNamespace, cfg.InstanceIP = "node-1", "kmesh-node-1", "istio-system", "10.244.1.1"
	if c.sizes.Endpoint != 0 {
		cfg.Maps.Endpoint = c.sizes.Endpoint
	}
	if c.sizes.Frontend != 0 {
		cfg.Maps.Frontend = c.sizes.Frontend
	}
	log := slog.New(slog.NewTextHandler(io.MultiWriter(c.logs, testWriter{c.t}), &slog.HandlerOptions{Level: slog.LevelInfo}))
	a, err := agent.Start(context.Background(), cfg, log)
	if err != nil {
		c.t.Fatal(err)
	}
	c.agent = a
	c.t.Cleanup(func() {
		if c.agent != nil {
			c.agent.Close()
			c.agent = nil
		}
	})
	if !c.plaintext {
		c.waitSynced()
	}
	cookie, err := c.client.NS.Cookie()
	if err != nil {
		c.t.Fatal(err)
	}
	if err := a.Plane.Enroll(cookie, "Kubernetes//Pod/demo/client"); err != nil {
		c.t.Fatal(err)
	}
}

func (c *cluster) waitSynced() {
	c.t.Helper()
	select {
	case <-c.agent.Synced():
	case <-time.After(20 * time.Second):
		c.t.Fatal("the agent did not sync with the control plane within 20s")
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// addPod creates a backend pod: a namespace answering its name on TCP 8080
// and 9090, and (when the control plane runs) its Pod object.
func (c *cluster) addPod(name string, host int, node, app string) {
	c.t.Helper()
	ip := fmt.Sprintf("10.244.1.%d", host)
	p, err := c.node.AddPod(name, netip.MustParseAddr(ip), netip.Addr{})
	if err != nil {
		c.t.Fatal(err)
	}
	for _, port := range []string{":8080", ":9090"} {
		l, err := p.Listen("tcp", port)
		if err != nil {
			c.t.Fatal(err)
		}
		c.t.Cleanup(func() { l.Close() })
		go podnet.ServeTCPName(l, name+port)
	}
	c.pods[name] = p
	c.objects += podYAML(name, ip, node, app)
}

func (c *cluster) kubePod(name, ip, node, app string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": app}},
		Spec:       corev1.PodSpec{NodeName: node, ServiceAccountName: app},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}},
	}
}

func webService(port int32, target int, extra func(*corev1.Service)) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: ns},
		Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.10", Selector: map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{{Name: "http", Port: port, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromInt(target)}}},
	}
	if extra != nil {
		extra(s)
	}
	return s
}

func (c *cluster) core() typedcore.CoreV1Interface { return c.cp.Kube().Kube().CoreV1() }

// eventually polls cond until it holds or 15 s pass.
func (c *cluster) eventually(what string, cond func() (bool, string)) {
	c.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	last := ""
	for time.Now().Before(deadline) {
		ok, s := cond()
		if ok {
			return
		}
		last = s
		time.Sleep(20 * time.Millisecond)
	}
	c.t.Fatalf("timed out waiting for %s; last: %s", what, last)
}

// run runs a client helper inside the client pod.
func (c *cluster) run(args ...string) podnet.ClientResult {
	c.t.Helper()
	var res podnet.ClientResult
	if err := c.client.Helper(c.env.Cgroup, &res, args[0], args[1:]...); err != nil {
		c.t.Fatal(err)
	}
	return res
}

// slots returns the number of IPv4 endpoint slots the kernel serves for a
// VIP:port over TCP (-1 when the kernel does not know the frontend).
func (c *cluster) slots(vip string, port uint16) int {
	m := c.agent.DP.Maps
	fes, err := m.Frontends()
	if err != nil {
		c.t.Fatal(err)
	}
	for _, f := range fes {
		if f.Key.Addr == netip.MustParseAddr(vip) && f.Key.Port == port && f.Key.Proto == bpf.TCP {
			svcs, err := m.Services()
			if err != nil {
				c.t.Fatal(err)
			}
			for _, s := range svcs {
				if s.ID == f.ID {
					n := 0
					for _, v := range s.Counts[bpf.FamilyV4] {
						n += int(v)
					}
					return n
				}
			}
			return 0
		}
	}
	return -1
}
