package simexternal

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"kmesh.dev/kmesh/integration/sim"
	"kmesh.dev/kmesh/kernel"
)

func ptr[T any](v T) *T { return &v }

// createNamespace creates ns and waits for its default ServiceAccount
// (the controller manager's), which pods need.
func createNamespace(t *testing.T, k kubernetes.Interface, ns string, labels map[string]string) {
	t.Helper()
	ctx := context.Background()
	if _, err := k.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: labels}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, ns+"/default ServiceAccount", func() (bool, string) {
		_, err := k.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, fmt.Sprint(err)
	})
}

func inspectPod(ns, name, node string) *corev1.Pod {
	fr := func(p string) *corev1.EnvVarSource {
		return &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: p}}
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": "inspect", "tier": "test"}},
		Spec: corev1.PodSpec{
			NodeName:                      node,
			TerminationGracePeriodSeconds: ptr(int64(20)),
			Containers: []corev1.Container{{
				Name: "app", Image: appImage,
				Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
				Env: []corev1.EnvVar{
					{Name: "KMESH_PODNET_HELPER", Value: "inspect"},
					{Name: "POD_NAME", ValueFrom: fr("metadata.name")},
					{Name: "POD_NAMESPACE", ValueFrom: fr("metadata.namespace")},
					{Name: "POD_UID", ValueFrom: fr("metadata.uid")},
					{Name: "NODE", ValueFrom: fr("spec.nodeName")},
					{Name: "SA", ValueFrom: fr("spec.serviceAccountName")},
					{Name: "POD_IP", ValueFrom: fr("status.podIP")},
					{Name: "HOST_IP", ValueFrom: fr("status.hostIP")},
					{Name: "CPU_LIMIT", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "limits.cpu", Divisor: resource.MustParse("1")}}},
					{Name: "MEM_REQUEST_MI", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "requests.memory", Divisor: resource.MustParse("1Mi")}}},
					{Name: "GREETING", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "app-config"}, Key: "greeting"}}},
					{Name: "PASSWORD", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "app-secret"}, Key: "password"}}},
					{Name: "MISSING", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "nope"}, Key: "k", Optional: ptr(true)}}},
					{Name: "COMBINED", Value: "$(GREETING)-$(POD_NAME)-$$(POD_NAME)-$(UNDEFINED)"},
				},
				EnvFrom: []corev1.EnvFromSource{{Prefix: "CFG_", ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "app-config"}}}},
				Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("64Mi")},
					Limits: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("1500m")}},
				VolumeMounts: []corev1.VolumeMount{
					{Name: "cm", MountPath: "/etc/app/cm", ReadOnly: true},
					{Name: "sec", MountPath: "/etc/app/secret", ReadOnly: true},
					{Name: "podinfo", MountPath: "/etc/podinfo"},
					{Name: "tok", MountPath: "/var/run/secrets/tokens"},
					{Name: "scratch", MountPath: "/data"},
					{Name: "host", MountPath: "/host/test"},
				},
				ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromString("http")}},
					PeriodSeconds: 1, FailureThreshold: 1},
				LivenessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/live", Port: intstr.FromInt32(8080)}},
					PeriodSeconds: 1, FailureThreshold: 2, InitialDelaySeconds: 10}, // a slow start (-race) is not a failure
			}},
			Volumes: []corev1.Volume{
				{Name: "cm", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "app-config"},
					Items: []corev1.KeyToPath{{Key: "greeting", Path: "g.txt"}}}}},
				{Name: "sec", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "app-secret"}}},
				{Name: "podinfo", VolumeSource: corev1.VolumeSource{DownwardAPI: &corev1.DownwardAPIVolumeSource{Items: []corev1.DownwardAPIVolumeFile{
					{Path: "labels", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.labels"}},
					{Path: "name", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}},
				}}}},
				{Name: "tok", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{
					{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Audience: "test-aud", ExpirationSeconds: ptr(int64(3600)), Path: "token"}},
				}}}},
				{Name: "scratch", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
				{Name: "host", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/var/lib/simexternal-test", Type: ptr(corev1.HostPathDirectoryOrCreate)}}},
			},
		},
	}
}

