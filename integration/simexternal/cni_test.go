package simexternal

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"istio.io/istio/pkg/zdsapi"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/intstr"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	"kmesh.dev/kmesh/cni/zds"
	"kmesh.dev/kmesh/integration/cluster"
	"kmesh.dev/kmesh/integration/cluster/bins"
	"kmesh.dev/kmesh/integration/installpkg"
	"kmesh.dev/kmesh/integration/sim"
)

// render runs `istioctl manifest generate --manifests <make manifests
// output> --set profile=kmesh` and returns its objects.
func render(t *testing.T, istioctl string) []*unstructured.Unstructured {
	t.Helper()
	root, err := bins.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	istio, err := installpkg.IstioManifestsDir(root)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "manifests")
	if _, err := installpkg.Assemble(installpkg.Options{IstioManifests: istio, Profiles: filepath.Join(root, "profiles"), Out: out}); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(istioctl, "manifest", "generate", "--manifests", out, "--set", "profile=kmesh")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	y, err := cmd.Output()
	if err != nil {
		t.Fatalf("istioctl manifest generate: %v: %s", err, stderr.String())
	}
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(y), 4096)
	var objs []*unstructured.Unstructured
	for {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			t.Fatal(err)
		}
		if len(m) > 0 {
			objs = append(objs, &unstructured.Unstructured{Object: m})
		}
	}
	return objs
}

var gvrs = map[string]schema.GroupVersionResource{
	"ServiceAccount":     {Version: "v1", Resource: "serviceaccounts"},
	"ConfigMap":          {Version: "v1", Resource: "configmaps"},
	"ClusterRole":        {Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterroles"},
	"ClusterRoleBinding": {Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterrolebindings"},
	"DaemonSet":          {Group: "apps", Version: "v1", Resource: "daemonsets"},
}

// applyIstioCNI creates the istio-cni objects of the rendered manifest
// (ServiceAccount, RBAC, ConfigMap, DaemonSet) and returns the DaemonSet.
func applyIstioCNI(t *testing.T, cp *cluster.ControlPlane, objs []*unstructured.Unstructured) *appsv1.DaemonSet {
	return applyNamed(t, cp, objs, "istio-cni")
}

// applyNamed creates the rendered objects whose name starts with prefix
// and returns the DaemonSet among them.
func applyNamed(t *testing.T, cp *cluster.ControlPlane, objs []*unstructured.Unstructured, prefix string) *appsv1.DaemonSet {
	t.Helper()
	ctx := context.Background()
	var ds *appsv1.DaemonSet
	for _, o := range objs {
		gvr, ok := gvrs[o.GetKind()]
		if !ok || !strings.HasPrefix(o.GetName(), prefix) {
			continue
		}
		var err error
		if o.GetNamespace() != "" {
			_, err = cp.Dynamic.Resource(gvr).Namespace(o.GetNamespace()).Create(ctx, o, metav1.CreateOptions{})
		} else {
			_, err = cp.Dynamic.Resource(gvr).Create(ctx, o, metav1.CreateOptions{})
		}
		if err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatalf("creating %s %s: %v", o.GetKind(), o.GetName(), err)
		}
		if o.GetKind() == "DaemonSet" {
			ds = &appsv1.DaemonSet{}
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, ds); err != nil {
				t.Fatal(err)
			}
		}
	}
	if ds == nil {
		t.Fatalf("no %s DaemonSet in the rendered manifest", prefix)
	}
	return ds
}

// appPod is a plain app: the inspect server, probed on /ready.
func appPod(ns, name, node string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{NodeName: node, TerminationGracePeriodSeconds: ptr(int64(10)), Containers: []corev1.Container{{
			Name: "app", Image: appImage,
			Env: []corev1.EnvVar{{Name: "KMESH_PODNET_HELPER", Value: "inspect"}},
			ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromInt32(8080)}},
				PeriodSeconds: 1},
		}}},
	}
}

