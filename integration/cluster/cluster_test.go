package cluster_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"istio.io/istio/pkg/zdsapi"
	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"kmesh.dev/kmesh/cni/zds"
	"kmesh.dev/kmesh/integration/cluster"
	"kmesh.dev/kmesh/integration/cluster/bins"
	"kmesh.dev/kmesh/integration/daemonproc"
	"kmesh.dev/kmesh/integration/kerneltest"
	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/integration/sim"
	"kmesh.dev/kmesh/kernel"
)

var (
	buildOnce sync.Once
	daemonBin string
	binPaths  map[string]string
	buildErr  error
)

// stopMeshHook tears the install's simulated nodes down (mesh_test.go).
var stopMeshHook = func() error { return nil }

func TestMain(m *testing.M) {
	// The simulated kubelet runs pods' built-in apps (echo, clients) by
	// re-executing this binary.
	podnet.MaybeRunHelper()
	code := m.Run()
	if err := stopMeshHook(); err != nil {
		fmt.Fprintln(os.Stderr, "FAIL: tearing the simulated nodes down:", err)
		code = 1
	}
	for _, p := range []*cluster.EgressProxy{shared.egressProxy, shared.loopbackProx} {
		if p != nil {
			_ = p.Close()
		}
	}
	if shared.cp != nil {
		start := time.Now()
		err := stopControlPlane(shared.cp)
		fmt.Printf("control plane stopped in %s\n", time.Since(start).Round(time.Millisecond))
		if err != nil {
			fmt.Fprintln(os.Stderr, "FAIL: tearing the control plane down:", err)
			code = 1
		}
	}
	// A failed run keeps its files (the logs) until the next run reaps them.
	if shared.run != nil && code == 0 {
		_ = shared.run.Close()
	}
	os.Exit(code)
}

// binaries builds kmesh-daemon (once per run) and finds or builds the
// control-plane binaries in their cache (minutes the first time on a
// machine, then nothing).
func binaries(t *testing.T) (string, map[string]string) {
	t.Helper()
	buildOnce.Do(func() {
		start := time.Now()
		// In the run's directory: a killed run's is reaped by the next.
		if shared.run, buildErr = cluster.NewRun(); buildErr != nil {
			return
		}
		buildDir := filepath.Join(shared.run.Dir, "bin")
		if buildErr = os.Mkdir(buildDir, 0o700); buildErr != nil {
			return
		}
		// The daemon builds while the cache is checked (or filled).
		var daemonErr error
		built := make(chan struct{})
		go func() {
			defer close(built)
			daemonBin, daemonErr = daemonproc.Build(buildDir)
		}()
		var b *bins.Builder
		if b, buildErr = bins.New(); buildErr == nil {
			b.Log = t.Logf
			binPaths, buildErr = b.Paths(bins.All...)
		}
		<-built
		if buildErr = errors.Join(buildErr, daemonErr); buildErr != nil {
			return
		}
		t.Logf("binaries ready in %s (cache %s)", time.Since(start).Round(time.Millisecond), b.Cache)
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return daemonBin, binPaths
}

// The control plane is shared by the package's tests (it takes seconds to
// start); TestMain stops it and checks that no process is left. Tests use
// their own namespaces and node.
var shared struct {
	once sync.Once
	run  *cluster.Run
	cp   *cluster.ControlPlane
	err  error
	// The API server's egress proxies (egress.go): its calls to the
	// cluster go through egress, dialed from a simulated node.
	egress       *cluster.ClusterEgress
	egressProxy  *cluster.EgressProxy
	loopbackProx *cluster.EgressProxy
}

// podPrefix and fabricPrefix are the simulated cluster's pod and node
// addresses (integration/podnet's fabric): the only addresses the
// egress proxy dials, from inside a node's network namespace.
var (
	podPrefix    = netip.MustParsePrefix("10.244.0.0/16")
	fabricPrefix = netip.MustParsePrefix("10.255.0.0/24")
)

// controlPlane starts the shared control plane on first use.
func controlPlane(t *testing.T) *cluster.ControlPlane {
	t.Helper()
	_, paths := binaries(t)
	shared.once.Do(func() {
		start := time.Now()
		dir := filepath.Join(shared.run.Dir, "controlplane")
		if shared.err = os.Mkdir(dir, 0o700); shared.err != nil {
			return
		}
		socks := &cluster.EgressSockets{Cluster: filepath.Join(dir, "egress-cluster.sock"), ControlPlane: filepath.Join(dir, "egress-controlplane.sock")}
		shared.egress = &cluster.ClusterEgress{Inside: []netip.Prefix{podPrefix, fabricPrefix}}
		logf := func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) }
		if shared.egressProxy, shared.err = cluster.ListenClusterEgress(socks.Cluster, shared.egress, logf); shared.err != nil {
			return
		}
		if shared.loopbackProx, shared.err = cluster.ListenLoopbackEgress(socks.ControlPlane, logf); shared.err != nil {
			return
		}
		// No istiod: the install brings it (TestPrivilegedClusterControlPlane
		// starts one directly for itself).
		// Logs only while starting (this test is running then).
		shared.cp, shared.err = cluster.Start(context.Background(), cluster.Options{Dir: dir, Bins: paths, Log: t.Logf, NoIstiod: true, Egress: socks, Workloads: true})
		if shared.err != nil {
			return
		}
		shared.egress.SetKube(shared.cp.Kube)
		t.Logf("control plane up in %s: %v", time.Since(start).Round(time.Millisecond), shared.cp.Pids())
	})
	if shared.err != nil {
		t.Fatalf("starting the control plane: %v", shared.err)
	}
	if err := shared.cp.Exited(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for name, f := range shared.cp.Logs() {
				t.Logf("%s log: %s (kept while the run lasts)", name, f)
			}
		}
	})
	return shared.cp
}

