package cluster_test

// This file's test runs last (the package's files are taken in name
// order): it removes the install the others share.

import (
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"kmesh.dev/kmesh/integration/cluster"
	"kmesh.dev/kmesh/integration/sim"
)

// kmeshState lists what Kmesh holds on a node: its pins (under the node's
// /sys/fs/bpf/kmesh) and the kmesh_* programs attached to the node's
// cgroup (bpftool).
func kmeshState(t *testing.T, n *sim.Node) (pins, progs []string) {
	t.Helper()
	root := filepath.Join(n.BPFFS(), "kmesh")
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			pins = append(pins, strings.TrimPrefix(p, root+"/"))
		}
		return nil
	})
	out, err := exec.Command("bpftool", "-j", "cgroup", "show", n.Cgroup.Path).Output()
	if err != nil {
		t.Fatalf("bpftool cgroup show %s: %v", n.Cgroup.Path, err)
	}
	var att []struct {
		Name       string `json:"name"`
		AttachType string `json:"attach_type"`
	}
	if len(strings.TrimSpace(string(out))) > 0 {
		if err := json.Unmarshal(out, &att); err != nil {
			t.Fatalf("bpftool output: %v: %s", err, out)
		}
	}
	for _, a := range att {
		if strings.HasPrefix(a.Name, "kmesh") {
			progs = append(progs, a.AttachType+":"+a.Name)
		}
	}
	return pins, progs
}

// istioRules lists the lines naming ISTIO in a network namespace's
// iptables (nf_tables and legacy), run inside a pod's container or, for
// a node, inside the node.
func istioRules(t *testing.T, run func(argv ...string) ([]byte, error)) []string {
	t.Helper()
	var out []string
	for _, save := range []string{"iptables-save", "iptables-legacy-save", "ip6tables-save"} {
		b, err := run(save)
		if err != nil {
			t.Fatalf("%s: %v: %s", save, err, b)
		}
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, "ISTIO") {
				out = append(out, save+": "+l)
			}
		}
	}
	return out
}

// TestPrivilegedClusterUninstall: Istio's ambient uninstall as its docs
// give it (the namespace label removed first, which takes the pods out of
// the mesh: istio-cni removes their rules, the node proxy lets them go;
// then `istioctl uninstall --purge -y`) removes Istio and the node
// proxies, and no istio-cni rule remains in the pods or on the nodes.
// Kmesh's kernel state (pinned maps, attached programs) outlives a daemon
// by design (an upgrade or a crash must not drop the data path), but the
// last daemon of a node, stopping with no pod enrolled and no newer daemon
// holding the data path, removes it (KMESH_REMOVE_WHEN_IDLE, which the
// profile sets): nothing of Kmesh remains (bpftool, the pin directory) and
// the former mesh pods talk plain TCP to each other.
func TestPrivilegedClusterUninstall(t *testing.T) {
	c, _ := theShop(t)
	kube := shared.cp.Kube
	ctx := context.Background()
	client, web1, web2 := pod(t, c, "shop", "client"), pod(t, c, "shop", "web-1"), pod(t, c, "shop", "web-2")
	// Before: what the checks below look for is there (so they can fail).
	for _, n := range c.Nodes {
		pins, progs := kmeshState(t, n)
		if len(pins) == 0 || len(progs) == 0 {
			t.Fatalf("%s before the uninstall: pins %v, programs %v (expected both)", n.Name, pins, progs)
		}
	}
	inPod := func(p *meshPod) []string {
		return istioRules(t, func(argv ...string) ([]byte, error) { return p.node.Exec(ctx, p.ns, p.name, "", argv...) })
	}
	onNode := func(n *sim.Node) []string {
		return istioRules(t, func(argv ...string) ([]byte, error) {
			var b []byte
			err := n.Net.NS.Do(func() (err error) { b, err = exec.Command(argv[0], argv[1:]...).CombinedOutput(); return err })
			return b, err
		})
	}
	if r := inPod(web1); len(r) == 0 {
		t.Fatal("web-1 has no in-pod ISTIO rules before the uninstall")
	}

	// Istio's ambient uninstall: "You must remove workloads from the
	// ambient data plane before uninstalling Istio": the namespace label
	// goes, istio-cni removes the pods' rules and annotation and tells the
	// node proxy (ZDS del).
	nss := kube.CoreV1().Namespaces()
	if _, err := sim.Modify(ctx, "shop", nss.Get, nss.Update, func(ns *corev1.Namespace) {
		delete(ns.Labels, "istio.io/dataplane-mode")
	}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the shop's pods out of the mesh (annotation and in-pod rules gone)", func() (bool, string) {
		for _, p := range []*meshPod{client, web1, web2} {
			obj, err := kube.CoreV1().Pods(p.ns).Get(ctx, p.name, metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			if a, ok := obj.Annotations["ambient.istio.io/redirection"]; ok {
				return false, fmt.Sprintf("%s annotated %s", p.name, a)
			}
			if r := inPod(p); len(r) > 0 {
				return false, fmt.Sprintf("%s has rules %v", p.name, r)
			}
		}
		return true, ""
	})

	start := time.Now()
	out, err := cluster.IstioctlUninstall(ctx, mesh.istioctl, shared.cp.Kubeconfig, filepath.Join(shared.cp.Dir, "istioctl.log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("istioctl uninstall --purge -y:\n%s", out)
	for {
		pods, err := kube.CoreV1().Pods(cluster.IstioNamespace).List(ctx, metav1.ListOptions{})
		if err == nil && len(pods.Items) == 0 {
			break
		}
		if time.Since(start) > 2*time.Minute {
			dumpPods(t)
			t.Fatalf("istio-system pods still there 2 minutes after the uninstall")
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("istio-system empty %s after istioctl uninstall", time.Since(start).Round(time.Millisecond))
	for _, p := range []*meshPod{client, web1, web2} {
		if r := inPod(p); len(r) > 0 {
			t.Errorf("%s/%s keeps istio-cni's in-pod rules after the uninstall: %v", p.ns, p.name, r)
		}
	}
	for _, n := range c.Nodes {
		if r := onNode(n); len(r) > 0 {
			t.Errorf("node %s keeps istio-cni's rules after the uninstall: %v", n.Name, r)
		}
		// The node's last daemon stopped with no pod enrolled and no newer
		// daemon holding the data path (KMESH_REMOVE_WHEN_IDLE, set by the
		// profile): it detached and unpinned it, no manual step.
		pins, progs := kmeshState(t, n)
		if len(pins) > 0 || len(progs) > 0 {
			t.Errorf("%s after istioctl uninstall: pins %v, programs %v", n.Name, pins, progs)
		}
	}
	// The former mesh pods reach each other directly, same node and across.
	for _, dst := range []*meshPod{web1, web2} {
		eventually(t, fmt.Sprintf("plain TCP from the client to %s", dst.name), func() (bool, string) {
			return only(httpFrom(t, client, "http://"+dst.ip+":8080/", 5), dst.name)
		})
	}
}