// TestPrivilegedSimExternalPods: the simulator's nodes as kubelets of a
// real kube-apiserver. Node objects are Ready with a Lease; a pod runs as a
// process with the env, volumes and in-cluster API access Kubernetes gives
// it; its readiness follows its probe; a container that exits is restarted
// and counted; deletion sends SIGTERM and removes the pod object, its
// cgroup and netns pin; a hostNetwork pod runs in the node's namespace.
func TestPrivilegedSimExternalPods(t *testing.T) {
	cp, paths := controlPlane(t)
	c := startSim(t, cp, paths, 2)
	k := cp.Kube
	ctx := context.Background()

	for _, n := range c.Nodes {
		node, err := k.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ready, ip := false, ""
		for _, cond := range node.Status.Conditions {
			ready = ready || cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue
		}
		for _, a := range node.Status.Addresses {
			if a.Type == corev1.NodeInternalIP {
				ip = a.Address
			}
		}
		if !ready || ip != n.Net.Uplink4().String() || node.Labels["kubernetes.io/hostname"] != n.Name || node.Labels["kubernetes.io/os"] != "linux" {
			t.Errorf("node %s: ready=%v InternalIP=%s (want %s) labels=%v", n.Name, ready, ip, n.Net.Uplink4(), node.Labels)
		}
		if cpu := node.Status.Allocatable[corev1.ResourceCPU]; cpu.Cmp(resource.MustParse("2")) < 0 {
			t.Errorf("node %s allocatable cpu %s", n.Name, cpu.String())
		}
		var lease *coordinationv1.Lease
		if lease, err = k.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(ctx, n.Name, metav1.GetOptions{}); err != nil || lease.Spec.RenewTime == nil {
			t.Errorf("node %s lease: %v", n.Name, err)
		}
	}

	const ns = "apps"
	createNamespace(t, k, ns, nil)
	if _, err := k.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "app-config"},
		Data: map[string]string{"greeting": "hello", "level": "debug"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := k.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "app-secret"},
		Data: map[string][]byte{"password": []byte("s3cret")}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The in-cluster client reads its own pod.
	if _, err := k.RbacV1().Roles(ns).Create(ctx, &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: "pod-reader"},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get"}}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := k.RbacV1().RoleBindings(ns).Create(ctx, &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "pod-reader"},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "pod-reader"},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: "default", Namespace: ns}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	n1 := c.Node("node-1")
	hostFile := filepath.Join(n1.HostPath("/var/lib/simexternal-test"), "from-host")
	if err := os.MkdirAll(filepath.Dir(hostFile), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(hostFile, []byte("node file"), 0o644); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	if _, err := k.CoreV1().Pods(ns).Create(ctx, inspectPod(ns, "inspect", "node-1"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pod := waitReady(t, k, ns, "inspect", 30*time.Second)
	t.Logf("pod Ready %s after creation", time.Since(start).Round(time.Millisecond))
	if pod.Status.HostIP != n1.Net.Uplink4().String() || pod.Status.Phase != corev1.PodRunning || !strings.HasPrefix(pod.Status.PodIP, "10.244.1.") {
		t.Fatalf("status: phase %s podIP %s hostIP %s", pod.Status.Phase, pod.Status.PodIP, pod.Status.HostIP)
	}
	base := "http://" + pod.Status.PodIP + ":8080"
	fetch := func(path string) string {
		t.Helper()
		code, body, err := get(ctx, n1, base+path)
		if err != nil || code != 200 {
			t.Fatalf("GET %s: %d %v %s", path, code, err, body)
		}
		return body
	}

	var env []string
	if err := json.Unmarshal([]byte(fetch("/env")), &env); err != nil {
		t.Fatal(err)
	}
	host, port, _ := strings.Cut(strings.TrimPrefix(cp.REST.Host, "https://"), ":")
	for _, want := range []string{
		"POD_NAME=inspect", "POD_NAMESPACE=apps", "POD_UID=" + string(pod.UID), "NODE=node-1", "SA=default",
		"POD_IP=" + pod.Status.PodIP, "HOST_IP=" + n1.Net.Uplink4().String(),
		"CPU_LIMIT=2", "MEM_REQUEST_MI=64", "GREETING=hello", "PASSWORD=s3cret",
		"COMBINED=hello-inspect-$(POD_NAME)-$(UNDEFINED)", "CFG_greeting=hello", "CFG_level=debug",
		"KUBERNETES_SERVICE_HOST=" + host, "KUBERNETES_SERVICE_PORT=" + port,
	} {
		if !slices.Contains(env, want) {
			t.Errorf("env lacks %s", want)
		}
	}
	for _, e := range env {
		if strings.HasPrefix(e, "MISSING=") {
			t.Errorf("an optional missing ConfigMap key set %s", e)
		}
	}
	for path, want := range map[string]string{
		"/etc/app/cm/g.txt":        "hello",
		"/etc/app/secret/password": "s3cret",
		"/etc/podinfo/name":        "inspect",
		"/host/test/from-host":     "node file",
	} {
		if got := fetch("/file?path=" + path); got != want {
			t.Errorf("%s: %q, want %q", path, got, want)
		}
	}
	// The kubelet's /etc files: cluster search path, no nameserver (no
	// cluster DNS given: the machine's resolver is never used), the pod in
	// /etc/hosts.
	if got := fetch("/file?path=/etc/resolv.conf"); !strings.Contains(got, "search apps.svc.cluster.local svc.cluster.local cluster.local") || strings.Contains(got, "nameserver") {
		t.Errorf("resolv.conf: %q", got)
	}
	if got := fetch("/file?path=/etc/hosts"); !strings.Contains(got, pod.Status.PodIP+"\tinspect") {
		t.Errorf("hosts: %q", got)
	}
	if got := fetch("/file?path=/etc/podinfo/labels"); !strings.Contains(got, `app="inspect"`) {
		t.Errorf("labels file: %q", got)
	}
	// The projected token: audience, lifetime and pod binding.
	tok := fetch("/file?path=/var/run/secrets/tokens/token")
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		t.Fatalf("token %q", tok)
	}
	payload, _ := base64.RawURLEncoding.DecodeString(parts[1])
	var claims struct {
		Aud      []string `json:"aud"`
		Exp, Iat int64
		K8s      struct {
			Pod struct{ Name, UID string } `json:"pod"`
		} `json:"kubernetes.io"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(claims.Aud, []string{"test-aud"}) || claims.Exp-claims.Iat != 3600 || claims.K8s.Pod.Name != "inspect" || claims.K8s.Pod.UID != string(pod.UID) {
		t.Errorf("token claims: %s", payload)
	}
	// The kube-api-access volume ServiceAccount admission added, the
	// kubelet's forwarder and KUBERNETES_SERVICE_*: an in-cluster client.
	if got := fetch("/self"); got != "ok" {
		t.Errorf("/self: %s", got)
	}
	// emptyDir: written by exec, read by the app.
	if out, err := n1.Exec(ctx, ns, "inspect", "app", "sh", "-c", "echo -n scratch > /data/x"); err != nil {
		t.Fatalf("exec: %v: %s", err, out)
	}
	if got := fetch("/file?path=/data/x"); got != "scratch" {
		t.Errorf("emptyDir: %q", got)
	}
	// cgroup <node>/pod<uid>/<container id> holds the process.
	cid := strings.TrimPrefix(pod.Status.ContainerStatuses[0].ContainerID, "kmesh-sim://")
	procs, err := os.ReadFile(filepath.Join(n1.Cgroup.Path, "pod"+string(pod.UID), cid, "cgroup.procs"))
	if err != nil || len(strings.Fields(string(procs))) == 0 {
		t.Errorf("container cgroup: %v %q", err, procs)
	}

	// Readiness follows the probe.
	if out, err := n1.Exec(ctx, ns, "inspect", "app", "touch", "/tmp/not-ready"); err != nil {
		t.Fatalf("exec: %v: %s", err, out)
	}
	eventually(t, 15*time.Second, "NotReady after the probe fails", func() (bool, string) {
		p, err := k.CoreV1().Pods(ns).Get(ctx, "inspect", metav1.GetOptions{})
		return err == nil && !podReady(p), fmt.Sprint(err)
	})
	if out, err := n1.Exec(ctx, ns, "inspect", "app", "rm", "/tmp/not-ready"); err != nil {
		t.Fatalf("exec: %v: %s", err, out)
	}
	waitReady(t, k, ns, "inspect", 15*time.Second)

	// A container that exits is restarted, counted, and Ready again.
	fetch("/exit")
	eventually(t, 30*time.Second, "restart counted", func() (bool, string) {
		p, err := k.CoreV1().Pods(ns).Get(ctx, "inspect", metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		s := p.Status.ContainerStatuses[0]
		ok := s.RestartCount == 1 && s.LastTerminationState.Terminated != nil && s.LastTerminationState.Terminated.ExitCode == 3 && podReady(p)
		b, _ := json.Marshal(s)
		return ok, string(b)
	})

	// A failing liveness probe restarts the container, whose root is new
	// (the file that failed it is gone).
	if out, err := n1.Exec(ctx, ns, "inspect", "app", "touch", "/tmp/not-live"); err != nil {
		t.Fatalf("exec: %v: %s", err, out)
	}
	eventually(t, 30*time.Second, "liveness restart", func() (bool, string) {
		p, err := k.CoreV1().Pods(ns).Get(ctx, "inspect", metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		s := p.Status.ContainerStatuses[0]
		ok := s.RestartCount == 2 && s.LastTerminationState.Terminated != nil && s.LastTerminationState.Terminated.ExitCode == 137 && podReady(p)
		b, _ := json.Marshal(s)
		return ok, string(b)
	})

	// A hostNetwork pod: the node's address, probed there.
	hp := inspectPod(ns, "inspect-host", "node-2")
	hp.Spec.HostNetwork = true
	hp.Spec.Containers[0].VolumeMounts = nil
	hp.Spec.Volumes = nil
	if _, err := k.CoreV1().Pods(ns).Create(ctx, hp, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	hpod := waitReady(t, k, ns, "inspect-host", 30*time.Second)
	if hpod.Status.PodIP != c.Node("node-2").Net.Uplink4().String() {
		t.Errorf("hostNetwork pod IP %s, want the node's %s", hpod.Status.PodIP, c.Node("node-2").Net.Uplink4())
	}

	// Deletion of a container that ignores SIGTERM: preStop runs first,
	// SIGKILL after the grace period.
	stubborn := inspectPod(ns, "stubborn", "node-1")
	stubborn.Spec.TerminationGracePeriodSeconds = ptr(int64(2))
	stubborn.Spec.Containers[0].Env = append(stubborn.Spec.Containers[0].Env, corev1.EnvVar{Name: "INSPECT_IGNORE_SIGTERM", Value: "1"})
	stubborn.Spec.Containers[0].Lifecycle = &corev1.Lifecycle{PreStop: &corev1.LifecycleHandler{Exec: &corev1.ExecAction{
		Command: []string{"sh", "-c", "echo -n ran > /host/test/prestop"}}}}
	if _, err := k.CoreV1().Pods(ns).Create(ctx, stubborn, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitReady(t, k, ns, "stubborn", 30*time.Second)
	start = time.Now()
	if err := k.CoreV1().Pods(ns).Delete(ctx, "stubborn", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "stubborn deleted", func() (bool, string) {
		_, err := k.CoreV1().Pods(ns).Get(ctx, "stubborn", metav1.GetOptions{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
	if took := time.Since(start); took < 2*time.Second || took > 10*time.Second {
		t.Errorf("a SIGTERM-ignoring pod with a 2 s grace period took %s to go", took)
	}
	if b, err := os.ReadFile(filepath.Join(filepath.Dir(hostFile), "prestop")); err != nil || string(b) != "ran" {
		t.Errorf("preStop: %q %v", b, err)
	}
	logs, _ := os.ReadFile(filepath.Join(c.RunDir, "node-1", "logs", "apps_stubborn_app.log"))
	if !strings.Contains(string(logs), "SIGTERM ignored") {
		t.Errorf("stubborn did not get SIGTERM: %s", logs)
	}

	// Deletion: SIGTERM, then the object goes; the sandbox with it.
	pin := filepath.Join(n1.HostPath("/var/run/netns"), "cni-"+string(pod.UID))
	if _, err := os.Stat(pin); err != nil {
		t.Errorf("the pod's netns pin: %v", err)
	}
	start = time.Now()
	if err := k.CoreV1().Pods(ns).Delete(ctx, "inspect", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "the pod object deleted", func() (bool, string) {
		_, err := k.CoreV1().Pods(ns).Get(ctx, "inspect", metav1.GetOptions{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
	t.Logf("pod gone %s after deletion", time.Since(start).Round(time.Millisecond))
	if _, err := os.Stat(filepath.Join(n1.Cgroup.Path, "pod"+string(pod.UID))); err == nil {
		t.Errorf("pod cgroup left")
	}
	if _, err := os.Stat(pin); err == nil {
		t.Errorf("netns pin left: %s", pin)
	}
	logs, _ = os.ReadFile(filepath.Join(c.RunDir, "node-1", "logs", "apps_inspect_app.log"))
	if !strings.Contains(string(logs), "SIGTERM received") {
		t.Errorf("the container did not get SIGTERM: %s", logs)
	}
	leavesNothing(t, c)
}

// leavesNothing closes the simulator and checks that its cgroups, pins,
// run directory (netns pins included) and processes are gone.
func leavesNothing(t *testing.T, c *sim.Cluster) {
	t.Helper()
	var pids []int
	for _, n := range c.Nodes {
		pids = append(pids, n.InitPid())
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	root, err := kernel.Cgroup2Root()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{filepath.Join(root, "kmesh-sim-"+c.ID), filepath.Join(sim.PinParent, c.ID), c.RunDir} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("left behind: %s", p)
		}
	}
	for _, pid := range pids {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
			t.Errorf("node init %d still runs", pid)
		}
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(mounts), c.RunDir) {
		t.Errorf("mounts left under %s", c.RunDir)
	}
}