func stopControlPlane(cp *cluster.ControlPlane) error {
	pids := cp.Pids()
	died := cp.Exited()
	cp.Close()
	var errs []string
	if died != nil {
		errs = append(errs, fmt.Sprintf("a control-plane process died during the tests: %v", died))
	}
	for name, pid := range pids {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
			errs = append(errs, fmt.Sprintf("%s (pid %d) still runs after Close", name, pid))
		}
	}
	if len(errs) == 0 {
		return nil
	}
	return errors.New(strings.Join(errs, "; "))
}

// The node the test's pods are bound to, and the node proxy's identity.
const (
	nodeName = "n1"
	proxyPod = "ztunnel-n1"
	proxySA  = "ztunnel"
	// Not "shop": the install's traffic tests use that namespace.
	shop       = "cpshop"
	shopSA     = "shop"
	serviceApp = "web"
)

func ptr[T any](v T) *T { return &v }

// createRunningPod creates a pod bound to node and writes its status as a
// kubelet would: Running, Ready, with ip.
func createRunningPod(t *testing.T, ctx context.Context, kube kubernetes.Interface, ns, name, sa, ip string, labels, annotations map[string]string) *corev1.Pod {
	t.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels, Annotations: annotations},
		Spec: corev1.PodSpec{
			NodeName: nodeName, ServiceAccountName: sa,
			Containers: []corev1.Container{{Name: "app", Image: "registry.k8s.io/pause:3.10"}},
		},
	}
	pods := kube.CoreV1().Pods(ns)
	if _, err := pods.Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating pod %s/%s: %v", ns, name, err)
	}
	now := metav1.Now()
	status := corev1.PodStatus{
		Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}, HostIP: "10.255.0.201", StartTime: &now,
		Conditions: []corev1.PodCondition{
			{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.PodInitialized, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.ContainersReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
		},
		ContainerStatuses: []corev1.ContainerStatus{{Name: "app", Ready: true, Started: ptr(true), Image: "registry.k8s.io/pause:3.10",
			State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}}}},
	}
	pod, err := sim.Modify(ctx, name, pods.Get, pods.UpdateStatus, func(p *corev1.Pod) { p.Status = status })
	if err != nil {
		t.Fatalf("writing pod %s/%s status: %v", ns, name, err)
	}
	return pod
}

