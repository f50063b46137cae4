package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/podnet"
)

const webServiceYAML = `---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
`

func metricValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			sum += m.GetCounter().GetValue()
		}
	}
	return sum
}

// The control plane goes away and comes back changed: the kernel keeps
// serving the last state throughout, and converges once istiod is back.
func TestPrivilegedXDSControlPlaneRestart(t *testing.T) {
	c := newCluster(t, bpf.MapSizes{})
	for i, n := range []string{"web-0", "web-1", "web-2"} {
		c.addPod(n, 11+i, "node-1", "web")
	}
	c.objects += webServiceYAML
	c.startControlPlane()
	c.startAgent()
	c.eventually("3 endpoints", func() (bool, string) { n := c.slots("10.96.0.10", 80); return n == 3, fmt.Sprint(n) })

	c.stopControlPlane()
	time.Sleep(300 * time.Millisecond) // the agent notices and starts retrying
	res := c.run("tcp", "-addr", "10.96.0.10:80", "-n", "300", "-network", "tcp4")
	if res.Errors.Total() != 0 || len(res.Names) != 3 {
		t.Fatalf("during the outage: %v errors %v", res.Names, res.Errors)
	}
	if n := c.slots("10.96.0.10", 80); n != 3 {
		t.Fatalf("kernel state flushed during the outage: %d slots", n)
	}

	// While istiod was down, web-2 went away.
	c.objects = strings.Replace(c.objects, podYAML("web-2", "10.244.1.13", "node-1", "web"), "", 1)
	c.startControlPlane()
	c.eventually("web-2 removed after reconnect", func() (bool, string) { n := c.slots("10.96.0.10", 80); return n == 2, fmt.Sprint(n) })
	expectOnly(t, c.run("tcp", "-addr", "10.96.0.10:80", "-n", "200", "-network", "tcp4").Names, "web-0:8080", "web-1:8080")
	if got := c.agent.Store.Workload("Kubernetes//Pod/demo/web-2"); got != nil {
		t.Fatalf("stale workload kept in state: %+v", got)
	}
	if v := metricValue(t, c.agent.Reg, "istio_xds_connection_terminations_total"); v < 1 {
		t.Fatalf("terminations metric %v, want >= 1", v)
	}
}

// The daemon restarts (an upgrade): the new one adopts the pinned state,
// rewrites nothing that is unchanged, and no connection through the VIP
// fails meanwhile.
func TestPrivilegedXDSDaemonRestart(t *testing.T) {
	c := newCluster(t, bpf.MapSizes{})
	for i, n := range []string{"web-0", "web-1", "web-2"} {
		c.addPod(n, 11+i, "node-1", "web")
	}
	c.objects += webServiceYAML
	c.startControlPlane()
	c.startAgent()
	c.eventually("3 endpoints", func() (bool, string) { n := c.slots("10.96.0.10", 80); return n == 3, fmt.Sprint(n) })
	before, err := c.agent.DP.Maps.Services()
	if err != nil {
		t.Fatal(err)
	}

	done := make(chan podnet.ClientResult)
	go func() {
		var res podnet.ClientResult
		if err := c.client.Helper(c.env.Cgroup, &res, "tcp", "-addr", "10.96.0.10:80", "-n", "3000", "-network", "tcp4"); err != nil {
			t.Error(err)
		}
		done <- res
	}()
	time.Sleep(50 * time.Millisecond)
	c.agent.Close()
	c.agent = nil
	time.Sleep(50 * time.Millisecond) // no daemon at all for a moment
	c.startAgent()
	res := <-done
	if res.Errors.Total() != 0 {
		t.Fatalf("connections failed across the daemon restart: %v", res.Errors)
	}
	expectOnly(t, res.Names, "web-0:8080", "web-1:8080", "web-2:8080")
	after, err := c.agent.DP.Maps.Services()
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(before) != fmt.Sprint(after) {
		t.Fatalf("unchanged service rewritten by the new daemon:\nbefore %+v\nafter  %+v", before, after)
	}
}

// A change the kernel cannot take (the endpoint map is too small) is NACKed
// and the last good state keeps serving; once the change no longer needs
// more room than there is, the kernel catches up.
func TestPrivilegedXDSKernelRefusalIsNacked(t *testing.T) {
	c := newCluster(t, bpf.MapSizes{Endpoint: 6})
	for i, n := range []string{"web-0", "web-1", "web-2"} {
		c.addPod(n, 11+i, "node-1", "web")
	}
	c.objects += webServiceYAML
	c.startControlPlane()
	c.startAgent()
	c.eventually("3 endpoints", func() (bool, string) { n := c.slots("10.96.0.10", 80); return n == 3, fmt.Sprint(n) })

	// Five endpoints next to the three live ones need 8 slots: no room.
	ctx := context.Background()
	for i, n := range []string{"web-3", "web-4"} {
		c.addPod(n, 14+i, "node-1", "web")
		if _, err := c.core().Pods(ns).Create(ctx, c.kubePod(n, c.pods[n].IPv4.String(), "node-1", "web"), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	c.eventually("a NACK", func() (bool, string) {
		v := metricValue(t, c.agent.Reg, "kmesh_xds_rejected_resources_total")
		return v >= 1, fmt.Sprint(v)
	})
	if !strings.Contains(c.logs.String(), "kmesh_endpoint") {
		t.Error("the log does not name the full map")
	}
	if n := c.slots("10.96.0.10", 80); n != 3 {
		t.Fatalf("%d slots after a refused update, want the last good 3", n)
	}
	expectOnly(t, c.run("tcp", "-addr", "10.96.0.10:80", "-n", "200", "-network", "tcp4").Names, "web-0:8080", "web-1:8080", "web-2:8080")

	for _, n := range []string{"web-3", "web-4"} {
		if err := c.core().Pods(ns).Delete(ctx, n, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	c.eventually("nothing left to retry", func() (bool, string) { return c.agent.Failed() == 0, fmt.Sprint(c.agent.Failed()) })
}
