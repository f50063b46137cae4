package simexternal

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"kmesh.dev/kmesh/integration/cluster/bins"
	"kmesh.dev/kmesh/integration/sim"
)

// TestPrivilegedSimExternalNodeProxy runs the rendered profile's node
// proxy (DaemonSet ztunnel: kmesh-daemon with the command, env and mounts
// profiles/kmesh.yaml gives it) beside Istio's real CNI node agent on a
// simulated node. Without a reachable istiod it cannot become Ready (and
// must not: its readiness is the xDS connection), but it must run without
// restarting, attach to the node's cgroup (its pins appear in the node's
// bpffs directory, its /sys/fs/bpf), and take pods from the agent over ZDS:
// the agent only annotates a pod redirection=enabled once the node proxy
// acked it.
func TestPrivilegedSimExternalNodeProxy(t *testing.T) {
	cp, paths := controlPlane(t)
	daemon, err := sim.BuildDaemon(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	objs := render(t, paths[bins.Istioctl])
	c := startSimWith(t, cp, paths, 1, map[string]sim.Image{"ghcr.io/kmesh-dev/kmesh:latest": {Entrypoint: daemon}})
	n1 := c.Node("node-1")
	k := cp.Kube
	ctx := context.Background()

	cni := applyIstioCNI(t, cp, objs)
	zt := applyNamed(t, cp, objs, "ztunnel")
	if _, err := k.CoreV1().Pods(zt.Namespace).Create(ctx, podOf(zt, "node-1"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := k.CoreV1().Pods(cni.Namespace).Create(ctx, podOf(cni, "node-1"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitReady(t, k, cni.Namespace, cni.Name+"-node-1", 90*time.Second)
	pins := filepath.Join(n1.HostPath("/sys/fs/bpf"), "kmesh")
	eventually(t, 60*time.Second, "the node proxy running with its programs pinned", func() (bool, string) {
		p, err := k.CoreV1().Pods(zt.Namespace).Get(ctx, zt.Name+"-node-1", metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		ents, _ := os.ReadDir(pins)
		s := p.Status.ContainerStatuses
		return len(s) == 1 && s[0].State.Running != nil && len(ents) > 0, fmt.Sprintf("statuses %+v, pins %d", s, len(ents))
	})

	const ns = "proxied"
	createNamespace(t, k, ns, map[string]string{"istio.io/dataplane-mode": "ambient"})
	if _, err := k.CoreV1().Pods(ns).Create(ctx, appPod(ns, "app", "node-1"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitReady(t, k, ns, "app", 30*time.Second)
	eventually(t, 30*time.Second, "the pod enrolled through the node proxy", func() (bool, string) {
		p, err := k.CoreV1().Pods(ns).Get(ctx, "app", metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		return p.Annotations["ambient.istio.io/redirection"] == "enabled", fmt.Sprint(p.Annotations)
	})
	p, err := k.CoreV1().Pods(zt.Namespace).Get(ctx, zt.Name+"-node-1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if s := p.Status.ContainerStatuses[0]; s.RestartCount != 0 || podReady(p) {
		t.Errorf("node proxy: restarts %d, ready %v (no istiod is reachable: it must run, unready)", s.RestartCount, podReady(p))
	}
	logs, _ := os.ReadFile(filepath.Join(c.RunDir, "node-1", "logs", "istio-system_ztunnel-node-1_istio-proxy.log"))
	if !strings.Contains(string(logs), "cgroup=/host/sys/fs/cgroup") {
		t.Errorf("the node proxy did not attach at the manifest's cgroup mount:\n%s", logs)
	}
	leavesNothing(t, c)
}