// removeObjects deletes what TestPrivilegedClusterControlPlane made: no
// kubelet confirms its pods' deletion, so they go with grace 0, then the
// namespace, the node and the node proxy's stand-in pod (istioctl
// ztunnel-config would find it by its label).
func removeObjects(t *testing.T, kube kubernetes.Interface) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	zero := metav1.DeleteOptions{GracePeriodSeconds: ptr(int64(0))}
	for _, ns := range []string{shop, cluster.IstioNamespace} {
		pods, err := kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + nodeName})
		if err != nil {
			t.Errorf("listing pods: %v", err)
			continue
		}
		for _, p := range pods.Items {
			if err := kube.CoreV1().Pods(ns).Delete(ctx, p.Name, zero); err != nil && !apierrors.IsNotFound(err) {
				t.Errorf("deleting pod %s/%s: %v", ns, p.Name, err)
			}
		}
	}
	_ = kube.CoreV1().ServiceAccounts(cluster.IstioNamespace).Delete(ctx, proxySA, metav1.DeleteOptions{})
	if err := kube.CoreV1().Namespaces().Delete(ctx, shop, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		t.Errorf("deleting namespace %s: %v", shop, err)
	}
	if err := kube.CoreV1().Nodes().Delete(ctx, nodeName, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		t.Errorf("deleting node %s: %v", nodeName, err)
	}
}

// dump is the part of the daemon's /config_dump the tests read.
type dump struct {
	Workloads []struct {
		UID            string   `json:"uid"`
		Name           string   `json:"name"`
		Namespace      string   `json:"namespace"`
		IPs            []string `json:"workloadIps"`
		Node           string   `json:"node"`
		ServiceAccount string   `json:"serviceAccount"`
		HBONE          bool     `json:"hbone"`
		Healthy        bool     `json:"healthy"`
		Services       []struct {
			Service string `json:"service"`
		} `json:"services"`
	} `json:"workloads"`
	Services []struct {
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
		Hostname  string `json:"hostname"`
		VIPs      []struct {
			Addr string `json:"Addr"`
		} `json:"vips"`
	} `json:"services"`
}

// check returns what the dump lacks of the shop: each pod of want (name →
// IP) as a healthy HBONE workload of the service on the node, and the
// service with its cluster IP.
func (d *dump) check(want map[string]string, vip string) error {
	var missing []string
	for name, ip := range want {
		found := false
		for _, w := range d.Workloads {
			if w.Namespace != shop || w.Name != name {
				continue
			}
			found = true
			svc := shop + "/" + serviceApp + "." + shop + ".svc.cluster.local"
			switch {
			case !slices.Equal(w.IPs, []string{ip}):
				missing = append(missing, fmt.Sprintf("%s with IP %s (has %v)", name, ip, w.IPs))
			case w.Node != nodeName || w.ServiceAccount != shopSA:
				missing = append(missing, fmt.Sprintf("%s on node %s with service account %s (has %q, %q)", name, nodeName, shopSA, w.Node, w.ServiceAccount))
			case !w.HBONE || !w.Healthy:
				missing = append(missing, fmt.Sprintf("%s healthy and HBONE (has healthy=%v hbone=%v)", name, w.Healthy, w.HBONE))
			case !slices.ContainsFunc(w.Services, func(s struct {
				Service string `json:"service"`
			}) bool {
				return s.Service == svc
			}):
				missing = append(missing, fmt.Sprintf("%s in service %s (has %v)", name, svc, w.Services))
			}
		}
		if !found {
			missing = append(missing, "workload "+shop+"/"+name)
		}
	}
	found := false
	for _, s := range d.Services {
		if s.Namespace == shop && s.Name == serviceApp {
			found = true
			if len(s.VIPs) != 1 || s.VIPs[0].Addr != vip {
				missing = append(missing, fmt.Sprintf("service VIP %s (has %v)", vip, s.VIPs))
			}
		}
	}
	if !found {
		missing = append(missing, "service "+shop+"/"+serviceApp)
	}
	if len(missing) > 0 {
		slices.Sort(missing)
		return fmt.Errorf("missing: %s", strings.Join(missing, "; "))
	}
	return nil
}

