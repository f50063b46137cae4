// Package cluster is the real-cluster test tier: real etcd,
// kube-apiserver, kube-controller-manager and pilot-discovery processes on
// 127.0.0.1 (binaries built and cached by integration/cluster/bins), and
// the real kmesh-daemon binary talking to them. Tests are named
// TestPrivilegedCluster*; README.md says what runs and how.
package cluster

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"kmesh.dev/kmesh/integration/cluster/bins"
)

// ClusterID is the cluster's name, as istiod and the daemon report it.
const ClusterID = "Kubernetes"

// IstioNamespace is where istiod and the node proxy live.
const IstioNamespace = "istio-system"

// adminToken authenticates every control-plane client (group
// system:masters); the API server knows it from its token file.
const adminToken = "kmesh-cluster-admin"

// Options configure a control plane.
type Options struct {
	// Dir holds data, certificates, configuration and logs.
	Dir string
	// Bins maps bins names to binaries; kube-controller-manager is
	// optional (without it: no default ServiceAccounts, EndpointSlices or
	// namespace deletion).
	Bins map[string]string
	// Log reports progress (optional).
	Log func(format string, args ...any)
	// Workloads runs what turns Deployments and DaemonSets into pods bound
	// to nodes: kube-scheduler and the workload controllers (controllers).
	// Without it a test creates and binds pods itself.
	Workloads bool
	// NoIstiod leaves pilot-discovery out: an install (istioctl, Helm)
	// brings istiod as a Deployment whose pod runs it. StartIstiod starts
	// one directly later if a test needs it.
	NoIstiod bool
	// Egress, when set, routes the API server's calls to the cluster
	// (admission and conversion webhooks, aggregated APIs, kubelets)
	// through the test's HTTP CONNECT proxies instead of dialing from this
	// machine's network namespace (egress.go).
	Egress *EgressSockets
}

// ControlPlane is a running control plane.
type ControlPlane struct {
	Dir        string
	Kube       kubernetes.Interface
	Dynamic    dynamic.Interface
	REST       *rest.Config
	Kubeconfig string // admin kubeconfig file (for istiod, istioctl)
	// CAFile is the API server's CA (what in-cluster clients verify it
	// with: the kube-root-ca.crt ConfigMap holds it too).
	CAFile string
	// XDSAddr is istiod's TLS gRPC address (xDS and CA, port 15012 in a
	// cluster), on 127.0.0.1.
	XDSAddr string
	// RootCertFile holds istiod's self-signed mesh root, copied from the
	// istio-ca-root-cert ConfigMap as a node proxy's volume would have it.
	RootCertFile string
	// IstiodHTTPAddr is istiod's HTTP address (/ready, /debug/*).
	IstiodHTTPAddr string

	procs  []*process // in start order
	istiod *process
	opts   Options
	pki    *kubePKI
}

func (o Options) logf(f string, a ...any) {
	if o.Log != nil {
		o.Log(f, a...)
	}
}