// podOf makes the pod the DaemonSet controller would make for node.
func podOf(ds *appsv1.DaemonSet, node string) *corev1.Pod {
	tpl := ds.Spec.Template.DeepCopy()
	pod := &corev1.Pod{ObjectMeta: tpl.ObjectMeta, Spec: tpl.Spec}
	pod.Name = ds.Name + "-" + node
	pod.Namespace = ds.Namespace
	pod.Spec.NodeName = node
	return pod
}

// zdsRecorder is the node proxy's side of ZDS (what kmesh-daemon runs),
// recording what the node agent sends.
type zdsRecorder struct {
	mu     sync.Mutex
	added  map[string]uint64 // uid -> netns inode
	events []string
}

func (r *zdsRecorder) Add(uid string, _ *zdsapi.WorkloadInfo, netns *os.File) error {
	defer netns.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(netns.Fd()), &st); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.added[uid] = st.Ino
	r.events = append(r.events, "add "+uid)
	return nil
}

func (r *zdsRecorder) Keep(uid string) error { r.record("keep " + uid); return nil }
func (r *zdsRecorder) Del(uid string) error {
	r.mu.Lock()
	delete(r.added, uid)
	r.mu.Unlock()
	r.record("del " + uid)
	return nil
}
func (r *zdsRecorder) SnapshotSent() error { r.record("snapshot"); return nil }
func (r *zdsRecorder) record(e string) {
	r.mu.Lock()
	r.events = append(r.events, e)
	r.mu.Unlock()
}

func (r *zdsRecorder) log() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.events...)
}

func (r *zdsRecorder) netns(uid string) (uint64, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	ino, ok := r.added[uid]
	return ino, ok
}

func inode(path string) uint64 {
	var st syscall.Stat_t
	if syscall.Stat(path, &st) != nil {
		return 0
	}
	return st.Ino
}

// machineIstioRules counts Istio's chains in the machine's own network
// namespace (iptables-nft and legacy): the node agent must never add any.
func machineIstioRules(t *testing.T) int {
	n := 0
	for _, save := range []string{"iptables-nft-save", "iptables-legacy-save"} {
		out, err := exec.Command(save).CombinedOutput()
		if err != nil {
			// A missing tool would count 0 rules, before and after.
			t.Fatalf("%s: %v: %s", save, err, out)
		}
		n += strings.Count(string(out), "ISTIO")
	}
	return n
}

