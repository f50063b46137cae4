package sim_test

import (
	"context"
	"fmt"
	"log"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"kmesh.dev/kmesh/integration/kerneltest"
	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/integration/sim"
	"kmesh.dev/kmesh/kernel"
)

var daemonBin string

func TestMain(m *testing.M) {
	podnet.MaybeRunHelper()
	if os.Geteuid() == 0 {
		dir, err := os.MkdirTemp("", "kmesh-sim-test-")
		if err != nil {
			log.Fatal(err)
		}
		if daemonBin, err = sim.BuildDaemon(dir); err != nil {
			log.Fatal(err)
		}
		code := m.Run()
		os.RemoveAll(dir)
		os.Exit(code)
	}
	os.Exit(m.Run())
}

const objects = `
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}, {name: tcp, port: 90, targetPort: 9090, protocol: TCP}]
`

func echoPod(ns, name, node string, labels map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
		Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: "web",
			Containers: []corev1.Container{{Name: "echo", Command: []string{"echo", "-http", "8080", "-tcp", "9090"}}}},
	}
}

func clientPod(ns, name, node string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec:       corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "sleep", Command: []string{"sleep"}}}},
	}
}

func startCluster(t *testing.T) *sim.Cluster {
	return startClusterWith(t, sim.Options{Nodes: 2, Objects: objects})
}

func startClusterWith(t *testing.T, opts sim.Options) *sim.Cluster {
	kerneltest.RequireRoot(t)
	opts.DaemonBin = daemonBin
	opts.Log = slog.New(slog.NewTextHandler(testLog{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	c, err := sim.Start(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range c.Nodes {
				t.Logf("--- %s daemon log:\n%s", n.Name, n.Daemon.Log())
				t.Logf("--- %s config dump:\n%s", n.Name, n.Daemon.ConfigDump())
				logs, _ := filepath.Glob(filepath.Join(c.RunDir, n.Name, "*_*.log"))
				for _, l := range logs {
					b, _ := os.ReadFile(l)
					t.Logf("--- %s:\n%s", l, b)
				}
			}
			if k := c.Kube(); k != nil {
				pods, _ := k.CoreV1().Pods("").List(context.Background(), metav1.ListOptions{})
				for _, p := range pods.Items {
					t.Logf("pod %s/%s node=%s ip=%v phase=%s annotations=%v", p.Namespace, p.Name, p.Spec.NodeName, p.Status.PodIPs, p.Status.Phase, p.Annotations)
				}
			}
		}
		if err := c.Close(); err != nil {
			t.Errorf("closing the cluster: %v", err)
		}
	})
	return c
}

type testLog struct{ t *testing.T }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func create(t *testing.T, c *sim.Cluster, pods ...*corev1.Pod) {
	t.Helper()
	for _, p := range pods {
		if _, err := c.Kube().CoreV1().Pods(p.Namespace).Create(context.Background(), p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range pods {
		if _, err := c.WaitPod(p.Namespace, p.Name, 10*time.Second); err != nil {
			t.Fatal(err)
		}
	}
}

func eventually(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	last := ""
	for time.Now().Before(deadline) {
		ok, s := cond()
		if ok {
			return
		}
		last = s
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s; last: %s", what, last)
}

func httpFrom(t *testing.T, p *sim.Pod, url string, n int) podnet.ClientResult {
	t.Helper()
	var res podnet.ClientResult
	if err := p.Helper(&res, "http", "-url", url, "-n", fmt.Sprint(n)); err != nil {
		t.Fatal(err)
	}
	return res
}

func sameKeys(res podnet.ClientResult, want ...string) (bool, string) {
	got := res.Names
	if len(got) != len(want) {
		return false, fmt.Sprintf("%v errors %v", got, res.Errors)
	}
	for _, w := range want {
		if got[w] == 0 {
			return false, fmt.Sprint(got)
		}
	}
	return true, ""
}

// Service traffic across nodes, scale up and down, and pods outside the
// mesh left alone: on two simulated nodes with their own daemons, enrolled
// over ZDS, configured by Istio's discovery server.
func TestPrivilegedSimServiceAcrossNodes(t *testing.T) {
	c := startCluster(t)
	create(t, c,
		echoPod("demo", "web-0", "node-1", map[string]string{"app": "web"}),
		echoPod("demo", "web-1", "node-2", map[string]string{"app": "web"}),
		echoPod("demo", "web-2", "node-2", map[string]string{"app": "web"}),
		clientPod("demo", "client", "node-1"),
		clientPod("legacy", "outsider", "node-1"),
	)
	client, _ := c.Pod("demo", "client")
	outsider, _ := c.Pod("legacy", "outsider")
	eventually(t, "traffic to all three backends through the VIP", func() (bool, string) {
		return sameKeys(httpFrom(t, client, "http://10.96.0.10/", 60), "web-0", "web-1", "web-2")
	})
	if res := httpFrom(t, outsider, "http://10.96.0.10/", 3); res.Errors.Total() != 3 {
		t.Fatalf("a pod outside the mesh reached the VIP: %+v", res)
	}
	// A port the Service does not have: refused at connect by the kernel
	// (kmesh_vip, from real istiod's Service), not sent off the node to a
	// ClusterIP nobody answers.
	if res := httpFrom(t, client, "http://10.96.0.10:81/", 3); res.Errors["ECONNREFUSED"] != 3 {
		t.Fatalf("the VIP on a port its Service lacks: %+v, want 3 × ECONNREFUSED", res)
	}

	ctx := context.Background()
	if err := c.Kube().CoreV1().Pods("demo").Delete(ctx, "web-2", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "scale down to two", func() (bool, string) {
		return sameKeys(httpFrom(t, client, "http://10.96.0.10/", 40), "web-0", "web-1")
	})
	create(t, c, echoPod("demo", "web-3", "node-1", map[string]string{"app": "web"}))
	eventually(t, "scale up to three", func() (bool, string) {
		return sameKeys(httpFrom(t, client, "http://10.96.0.10/", 60), "web-0", "web-1", "web-3")
	})
}

// Nothing a cluster made survives it: namespaces, cgroups, pins, sockets,
// processes.
func TestPrivilegedSimLeavesNothing(t *testing.T) {
	kerneltest.RequireRoot(t)
	c, err := sim.Start(context.Background(), sim.Options{Nodes: 2, Objects: objects, DaemonBin: daemonBin})
	if err != nil {
		t.Fatal(err)
	}
	create(t, c, echoPod("demo", "web-0", "node-1", map[string]string{"app": "web"}), clientPod("demo", "client", "node-2"))
	pids := []int{}
	for _, n := range c.Nodes {
		pids = append(pids, n.Daemon.Pid())
	}
	runDir := c.RunDir
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	root, _ := kernel.Cgroup2Root()
	for _, p := range []string{filepath.Join(root, "kmesh-sim-"+c.ID), filepath.Join(sim.PinParent, c.ID)} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("left behind: %s", p)
		}
	}
	if _, err := os.Stat(runDir); err == nil {
		t.Errorf("run directory left: %s", runDir)
	}
	for _, pid := range pids {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
			t.Errorf("daemon process %d still runs", pid)
		}
	}
}