// Start brings up etcd, kube-apiserver, kube-controller-manager (if
// built), the Istio CRDs and pilot-discovery, each waited for through its
// own readiness endpoint. On error what started is stopped.
func Start(ctx context.Context, opts Options) (cp *ControlPlane, err error) {
	cp = &ControlPlane{Dir: opts.Dir, opts: opts}
	built := cp // `return nil, err` clears cp before this runs
	defer func() {
		if err != nil {
			built.Close()
			cp = nil
		}
	}()
	need := []string{bins.Etcd, bins.KubeAPIServer}
	if opts.Workloads {
		need = append(need, bins.KubeControllerManager, bins.KubeScheduler)
	}
	if !opts.NoIstiod {
		need = append(need, bins.PilotDiscovery)
	}
	for _, n := range need {
		if opts.Bins[n] == "" {
			return nil, fmt.Errorf("no %s binary given", n)
		}
	}
	pki, err := newKubePKI(opts.Dir)
	if err != nil {
		return nil, err
	}
	cp.pki, cp.CAFile = pki, pki.CAFile
	t0 := time.Now()
	etcdURL, err := cp.startEtcd()
	if err != nil {
		return nil, err
	}
	opts.logf("etcd ready in %s", time.Since(t0).Round(time.Millisecond))
	t0 = time.Now()
	if err := cp.startAPIServer(ctx, pki, etcdURL); err != nil {
		return nil, err
	}
	opts.logf("kube-apiserver ready in %s", time.Since(t0).Round(time.Millisecond))
	if opts.Bins[bins.KubeControllerManager] != "" {
		t0 = time.Now()
		if err := cp.startControllerManager(ctx, pki); err != nil {
			return nil, err
		}
		opts.logf("kube-controller-manager ready in %s", time.Since(t0).Round(time.Millisecond))
	}
	if opts.Workloads {
		t0 = time.Now()
		if err := cp.startScheduler(); err != nil {
			return nil, err
		}
		opts.logf("kube-scheduler ready in %s", time.Since(t0).Round(time.Millisecond))
	}
	if _, err := cp.Kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: IstioNamespace}}, metav1.CreateOptions{}); err != nil {
		return nil, err
	}
	t0 = time.Now()
	n, err := cp.applyIstioCRDs(ctx)
	if err != nil {
		return nil, err
	}
	opts.logf("%d Istio CRDs established in %s", n, time.Since(t0).Round(time.Millisecond))
	if !opts.NoIstiod {
		t0 = time.Now()
		if err := cp.StartIstiod(ctx); err != nil {
			return nil, err
		}
		opts.logf("pilot-discovery ready in %s", time.Since(t0).Round(time.Millisecond))
	}
	return cp, nil
}

func (cp *ControlPlane) start(name string, env, args []string) (*process, error) {
	p, err := startProcess(name, cp.opts.Bins[name], cp.Dir, filepath.Join(cp.Dir, name+".log"), env, args)
	if err != nil {
		return nil, err
	}
	cp.procs = append(cp.procs, p)
	return p, nil
}

func (cp *ControlPlane) startEtcd() (string, error) {
	var client, peer int
	if err := freePorts(&client, &peer); err != nil {
		return "", err
	}
	cu, pu := fmt.Sprintf("http://127.0.0.1:%d", client), fmt.Sprintf("http://127.0.0.1:%d", peer)
	p, err := cp.start(bins.Etcd, nil, []string{
		"--name=default", "--data-dir=" + filepath.Join(cp.Dir, "etcd"),
		"--listen-client-urls=" + cu, "--advertise-client-urls=" + cu,
		"--listen-peer-urls=" + pu, "--initial-advertise-peer-urls=" + pu, "--initial-cluster=default=" + pu,
		"--unsafe-no-fsync", "--log-level=warn",
	})
	if err != nil {
		return "", err
	}
	return cu, waitFor("etcd", p, 60*time.Second, func() error {
		b, err := httpGet(http.DefaultClient, cu+"/health", "")
		if err == nil && !strings.Contains(b, `"health":"true"`) {
			err = fmt.Errorf("/health: %s", b)
		}
		return err
	})
}