// TestPrivilegedSimExternalIstioCNI runs Istio's real CNI node agent
// (install-cni, the istio-cni-node pod of `istioctl manifest generate
// --set profile=kmesh`) on a simulated node of a real API server: it
// becomes Ready; it chains istio-cni into the node's CNI config; a pod
// of an ambient namespace created afterwards goes through the kubelet's CNI
// ADD of the real istio-cni plugin, is annotated
// ambient.istio.io/redirection=enabled, arrives on the node's ZDS socket
// with its own network namespace and gets the in-pod iptables rules; a pod
// that ran before its namespace joined is enrolled through /proc (the
// node's PID namespace and the pod<uid>/<container> cgroup shape);
// deleting a pod runs CNI DEL and unenrols it; the machine's own network
// namespace gets no Istio rule.
func TestPrivilegedSimExternalIstioCNI(t *testing.T) {
	cp, paths := controlPlane(t)
	objs := render(t, paths[bins.Istioctl])
	rulesBefore := machineIstioRules(t)
	c := startSim(t, cp, paths, 1)
	n1 := c.Node("node-1")
	k := cp.Kube
	ctx := context.Background()

	rec := &zdsRecorder{added: map[string]uint64{}}
	zctx, zstop := context.WithCancel(ctx)
	zdone := make(chan struct{})
	sock := filepath.Join(n1.HostPath("/var/run/ztunnel"), "ztunnel.sock")
	go func() {
		defer close(zdone)
		_ = (&zds.Client{Path: sock, Handler: rec, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}).Run(zctx)
	}()
	defer func() { zstop(); <-zdone }()

	// A pod that runs before its namespace joins the mesh (and before the
	// node agent exists).
	const ns = "mesh"
	createNamespace(t, k, ns, nil)
	early := appPod(ns, "early", "node-1")
	if _, err := k.CoreV1().Pods(ns).Create(ctx, early, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	earlyPod := waitReady(t, k, ns, "early", 30*time.Second)

	ds := applyIstioCNI(t, cp, objs)
	start := time.Now()
	if _, err := k.CoreV1().Pods(ds.Namespace).Create(ctx, podOf(ds, "node-1"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitReady(t, k, ds.Namespace, ds.Name+"-node-1", 90*time.Second)
	t.Logf("istio-cni-node Ready %s after creation", time.Since(start).Round(time.Millisecond))
	conflist := filepath.Join(n1.HostPath("/etc/cni/net.d"), "10-kmesh-sim.conflist")
	eventually(t, 30*time.Second, "istio-cni chained into the node's CNI config", func() (bool, string) {
		b, _ := os.ReadFile(conflist)
		return bytes.Contains(b, []byte(`"type": "istio-cni"`)) || bytes.Contains(b, []byte(`"type":"istio-cni"`)), string(b)
	})
	if _, err := os.Stat(filepath.Join(n1.HostPath("/opt/cni/bin"), "istio-cni")); err != nil {
		t.Errorf("the plugin was not installed: %v", err)
	}

	// The namespace joins: the running pod is enrolled through /proc.
	nss := k.CoreV1().Namespaces()
	if _, err := sim.Modify(ctx, ns, nss.Get, nss.Update, func(nso *corev1.Namespace) {
		if nso.Labels == nil {
			nso.Labels = map[string]string{}
		}
		nso.Labels["istio.io/dataplane-mode"] = "ambient"
	}); err != nil {
		t.Fatal(err)
	}
	enrolled := func(pod *corev1.Pod) {
		t.Helper()
		pin := filepath.Join(n1.HostPath("/run/netns"), "cni-"+string(pod.UID))
		eventually(t, 30*time.Second, pod.Name+" enrolled (annotation and ZDS)", func() (bool, string) {
			p, err := k.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			ino, ok := rec.netns(string(pod.UID))
			return p.Annotations["ambient.istio.io/redirection"] == "enabled" && ok && ino == inode(pin),
				fmt.Sprintf("annotations %v, zds %v (netns %d, pin %d)", p.Annotations, rec.log(), ino, inode(pin))
		})
		eventually(t, 15*time.Second, pod.Name+" in-pod rules", func() (bool, string) {
			out, err := n1.Exec(ctx, ns, pod.Name, "app", "sh", "-c", "iptables-nft-save; iptables-legacy-save")
			s := string(out)
			return err == nil && strings.Contains(s, "15001") && strings.Contains(s, "15006"), s
		})
	}
	enrolled(earlyPod)

	// A pod created now goes through CNI ADD of the real plugin.
	late := appPod(ns, "late", "node-1")
	if _, err := k.CoreV1().Pods(ns).Create(ctx, late, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	latePod := waitReady(t, k, ns, "late", 30*time.Second)
	enrolled(latePod)
	want := "ADD istio-cni " + ns + "/late"
	if calls := n1.CNICalls(); !strings.Contains(strings.Join(calls, "\n"), want) {
		t.Errorf("CNI calls %v lack %q", calls, want)
	}

	// Deletion: CNI DEL, unenrolled, gone.
	if err := k.CoreV1().Pods(ns).Delete(ctx, "late", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "late deleted and unenrolled", func() (bool, string) {
		_, err := k.CoreV1().Pods(ns).Get(ctx, "late", metav1.GetOptions{})
		_, enrolled := rec.netns(string(latePod.UID))
		return apierrors.IsNotFound(err) && !enrolled, fmt.Sprintf("get: %v, zds: %v", err, rec.log())
	})
	if calls := n1.CNICalls(); !strings.Contains(strings.Join(calls, "\n"), "DEL istio-cni "+ns+"/late") {
		t.Errorf("CNI calls %v lack DEL for late", calls)
	}
	if after := machineIstioRules(t); after != rulesBefore {
		t.Errorf("the machine's own network namespace gained Istio rules: %d ISTIO mentions, %d before", after, rulesBefore)
	}
	zstop()
	<-zdone
	leavesNothing(t, c)
}