// waitMetric waits for a line of the daemon's /metrics.
func waitMetric(t *testing.T, d *daemonproc.Daemon, line string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var m string
	for time.Now().Before(deadline) {
		var err error
		if m, err = d.Metrics(); err == nil && slices.Contains(strings.Split(m, "\n"), line) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	var got []string
	for _, l := range strings.Split(m, "\n") {
		if strings.HasPrefix(l, strings.Fields(line)[0]) {
			got = append(got, l)
		}
	}
	t.Fatalf("no %q in the daemon's metrics after %s (has %q); log:\n%s", line, timeout, got, d.Tail())
}

func configDump(d *daemonproc.Daemon) (*dump, error) {
	s := d.ConfigDump()
	var out dump
	if err := json.Unmarshal([]byte(s), &out); err != nil {
		return nil, fmt.Errorf("config_dump: %w: %.200s", err, s)
	}
	return &out, nil
}

func waitDump(t *testing.T, d *daemonproc.Daemon, want map[string]string, vip string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-d.Done():
			t.Fatalf("kmesh-daemon exited: %s", d.Tail())
		default:
		}
		var dd *dump
		if dd, last = configDump(d); last == nil {
			if last = dd.check(want, vip); last == nil {
				return
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("the daemon's config_dump after %s: %v\n%s", timeout, last, d.ConfigDump())
}

// TestPrivilegedClusterControlPlane: a real pilot-discovery (ambient
// enabled, its own CA) watching a real kube-apiserver serves the real
// kmesh-daemon, started as the DaemonSet starts it, with a token the API
// server issued for the node proxy's pod.
func TestPrivilegedClusterControlPlane(t *testing.T) {
	kerneltest.RequireRoot(t)
	if err := kernel.Check(kernel.Probe()); err != nil {
		t.Fatalf("this kernel cannot run Kmesh: %v", err)
	}
	daemon, _ := binaries(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cp := controlPlane(t)
	kube := cp.Kube
	t0 := time.Now()
	// This test's istiod runs directly; the install tests bring their own
	// (a Deployment), so it stops, and the objects below go, at the end.
	if err := cp.StartIstiod(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("pilot-discovery ready in %s", time.Since(t0).Round(time.Millisecond))
	t.Cleanup(func() {
		cp.StopIstiod()
		removeObjects(t, kube)
	})

	// The cluster's objects, as kubectl and a kubelet would write them.
	if _, err := kube.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: shop,
		Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, sa := range []struct{ ns, name string }{{shop, shopSA}, {cluster.IstioNamespace, proxySA}} {
		if _, err := kube.CoreV1().ServiceAccounts(sa.ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa.name}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	svc, err := kube.CoreV1().Services(shop).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: serviceApp},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": serviceApp},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := svc.Spec.ClusterIP
	// Pods as istio-cni leaves them once redirected: the annotation is
	// what makes istiod announce them as HBONE workloads.
	redirected := map[string]string{"ambient.istio.io/redirection": "enabled"}
	want := map[string]string{"web-1": "10.244.201.11", "web-2": "10.244.201.12"}
	web := map[string]*corev1.Pod{}
	for name, ip := range want {
		web[name] = createRunningPod(t, ctx, kube, shop, name, shopSA, ip, map[string]string{"app": serviceApp}, redirected)
	}
	proxy := createRunningPod(t, ctx, kube, cluster.IstioNamespace, proxyPod, proxySA, "10.244.201.2", map[string]string{"app": "ztunnel"}, nil)

	// The node proxy's token: what the DaemonSet's projected volume holds
	// (audience istio-ca, bound to the pod).
	tr, err := kube.CoreV1().ServiceAccounts(cluster.IstioNamespace).CreateToken(ctx, proxySA, &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{
		Audiences: []string{"istio-ca"}, ExpirationSeconds: ptr(int64(3600)),
		BoundObjectRef: &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: proxy.Name, UID: proxy.UID},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("TokenRequest for %s/%s: %v", cluster.IstioNamespace, proxySA, err)
	}
	// The node: a cgroup the daemon attaches to, a pin root, and a node
	// agent's ZDS socket.
	node, err := shared.run.NewNode(nodeName)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := node.Close(); err != nil {
			t.Errorf("removing the node's cgroup, pins and files: %v", err)
		}
	})
	dir := node.Dir
	token := filepath.Join(dir, "istio-token")
	if err := os.WriteFile(token, []byte(tr.Status.Token), 0o600); err != nil {
		t.Fatal(err)
	}
	zctx, zcancel := context.WithCancel(ctx)
	zsrv, err := zds.Listen(filepath.Join(dir, "ztunnel.sock"), slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err != nil {
		t.Fatal(err)
	}
	var zwg sync.WaitGroup
	zwg.Add(1)
	go func() { defer zwg.Done(); zsrv.Run(zctx) }()
	t.Cleanup(func() { zcancel(); _ = zsrv.Close(); zwg.Wait() })

	// The daemon, with the environment the DaemonSet gives it.
	d, err := daemonproc.Start(daemon, filepath.Join(dir, "kmesh-daemon.log"), []string{
		"XDS_ADDRESS=" + cp.XDSAddr, "CA_ADDRESS=" + cp.XDSAddr, "XDS_ROOT_CA=" + cp.RootCertFile,
		"ALT_XDS_HOSTNAME=istiod.istio-system.svc", "KMESH_TOKEN_FILE=" + token,
		"CLUSTER_ID=" + cluster.ClusterID, "NODE_NAME=" + nodeName, "POD_NAME=" + proxyPod,
		"POD_NAMESPACE=" + cluster.IstioNamespace, "INSTANCE_IP=10.244.1.2",
		"KMESH_CGROUP_PATH=" + node.Cgroup.Path, "KMESH_PIN_ROOT=" + node.PinRoot,
		"KMESH_ZDS_SOCKET=" + filepath.Join(dir, "ztunnel.sock"), "KMESH_LOG_LEVEL=info",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		start := time.Now()
		d.Stop(10 * time.Second)
		t.Logf("kmesh-daemon stopped in %s", time.Since(start).Round(time.Millisecond))
		if t.Failed() {
			t.Logf("kmesh-daemon log:\n%s", d.Tail())
		}
	})
	if err := d.WaitReady(ctx, 60*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("daemon ready in %s", time.Since(t0).Round(time.Millisecond))

	// What istiod sent: the shop's workloads and service.
	waitDump(t, d, want, vip, 30*time.Second)
	t.Logf("shop workloads and service in the daemon's config_dump after %s", time.Since(t0).Round(time.Millisecond))

	// A pod created now arrives as a delta push over the same stream.
	want["web-3"] = "10.244.201.13"
	createRunningPod(t, ctx, kube, shop, "web-3", shopSA, want["web-3"], map[string]string{"app": serviceApp}, redirected)
	waitDump(t, d, want, vip, 30*time.Second)
	t.Logf("a new pod reached the daemon after %s", time.Since(t0).Round(time.Millisecond))

	// A pod enrolled by the node agent: the daemon asks the real CA for
	// its certificate, impersonating it with the node proxy's token
	// (istiod checks the token by TokenReview and the pod on the node).
	pnode, err := podnet.NewNode("n1", netip.MustParsePrefix("10.244.201.0/24"), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pnode.Close() })
	netPod, err := pnode.AddPod("web-1", netip.MustParseAddr(want["web-1"]), netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	nsf, err := netPod.NS.File()
	if err != nil {
		t.Fatal(err)
	}
	defer nsf.Close()
	if err := zsrv.AddPod(ctx, string(web["web-1"].UID), &zdsapi.WorkloadInfo{Name: "web-1", Namespace: shop, ServiceAccount: shopSA}, nsf); err != nil {
		t.Fatalf("enrolling web-1 over ZDS: %v", err)
	}
	waitMetric(t, d, "kmesh_identity_certificates 1", 30*time.Second)
	if log := d.Log(); !strings.Contains(log, "certificate issued") || !strings.Contains(log, "spiffe://cluster.local/ns/"+shop+"/sa/shop") {
		t.Errorf("the daemon's log does not show the certificate for spiffe://cluster.local/ns/%s/sa/shop issued:\n%s", shop, d.Tail())
	}
	t.Logf("web-1 enrolled, its certificate issued by istiod's CA after %s", time.Since(t0).Round(time.Millisecond))

	// Nothing the test started listens outside loopback.
	cpBad, err := cp.NonLoopbackListeners()
	if err != nil {
		t.Fatal(err)
	}
	if len(cpBad) > 0 {
		t.Errorf("control-plane sockets outside loopback: %v", cpBad)
	}
	if bad, err := cluster.NonLoopbackListeners(d.Pid()); err != nil || len(bad) > 0 {
		t.Errorf("kmesh-daemon sockets outside loopback: %v (%v)", bad, err)
	}

	// Still ready: connected and synced.
	if err := d.WaitReady(ctx, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := cp.Exited(); err != nil {
		t.Fatal(err)
	}
}