func (cp *ControlPlane) startAPIServer(ctx context.Context, pki *kubePKI, etcdURL string) error {
	port, err := freePort()
	if err != nil {
		return err
	}
	tokens := filepath.Join(cp.Dir, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(adminToken+`,admin,admin,"system:masters"`+"\n"), 0o600); err != nil {
		return err
	}
	const issuer = "https://kubernetes.default.svc.cluster.local"
	args := []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", port),
		"--cert-dir=" + cp.Dir, "--tls-cert-file=" + pki.CertFile, "--tls-private-key-file=" + pki.KeyFile,
		"--client-ca-file=" + pki.CAFile,
		"--token-auth-file=" + tokens, "--authorization-mode=RBAC",
		"--service-account-issuer=" + issuer, "--api-audiences=" + issuer,
		"--service-account-key-file=" + pki.SAPubFile, "--service-account-signing-key-file=" + pki.SAKeyFile,
		"--service-cluster-ip-range=10.96.0.0/16",
		// No kubelet answers for this address and nothing reconciles the
		// kubernetes Service's endpoints to it.
		"--endpoint-reconciler-type=none",
		"--allow-privileged=true", "--profiling=false", "--enable-priority-and-fairness=false",
		// A kubelet is reached at its Node's InternalIP (through the egress
		// proxy, which dials addresses only), never by host name.
		"--kubelet-preferred-address-types=InternalIP",
	}
	if cp.opts.Egress != nil {
		f := filepath.Join(cp.Dir, "egress-selector.yaml")
		if err := os.WriteFile(f, []byte(cp.opts.Egress.config()), 0o600); err != nil {
			return err
		}
		args = append(args, "--egress-selector-config-file="+f)
	}
	p, err := cp.start(bins.KubeAPIServer, nil, args)
	if err != nil {
		return err
	}
	cp.REST = &rest.Config{
		Host: fmt.Sprintf("https://127.0.0.1:%d", port), BearerToken: adminToken,
		TLSClientConfig: rest.TLSClientConfig{CAData: pki.CAPEM}, QPS: 100, Burst: 200,
	}
	hc, err := rest.HTTPClientFor(cp.REST)
	if err != nil {
		return err
	}
	if err := waitFor("kube-apiserver", p, 90*time.Second, func() error {
		_, err := httpGet(hc, cp.REST.Host+"/readyz", "")
		return err
	}); err != nil {
		return err
	}
	if cp.Kube, err = kubernetes.NewForConfig(cp.REST); err != nil {
		return err
	}
	if cp.Dynamic, err = dynamic.NewForConfig(cp.REST); err != nil {
		return err
	}
	cp.Kubeconfig = filepath.Join(cp.Dir, "kubeconfig")
	return os.WriteFile(cp.Kubeconfig, []byte(kubeconfig(cp.REST.Host, pki.CAFile)), 0o600)
}

