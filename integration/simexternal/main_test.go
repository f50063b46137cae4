// Package simexternal tests the simulator's external mode (sim.External):
// its nodes as kubelets of a real kube-apiserver (integration/cluster's
// control plane), running pods as processes with their real command, env,
// volumes, probes and CNI chain.
package simexternal

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"kmesh.dev/kmesh/integration/cluster"
	"kmesh.dev/kmesh/integration/cluster/bins"
	"kmesh.dev/kmesh/integration/kerneltest"
	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/integration/sim"
)

func TestMain(m *testing.M) {
	podnet.MaybeRunHelper()
	code := m.Run()
	if shared.cp != nil {
		shared.cp.Close()
	}
	for _, p := range shared.egress {
		_ = p.Close()
	}
	if shared.run != nil && code == 0 {
		_ = shared.run.Close()
	}
	os.Exit(code)
}

// appImage is the image of the test's own apps: the test binary, whose
// helper (KMESH_PODNET_HELPER in the container's env) picks the app.
const appImage = "kmesh-sim.test/app:latest"

func init() {
	podnet.RegisterHelper("inspect", inspectApp)
}

// inspectApp serves what a container sees: GET /env, /file?path=, /self
// (its own Pod through the in-cluster client config: token, CA and
// KUBERNETES_SERVICE_HOST from the kube-api-access volume and the
// kubelet), /ready; /exit?code= exits.
func inspectApp([]string) (any, error) {
	mux := http.NewServeMux()
	mux.HandleFunc("/env", func(w http.ResponseWriter, _ *http.Request) {
		env := os.Environ()
		sort.Strings(env)
		_ = json.NewEncoder(w).Encode(env)
	})
	mux.HandleFunc("/file", func(w http.ResponseWriter, r *http.Request) {
		b, err := os.ReadFile(r.URL.Query().Get("path"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		_, _ = w.Write(b)
	})
	mux.HandleFunc("/self", func(w http.ResponseWriter, r *http.Request) {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		k, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		ns, _ := os.ReadFile("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
		_, err = k.CoreV1().Pods(string(ns)).Get(r.Context(), os.Getenv("POD_NAME"), metav1.GetOptions{})
		if err != nil {
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		}
		fmt.Fprint(w, "ok")
	})
	mux.HandleFunc("/ready", func(w http.ResponseWriter, _ *http.Request) {
		if _, err := os.Stat("/tmp/not-ready"); err == nil {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprint(w, "ok")
	})
	mux.HandleFunc("/live", func(w http.ResponseWriter, _ *http.Request) {
		if _, err := os.Stat("/tmp/not-live"); err == nil {
			http.Error(w, "not live", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprint(w, "ok")
	})
	mux.HandleFunc("/exit", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "bye")
		go func() { time.Sleep(50 * time.Millisecond); os.Exit(3) }()
	})
	l, err := net.Listen("tcp", ":8080")
	if err != nil {
		return nil, err
	}
	go func() { _ = http.Serve(l, mux) }()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM)
	<-sig
	if os.Getenv("INSPECT_IGNORE_SIGTERM") != "" {
		fmt.Println("SIGTERM ignored")
		select {} // until SIGKILL
	}
	// Record the SIGTERM where the test can see it (an emptyDir on a
	// hostPath would be better; the log is enough).
	fmt.Println("SIGTERM received")
	return nil, nil
}

var shared struct {
	once  sync.Once
	run   *cluster.Run
	cp    *cluster.ControlPlane
	paths map[string]string
	// egress: the API server's only ways out, loopback only (these tests
	// need no call into the nodes; the nodes' InternalIPs are not reachable
	// from the machine's namespace and must never be dialled from it).
	egress []*cluster.EgressProxy
	err    error
}

// controlPlane starts integration/cluster's control plane once per test
// binary (etcd, kube-apiserver, kube-controller-manager, Istio's CRDs and
// pilot-discovery on 127.0.0.1).
func controlPlane(t *testing.T) (*cluster.ControlPlane, map[string]string) {
	t.Helper()
	kerneltest.RequireRoot(t)
	shared.once.Do(func() {
		b, err := bins.New()
		if err != nil {
			shared.err = err
			return
		}
		b.Log = t.Logf
		if shared.paths, shared.err = b.Paths(bins.Etcd, bins.KubeAPIServer, bins.KubeControllerManager, bins.PilotDiscovery,
			bins.InstallCNI, bins.IstioCNI, bins.Istioctl); shared.err != nil {
			return
		}
		if shared.run, shared.err = cluster.NewRun(); shared.err != nil {
			return
		}
		dir := filepath.Join(shared.run.Dir, "controlplane")
		if shared.err = os.Mkdir(dir, 0o700); shared.err != nil {
			return
		}
		socks := &cluster.EgressSockets{Cluster: filepath.Join(dir, "egress-cluster.sock"), ControlPlane: filepath.Join(dir, "egress-controlplane.sock")}
		for _, sock := range []string{socks.Cluster, socks.ControlPlane} {
			// Its refusals may come after the test that started it ended.
			p, err := cluster.ListenLoopbackEgress(sock, func(f string, a ...any) { fmt.Fprintf(os.Stderr, "egress: "+f+"\n", a...) })
			if err != nil {
				shared.err = err
				return
			}
			shared.egress = append(shared.egress, p)
		}
		shared.cp, shared.err = cluster.Start(context.Background(), cluster.Options{Dir: dir, Bins: shared.paths, Log: t.Logf, Egress: socks})
	})
	if shared.err != nil {
		t.Fatal(shared.err)
	}
	return shared.cp, shared.paths
}

type testLog struct{ t *testing.T }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// startSim starts the simulator's nodes as kubelets of cp.
func startSim(t *testing.T, cp *cluster.ControlPlane, paths map[string]string, nodes int) *sim.Cluster {
	t.Helper()
	return startSimWith(t, cp, paths, nodes, nil)
}

// startSimWith also knows the extra images.
func startSimWith(t *testing.T, cp *cluster.ControlPlane, paths map[string]string, nodes int, extra map[string]sim.Image) *sim.Cluster {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(cp.REST.Host)
	if err != nil {
		t.Fatal(err)
	}
	images := map[string]sim.Image{
		appImage: {Entrypoint: self},
		"registry.istio.io/testing/install-cni:latest-distroless": {Entrypoint: paths[bins.InstallCNI],
			Files: map[string]string{"/opt/cni/bin/istio-cni": paths[bins.IstioCNI]}},
	}
	for k, v := range extra {
		images[k] = v
	}
	c, err := sim.Start(context.Background(), sim.Options{Nodes: nodes,
		Log: slog.New(slog.NewTextHandler(testLog{t}, &slog.HandlerOptions{Level: slog.LevelWarn})),
		External: &sim.External{Config: cp.REST, APIServer: u.Host, Image: func(image string) (sim.Image, bool) {
			img, ok := images[image]
			return img, ok
		}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			logs, _ := filepath.Glob(filepath.Join(c.RunDir, "*", "logs", "*.log"))
			for _, l := range logs {
				b, _ := os.ReadFile(l)
				if len(b) > 8000 {
					b = b[len(b)-8000:]
				}
				t.Logf("--- %s:\n%s", l, b)
			}
			pods, _ := cp.Kube.CoreV1().Pods("").List(context.Background(), metav1.ListOptions{})
			for _, p := range pods.Items {
				b, _ := json.Marshal(p.Status)
				t.Logf("pod %s/%s node=%s status=%s", p.Namespace, p.Name, p.Spec.NodeName, b)
			}
		}
		if err := c.Close(); err != nil {
			t.Errorf("closing the simulator: %v", err)
		}
		// The control plane is shared: the next test's nodes have the same
		// names and would run this test's pods.
		zero := int64(0)
		for _, n := range c.Nodes {
			pods, _ := cp.Kube.CoreV1().Pods("").List(context.Background(), metav1.ListOptions{FieldSelector: "spec.nodeName=" + n.Name})
			for _, p := range pods.Items {
				_ = cp.Kube.CoreV1().Pods(p.Namespace).Delete(context.Background(), p.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
			}
		}
	})
	return c
}

func eventually(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := ""
	for time.Now().Before(deadline) {
		ok, s := cond()
		if ok {
			return
		}
		last = s
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("timed out after %s waiting for %s; last: %s", timeout, what, last)
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// waitReady waits for a pod to be Ready and returns it.
func waitReady(t *testing.T, k kubernetes.Interface, ns, name string, timeout time.Duration) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	eventually(t, timeout, ns+"/"+name+" Ready", func() (bool, string) {
		p, err := k.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		pod = p
		b, _ := json.Marshal(p.Status)
		return podReady(p), string(b)
	})
	return pod
}

// get fetches url from inside node's network namespace.
func get(ctx context.Context, n *sim.Node, u string) (int, string, error) {
	hc := &http.Client{Transport: &http.Transport{DialContext: n.DialContext, DisableKeepAlives: true}, Timeout: 5 * time.Second}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, string(b), err
}
