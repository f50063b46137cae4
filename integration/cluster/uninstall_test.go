package cluster_test

// This file's test runs last (the package's files are taken in name
// order): it removes the install the others share.

import (
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"kmesh.dev/kmesh/integration/cluster"
	"kmesh.dev/kmesh/integration/installpkg"
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
// Kmesh's programs stay attached but act on no pod. Kmesh's kernel state (pinned maps, attached programs)
// outlives its pods by design (an upgrade or a crash must not drop the
// data path), so removing Kmesh from a node also needs `kmesh-daemon
// uninstall` there (README: a pod per node with the DaemonSet's bpffs and
// cgroup mounts, as below); after it nothing of Kmesh remains and the
// former mesh pods talk plain TCP to each other.
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
	ns, err := kube.CoreV1().Namespaces().Get(ctx, "shop", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	delete(ns.Labels, "istio.io/dataplane-mode")
	if _, err := kube.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
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
		pins, progs := kmeshState(t, n)
		t.Logf("%s after istioctl uninstall: %d Kmesh pins, programs attached %v (the data path outlives its pods)", n.Name, len(pins), progs)
	}
	// The programs left attached act on no pod: the former mesh pods
	// reach each other directly, same node and across.
	for _, dst := range []*meshPod{web1, web2} {
		eventually(t, fmt.Sprintf("plain TCP from the client to %s with Kmesh's programs still attached", dst.name), func() (bool, string) {
			return only(httpFrom(t, client, "http://"+dst.ip+":8080/", 5), dst.name)
		})
	}

	// What removes Kmesh from each node: kmesh-daemon uninstall in a pod
	// with the DaemonSet's bpffs and cgroup mounts and environment.
	dir := corev1.HostPathDirectory
	for _, n := range c.Nodes {
		name := "kmesh-uninstall-" + n.Name
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
			Spec: corev1.PodSpec{
				NodeName: n.Name, RestartPolicy: corev1.RestartPolicyNever,
				Containers: []corev1.Container{{
					Name: "uninstall", Image: installpkg.DefaultImage, Args: []string{"uninstall"},
					Env:          []corev1.EnvVar{{Name: "KMESH_PIN_ROOT", Value: "/sys/fs/bpf/kmesh"}, {Name: "KMESH_CGROUP_PATH", Value: "/host/sys/fs/cgroup"}},
					VolumeMounts: []corev1.VolumeMount{{Name: "bpffs", MountPath: "/sys/fs/bpf"}, {Name: "cgroup", MountPath: "/host/sys/fs/cgroup", ReadOnly: true}},
				}},
				Volumes: []corev1.Volume{
					{Name: "bpffs", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/sys/fs/bpf", Type: &dir}}},
					{Name: "cgroup", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/sys/fs/cgroup", Type: &dir}}},
				},
			},
		}
		if _, err := kube.CoreV1().Pods("default").Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(time.Minute)
		for {
			got, err := kube.CoreV1().Pods("default").Get(ctx, name, metav1.GetOptions{})
			if err == nil && got.Status.Phase == corev1.PodSucceeded {
				break
			}
			if err == nil && got.Status.Phase == corev1.PodFailed || time.Now().After(deadline) {
				logs, _ := filepath.Glob(filepath.Join(c.RunDir, n.Name, "logs", "default_"+name+"_*.log"))
				var text string
				for _, l := range logs {
					b, _ := os.ReadFile(l)
					text += string(b)
				}
				t.Fatalf("kmesh-daemon uninstall on %s: %v %v\n%s", n.Name, err, got.Status, text)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	for _, n := range c.Nodes {
		pins, progs := kmeshState(t, n)
		if len(pins) > 0 || len(progs) > 0 {
			t.Errorf("%s after kmesh-daemon uninstall: pins %v, programs %v", n.Name, pins, progs)
		}
	}
	// The former mesh pods reach each other directly, same node and across.
	for _, dst := range []*meshPod{web1, web2} {
		eventually(t, fmt.Sprintf("plain TCP from the client to %s", dst.name), func() (bool, string) {
			return only(httpFrom(t, client, "http://"+dst.ip+":8080/", 5), dst.name)
		})
	}
}