func kubeconfig(server, caFile string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: kmesh-cluster
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: admin
  user:
    token: %s
contexts:
- name: kmesh-cluster
  context:
    cluster: kmesh-cluster
    user: admin
current-context: kmesh-cluster
`, server, caFile, adminToken)
}

// controllers are what kube-controller-manager runs. Always: service
// accounts and their tokens, EndpointSlices (istiod and the egress proxy
// read them), namespace deletion, the kube-root-ca.crt ConfigMap. With
// Options.Workloads, what turns an install into pods: Deployments (istiod)
// and their ReplicaSets, DaemonSets (istio-cni-node, ztunnel), the garbage
// collector (an uninstall deletes the DaemonSet; its pods and a
// Deployment's ReplicaSets go by owner reference), and node lifecycle: the
// API server taints every new Node not-ready (admission
// TaintNodesByCondition) and only this controller lifts it once the
// node's kubelet (the simulator) reports Ready and renews its Lease;
// istiod's pod does not tolerate the taint. Never HPA or disruption (no
// metrics, no evictions here).
func (cp *ControlPlane) controllers() []string {
	c := []string{"serviceaccount-controller", "serviceaccount-token-controller", "endpointslice-controller",
		"endpointslice-mirroring-controller", "namespace-controller", "root-ca-certificate-publisher-controller"}
	if cp.opts.Workloads {
		c = append(c, "deployment-controller", "replicaset-controller", "daemonset-controller",
			"garbage-collector-controller", "node-lifecycle-controller")
	}
	return c
}

func (cp *ControlPlane) startControllerManager(ctx context.Context, pki *kubePKI) error {
	p, err := cp.start(bins.KubeControllerManager, nil, []string{
		"--kubeconfig=" + cp.Kubeconfig,
		"--controllers=" + strings.Join(cp.controllers(), ","),
		"--service-account-private-key-file=" + pki.SAKeyFile, "--root-ca-file=" + pki.CAFile,
		"--use-service-account-credentials=false", "--leader-elect=false",
		// No serving port: readiness is the default ServiceAccount below.
		"--secure-port=0",
	})
	if err != nil {
		return err
	}
	return waitFor("kube-controller-manager (the default ServiceAccount)", p, 60*time.Second, func() error {
		_, err := cp.Kube.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err
	})
}

var crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// istioModuleDir is the istio.io/istio module Kmesh's go.mod pins (the
// source of the CRDs; pilot-discovery and istioctl are built from it too).
func istioModuleDir() (string, error) {
	root, err := bins.RepoRoot()
	if err != nil {
		return "", err
	}
	cmd := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/istio")
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go list -m istio.io/istio: %w", err)
	}
	d := strings.TrimSpace(string(out))
	if d == "" {
		return "", errors.New("istio.io/istio is not downloaded (go mod download)")
	}
	return d, nil
}

// applyIstioCRDs creates the CRDs of Istio's base chart (files/crd-all.gen.yaml,
// what the chart's crds.yaml template renders) and waits until every one
// is Established.
func (cp *ControlPlane) applyIstioCRDs(ctx context.Context) (int, error) {
	dir, err := istioModuleDir()
	if err != nil {
		return 0, err
	}
	f := filepath.Join(dir, "manifests/charts/base/files/crd-all.gen.yaml")
	b, err := os.ReadFile(f)
	if err != nil {
		return 0, err
	}
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(b), 4096)
	var names []string
	for {
		var obj map[string]any
		if err := dec.Decode(&obj); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return 0, fmt.Errorf("%s: %w", f, err)
		}
		if len(obj) == 0 {
			continue
		}
		u := &unstructured.Unstructured{Object: obj}
		if u.GetKind() != "CustomResourceDefinition" {
			continue
		}
		if _, err := cp.Dynamic.Resource(crdGVR).Create(ctx, u, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return 0, fmt.Errorf("creating CRD %s: %w", u.GetName(), err)
		}
		names = append(names, u.GetName())
	}
	if len(names) == 0 {
		return 0, fmt.Errorf("no CRD in %s", f)
	}
	var api *process // waits end early if it dies
	for _, p := range cp.procs {
		if p.Name == bins.KubeAPIServer {
			api = p
		}
	}
	for _, n := range names {
		if err := waitFor("CRD "+n+" Established", api, 60*time.Second, func() error {
			u, err := cp.Dynamic.Resource(crdGVR).Get(ctx, n, metav1.GetOptions{})
			if err != nil {
				return err
			}
			conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
			for _, c := range conds {
				m, _ := c.(map[string]any)
				if m["type"] == "Established" && m["status"] == "True" {
					return nil
				}
			}
			return errors.New("not Established")
		}); err != nil {
			return 0, err
		}
	}
	return len(names), nil
}

// startScheduler runs kube-scheduler: it binds the pods the Deployment
// and DaemonSet controllers create to the simulated nodes. Its serving
// port is on 127.0.0.1 only, for /readyz; leader election is off (one
// scheduler).
func (cp *ControlPlane) startScheduler() error {
	port, err := freePort()
	if err != nil {
		return err
	}
	p, err := cp.start(bins.KubeScheduler, nil, []string{
		"--kubeconfig=" + cp.Kubeconfig,
		"--authentication-kubeconfig=" + cp.Kubeconfig, "--authorization-kubeconfig=" + cp.Kubeconfig,
		"--leader-elect=false",
		"--bind-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", port),
		"--cert-dir=" + filepath.Join(cp.Dir, "kube-scheduler"),
	})
	if err != nil {
		return err
	}
	// Its serving certificate is self-signed; /readyz is unauthenticated.
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} //nolint:gosec // loopback readiness only
	return waitFor("kube-scheduler /readyz", p, 60*time.Second, func() error {
		_, err := httpGet(hc, fmt.Sprintf("https://127.0.0.1:%d/readyz", port), "")
		return err
	})
}

// StartIstiod runs pilot-discovery as the istiod chart does with the
// ambient profile (PILOT_ENABLE_AMBIENT, CA_TRUSTED_NODE_ACCOUNTS for the
// node proxy's ServiceAccount), its CA self-signed, every port on
// 127.0.0.1. StopIstiod stops it (before an install brings its own).
func (cp *ControlPlane) StartIstiod(ctx context.Context) error {
	if cp.istiod != nil {
		return errors.New("pilot-discovery runs already")
	}
	var httpP, httpsP, grpcP, secureP, monP int
	if err := freePorts(&httpP, &httpsP, &grpcP, &secureP, &monP); err != nil {
		return err
	}
	mesh := filepath.Join(cp.Dir, "mesh.yaml")
	// The ambient profile's mesh config (manifests/charts/base/files/profile-ambient.yaml).
	if err := os.WriteFile(mesh, []byte(`defaultConfig:
  discoveryAddress: istiod.istio-system.svc:15012
  proxyMetadata:
    ISTIO_META_ENABLE_HBONE: "true"
trustDomain: cluster.local
`), 0o600); err != nil {
		return err
	}
	addr := func(p int) string { return fmt.Sprintf("127.0.0.1:%d", p) }
	cp.XDSAddr, cp.IstiodHTTPAddr = addr(secureP), addr(httpP)
	p, err := cp.start(bins.PilotDiscovery, []string{
		"KUBECONFIG=" + cp.Kubeconfig,
		"POD_NAME=istiod-0", "POD_NAMESPACE=" + IstioNamespace, "SERVICE_ACCOUNT=istiod", "REVISION=default",
		"CLUSTER_ID=" + ClusterID, "PILOT_CERT_PROVIDER=istiod", "PILOT_ENABLE_ANALYSIS=false",
		"PILOT_ENABLE_AMBIENT=true",
		"CA_TRUSTED_NODE_ACCOUNTS=" + IstioNamespace + "/ztunnel",
		"GOMAXPROCS=2",
	}, []string{
		"discovery",
		"--kubeconfig=" + cp.Kubeconfig, "--meshConfig=" + mesh, "--networksConfig=" + filepath.Join(cp.Dir, "meshNetworks"),
		"--domain=cluster.local", "--clusterID=" + ClusterID,
		"--httpAddr=" + addr(httpP), "--httpsAddr=" + addr(httpsP), "--grpcAddr=" + addr(grpcP),
		"--secureGRPCAddr=" + addr(secureP), "--monitoringAddr=" + addr(monP),
		"--ctrlz_address=127.0.0.1", "--ctrlz_port=0", // ControlZ: a fixed 9876 by default, shared by every istiod on the machine
		"--log_output_level=default:info",
	})
	if err != nil {
		return err
	}
	cp.istiod = p
	if err := waitFor("pilot-discovery /ready", p, 90*time.Second, func() error {
		_, err := httpGet(http.DefaultClient, "http://"+cp.IstiodHTTPAddr+"/ready", "")
		return err
	}); err != nil {
		return err
	}
	// What a node proxy mounts as its root certificate: istiod publishes
	// its self-signed root in every namespace.
	var root string
	if err := waitFor("the istio-ca-root-cert ConfigMap", p, 60*time.Second, func() error {
		cm, err := cp.Kube.CoreV1().ConfigMaps(IstioNamespace).Get(ctx, "istio-ca-root-cert", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if root = cm.Data["root-cert.pem"]; root == "" {
			return errors.New("no root-cert.pem in it")
		}
		return nil
	}); err != nil {
		return err
	}
	cp.RootCertFile = filepath.Join(cp.Dir, "root-cert.pem")
	return os.WriteFile(cp.RootCertFile, []byte(root), 0o600)
}

// StopIstiod stops the pilot-discovery StartIstiod started.
func (cp *ControlPlane) StopIstiod() {
	if cp.istiod == nil {
		return
	}
	cp.istiod.Stop(10 * time.Second)
	cp.procs = slices.DeleteFunc(cp.procs, func(p *process) bool { return p == cp.istiod })
	cp.istiod = nil
}

// Pids lists the control plane's processes, by name.
func (cp *ControlPlane) Pids() map[string]int {
	m := map[string]int{}
	for _, p := range cp.procs {
		m[p.Name] = p.Pid()
	}
	return m
}

// Exited reports the first control-plane process that died.
func (cp *ControlPlane) Exited() error {
	for _, p := range cp.procs {
		if err := p.exited(); err != nil {
			return err
		}
	}
	return nil
}

// Logs names each process's log file.
func (cp *ControlPlane) Logs() map[string]string {
	m := map[string]string{}
	for _, p := range cp.procs {
		m[p.Name] = p.LogFile
	}
	return m
}

// Close stops the processes in reverse start order and waits for each.
func (cp *ControlPlane) Close() {
	for i := len(cp.procs) - 1; i >= 0; i-- {
		cp.procs[i].Stop(10 * time.Second)
	}
	cp.procs = nil
}

func httpGet(c *http.Client, url, token string) (string, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := c.Do(req.WithContext(ctx))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return string(b), fmt.Errorf("GET %s: %s: %s", url, resp.Status, strings.TrimSpace(string(b)))
	}
	return string(b), nil
}
