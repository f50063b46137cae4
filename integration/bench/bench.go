// Package bench is the benchmark harness: Kmesh's data paths against the
// direct path, kube-proxy-style iptables DNAT and a user-space proxy pair
// (haproxy, TCP and mutual TLS: the sidecar/ztunnel architecture built from
// a real, optimised C proxy), on the node simulator, in one run, with
// interleaved repetitions. It reports; it asserts nothing.
package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	securityapi "istio.io/api/security/v1"
	typeapi "istio.io/api/type/v1beta1"
	securityclient "istio.io/client-go/pkg/apis/security/v1"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/sim"
)

// Ports of the server pod's tools.
const (
	portHTTP     = 8080 // fortio HTTP echo
	portTCP      = 8078 // fortio TCP echo
	portSockperf = 11111
	portIperf    = 5201
)

var ports = []int{portHTTP, portTCP, portSockperf, portIperf}

// VIPs of the arms (none routable from a pod but through the arm's own mechanism).
const (
	vipKmesh    = "10.96.1.1" // a Kubernetes Service: Kmesh rewrites it at connect
	vipDNAT     = "10.96.2.1" // iptables DNAT in the client pod
	vipProxy    = "10.96.3.1" // iptables REDIRECT to a haproxy pair, plain TCP
	vipProxyTLS = "10.96.4.1" // iptables REDIRECT to a haproxy pair, mutual TLS
	vipHBONE    = "10.96.5.1" // a Service whose workload has an authorization policy the kernel cannot hold: Kmesh's HBONE tunnel
	vipAuthz    = "10.96.6.1" // a Service whose workload has an ALLOW policy the kernel evaluates at connect
	vipSockmap  = "10.96.7.1" // as vipKmesh, to a server whose connections with its client are spliced
	vipHBONEB   = "10.96.8.1" // the same on the second node, whose daemon is the B build (-daemon-b)
)

// ArmHBONEB is the HBONE arm of the second daemon build (Options.DaemonBinB).
const ArmHBONEB = "kmesh-hbone-b"

// Arm is one way for the client to reach the server.
type Arm struct {
	Name      string `json:"name"`
	Available bool   `json:"available"`
	Why       string `json:"why,omitempty"` // when not available
	addr      string
	client    *sim.Pod
	proxies   []int // pids whose CPU is the arm's overhead
	node      int   // index of the node whose daemon and programs the arm uses
}

// Options configure a run.
type Options struct {
	Quick     bool
	Reps      int
	Duration  time.Duration
	DaemonBin string
	// DaemonBinB, when set, is a second kmesh-daemon build: it runs on a
	// second node with its own HBONE client and server pods (arm
	// kmesh-hbone-b), measured interleaved with the first build's.
	DaemonBinB string
	// DaemonEnvB is added to the B daemon's environment only (after
	// DaemonEnv): with DaemonBinB the same binary as DaemonBin, an A/B run
	// of a setting (GOMAXPROCS=1, …).
	DaemonEnvB []string
	// Note describes the run in the report (e.g. the builds' commits).
	Note     string
	Fortio   string // fortio binary (v1.68.2)
	Log      *slog.Logger
	Progress io.Writer
	// Arms limits the run to these arms (and direct, the baseline).
	Arms []string
	// DaemonEnv is added to the daemons' environment (experiments).
	DaemonEnv []string
}

// Env is the running benchmark topology.
type Env struct {
	opts    Options
	cluster *sim.Cluster
	server  *sim.Pod
	// serverPids are the server's tools (not the server-side proxy, which
	// is the proxy arms' overhead).
	serverPids []int
	Arms       []*Arm
	dir        string
	stats      io.Closer
}

const objects = `
apiVersion: v1
kind: Namespace
metadata:
  name: bench
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: bench}
spec:
  clusterIP: 10.96.1.1
  selector: {app: server}
  ports:
  - {name: http, port: 8080, targetPort: 8080, protocol: TCP}
  - {name: tcp, port: 8078, targetPort: 8078, protocol: TCP}
  - {name: sockperf, port: 11111, targetPort: 11111, protocol: TCP}
  - {name: iperf, port: 5201, targetPort: 5201, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: server-hbone, namespace: bench}
spec:
  clusterIP: 10.96.5.1
  selector: {app: server-hbone}
  ports:
  - {name: http, port: 8080, targetPort: 8080, protocol: TCP}
  - {name: tcp, port: 8078, targetPort: 8078, protocol: TCP}
  - {name: sockperf, port: 11111, targetPort: 11111, protocol: TCP}
  - {name: iperf, port: 5201, targetPort: 5201, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: server-authz, namespace: bench}
spec:
  clusterIP: 10.96.6.1
  selector: {app: server-authz}
  ports:
  - {name: http, port: 8080, targetPort: 8080, protocol: TCP}
  - {name: tcp, port: 8078, targetPort: 8078, protocol: TCP}
  - {name: sockperf, port: 11111, targetPort: 11111, protocol: TCP}
  - {name: iperf, port: 5201, targetPort: 5201, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: server-sockmap, namespace: bench}
spec:
  clusterIP: 10.96.7.1
  selector: {app: server-sockmap}
  ports:
  - {name: http, port: 8080, targetPort: 8080, protocol: TCP}
  - {name: tcp, port: 8078, targetPort: 8078, protocol: TCP}
  - {name: sockperf, port: 11111, targetPort: 11111, protocol: TCP}
  - {name: iperf, port: 5201, targetPort: 5201, protocol: TCP}
`

// objectsB adds the B build's HBONE server (on node-2).
const objectsB = `
---
apiVersion: v1
kind: Service
metadata: {name: server-hbone-b, namespace: bench}
spec:
  clusterIP: 10.96.8.1
  selector: {app: server-hbone-b}
  ports:
  - {name: http, port: 8080, targetPort: 8080, protocol: TCP}
  - {name: tcp, port: 8078, targetPort: 8078, protocol: TCP}
  - {name: sockperf, port: 11111, targetPort: 11111, protocol: TCP}
  - {name: iperf, port: 5201, targetPort: 5201, protocol: TCP}
`

func pinned(cpu int, argv ...string) []string {
	return append([]string{"taskset", "-c", fmt.Sprint(cpu)}, argv...)
}

// Setup builds the topology: one simulated node, the server pod (ambient),
// an enrolled client for Kmesh's arm and one client pod outside the mesh per
// other arm (their floor carries no mesh cost, and no two arms share a
// client address: connection-rate runs would otherwise trip over each
// other's TIME_WAIT sockets), and each arm's plumbing. Clients run on CPU 0,
// the server on CPU 1.
func Setup(ctx context.Context, opts Options) (*Env, error) {
	for _, tool := range []string{"taskset", "iptables", "haproxy", "sockperf", "iperf3"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("%s not found: apt-get install util-linux iptables haproxy sockperf iperf3", tool)
		}
	}
	if _, err := os.Stat(opts.Fortio); err != nil {
		return nil, fmt.Errorf("fortio: %w (make bench installs fortio v1.68.2)", err)
	}
	e := &Env{opts: opts}
	var err error
	// BPF program time is only accounted while stats are enabled.
	if e.stats, err = ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME)); err != nil {
		return nil, fmt.Errorf("enabling BPF stats: %w", err)
	}
	so := sim.Options{Nodes: 1, Objects: objects, DaemonBin: opts.DaemonBin, Log: opts.Log, DaemonEnv: opts.DaemonEnv}
	if opts.DaemonBinB != "" {
		// The B build runs the second node's daemon; its arm's client and
		// server live there, so each build carries only its own arm.
		so.Nodes, so.Objects = 2, objects+objectsB
		so.NodeEnv = func(node string) []string {
			if node == "node-2" {
				return opts.DaemonEnvB
			}
			return nil
		}
		so.NodeDaemonBin = func(node string) string {
			if node == "node-2" {
				return opts.DaemonBinB
			}
			return ""
		}
	}
	e.cluster, err = sim.Start(ctx, so)
	if err != nil {
		e.stats.Close()
		return nil, err
	}
	if err := e.setup(ctx); err != nil {
		log := lastLines(e.cluster.Nodes[0].Daemon.Log(), 30)
		e.Close()
		return nil, fmt.Errorf("%w\n--- kmesh-daemon log (last lines):\n%s", err, log)
	}
	return e, nil
}

func (e *Env) setup(ctx context.Context) error {
	e.dir = filepath.Join(e.cluster.RunDir, "bench")
	if err := os.MkdirAll(e.dir, 0o700); err != nil {
		return err
	}
	k := e.cluster.Kube()
	mkOn := func(node, ns, name string, ctrs ...corev1.Container) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": name}},
			Spec: corev1.PodSpec{NodeName: node, Containers: ctrs}}
	}
	mk := func(ns, name string, ctrs ...corev1.Container) *corev1.Pod { return mkOn("node-1", ns, name, ctrs...) }
	tools := func() []corev1.Container {
		return []corev1.Container{
			{Name: "fortio", Command: pinned(1, e.opts.Fortio, "server", "-http-port", fmt.Sprint(portHTTP),
				"-tcp-port", fmt.Sprint(portTCP), "-grpc-port", "disabled", "-redirect-port", "disabled", "-loglevel", "error")},
			{Name: "sockperf", Command: pinned(1, "sockperf", "sr", "--tcp", "-p", fmt.Sprint(portSockperf))},
			{Name: "iperf3", Command: pinned(1, "iperf3", "-s", "-p", fmt.Sprint(portIperf))},
		}
	}
	server := mk("bench", "server", tools()...)
	// The HBONE arm's server: the same tools behind an authorization
	// policy, which sends even same-node clients through the tunnel (its
	// inbound side enforces the policy). Everything else is as for the
	// other arms: same node, same CPUs.
	serverHBONE := mk("bench", "server-hbone", tools()...)
	// The kernel-authorization arm's server: an ALLOW policy the kernel
	// holds, so a same-node client is authorized at connect() and goes
	// straight to it.
	serverAuthz := mk("bench", "server-authz", tools()...)
	if err := e.allowPolicy(ctx, "server-hbone"); err != nil {
		return err
	}
	if err := e.authzPolicy(ctx); err != nil {
		return err
	}
	// The sockmap arm's server: the same tools; it and its client are
	// opted into splicing (kmesh_splice_ns), so the kernel arm beside it
	// stays unspliced in the same run.
	serverSockmap := mk("bench", "server-sockmap", tools()...)
	// The sidecar pairs' servers: the same tools in pods outside the
	// ambient mesh (namespace plain), each to get an Istio-style sidecar
	// (sidecar.go); one pair unspliced, one opted into splicing.
	serverSidecar := mk("plain", "server-sidecar", tools()...)
	serverSidecarS := mk("plain", "server-sidecar-s", tools()...)
	pods := []*corev1.Pod{server, serverHBONE, serverAuthz, serverSockmap, mk("bench", "client"), mk("bench", "hbone-client"), mk("bench", "authz-client"),
		mk("bench", "sockmap-client"), mk("plain", "direct"), mk("plain", "dnat"), mk("plain", "proxied"), mk("plain", "inbound"),
		serverSidecar, serverSidecarS, mk("plain", "sidecar-client"), mk("plain", "sidecar-client-s")}
	if e.opts.DaemonBinB != "" {
		if err := e.allowPolicy(ctx, "server-hbone-b"); err != nil {
			return err
		}
		pods = append(pods, mkOn("node-2", "bench", "server-hbone-b", tools()...), mkOn("node-2", "bench", "hbone-client-b"))
	}
	for _, p := range pods {
		if _, err := k.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	got := map[string]*sim.Pod{}
	for _, p := range pods {
		sp, err := e.cluster.WaitPod(p.Namespace, p.Name, 30*time.Second)
		if err != nil {
			return err
		}
		got[p.Namespace+"/"+p.Name] = sp
		if !strings.HasPrefix(p.Name, "server") {
			if err := clientSysctls(sp); err != nil {
				return err
			}
		}
	}
	e.server = got["bench/server"]
	e.serverPids = append(e.server.Pids(), got["bench/server-hbone"].Pids()...)
	e.serverPids = append(e.serverPids, got["bench/server-authz"].Pids()...)
	e.serverPids = append(e.serverPids, got["bench/server-sockmap"].Pids()...)
	// Before their sidecars start: those are the sidecar arms' proxies.
	e.serverPids = append(e.serverPids, got["plain/server-sidecar"].Pids()...)
	e.serverPids = append(e.serverPids, got["plain/server-sidecar-s"].Pids()...)
	if p := got["bench/server-hbone-b"]; p != nil {
		e.serverPids = append(e.serverPids, p.Pids()...)
	}
	serverIP := e.server.IPs()[0].String()
	proxied := got["plain/proxied"]

	direct := &Arm{Name: "direct", Available: true, addr: serverIP, client: got["plain/direct"]}
	dnat := &Arm{Name: "iptables-dnat", Available: true, addr: vipDNAT, client: got["plain/dnat"]}
	kmesh := &Arm{Name: "kmesh-kernel", Available: true, addr: vipKmesh, client: got["bench/client"]}
	sockmap := &Arm{Name: "kmesh-sockmap", Available: true, addr: vipSockmap, client: got["bench/sockmap-client"]}
	proxy := &Arm{Name: "haproxy-tcp", Available: true, addr: vipProxy, client: proxied}
	proxyTLS := &Arm{Name: "haproxy-mtls", Available: true, addr: vipProxyTLS, client: proxied}
	hbone := &Arm{Name: "kmesh-hbone", Available: true, addr: vipHBONE, client: got["bench/hbone-client"]}
	// Plaintext from outside the mesh straight to the pod IP of the server
	// with a policy: the kernel's inbound enforcement (sk_lookup) hands it
	// to the proxy's 15006, which authorizes it and splices. Against
	// "direct" (the same, to the server without policies, where sk_lookup
	// runs and leaves the connection alone) it is the cost of enforcing.
	inboundAuthz := &Arm{Name: "kmesh-inbound-authz", Available: true, addr: got["bench/server-hbone"].IPs()[0].String(), client: got["plain/inbound"]}
	// Same node, a destination with an ALLOW policy: authorized in the
	// client's connect() with the identity the kernel attests, then the
	// kernel path. Against "direct" it is the cost of authorizing.
	kauthz := &Arm{Name: "kmesh-authz", Available: true, addr: vipAuthz, client: got["bench/authz-client"]}
	// Sidecar pairs (sidecar.go): the application dials the server's pod
	// IP, its sidecar's capture does the rest.
	sidecar := &Arm{Name: "sidecar-pair", Available: true, addr: got["plain/server-sidecar"].IPs()[0].String(), client: got["plain/sidecar-client"]}
	sidecarS := &Arm{Name: "sidecar-pair-spliced", Available: true, addr: got["plain/server-sidecar-s"].IPs()[0].String(), client: got["plain/sidecar-client-s"]}
	e.Arms = []*Arm{direct, dnat, kmesh, sockmap, proxy, proxyTLS, hbone, inboundAuthz, kauthz, sidecar, sidecarS}
	hboneB := &Arm{Name: ArmHBONEB, Why: "no second build (-daemon-b)"}
	if e.opts.DaemonBinB != "" {
		hboneB = &Arm{Name: ArmHBONEB, Available: true, addr: vipHBONEB, client: got["bench/hbone-client-b"], node: 1}
		e.Arms = append(e.Arms, hboneB)
	}
	if len(e.opts.Arms) > 0 {
		for _, a := range e.Arms {
			// The B build's arm goes with the A build's.
			selected := slices.Contains(e.opts.Arms, a.Name) || a == hboneB && slices.Contains(e.opts.Arms, hbone.Name)
			if a.Available && a != direct && !selected {
				a.Available, a.Why = false, "not selected (-arms)"
			}
		}
	}

	// kube-proxy style: DNAT of the VIP in the client's own netns.
	if err := e.iptables(dnat.client, "-t", "nat", "-A", "OUTPUT", "-d", vipDNAT, "-p", "tcp", "-j", "DNAT", "--to-destination", serverIP); err != nil {
		return err
	}
	if err := dnat.client.RouteToNode(netip.MustParsePrefix(vipDNAT + "/32")); err != nil {
		return err
	}
	// The haproxy pair, as a sidecar pair or ztunnels would sit: REDIRECT in
	// the client pod to the client-side proxy, which carries the original
	// destination in a PROXY v2 header to the server-side proxy.
	if err := e.startProxies(proxied, proxy, proxyTLS, serverIP); err != nil {
		return err
	}
	for _, vip := range []string{vipProxy, vipProxyTLS} {
		if err := proxied.RouteToNode(netip.MustParsePrefix(vip + "/32")); err != nil {
			return err
		}
	}
	if sockmap.Available {
		for _, p := range []*sim.Pod{sockmap.client, got["bench/server-sockmap"]} {
			cookie, err := p.Net.NS.Cookie()
			if err != nil {
				return err
			}
			if err := bpf.SetSpliceNSPinned(filepath.Join(sim.PinParent, e.cluster.ID, "node-1"), cookie, bpf.SplicePeers); err != nil {
				return fmt.Errorf("opting the sockmap arm into splicing: %w", err)
			}
		}
	}
	for _, sc := range []struct {
		a      *Arm
		server *sim.Pod
		splice bool
	}{{sidecar, got["plain/server-sidecar"], false}, {sidecarS, got["plain/server-sidecar-s"], true}} {
		if sc.a.Available {
			if err := e.sidecarPair(sc.a, sc.server, sc.splice); err != nil {
				return fmt.Errorf("arm %s: %w", sc.a.Name, err)
			}
		}
	}
	if err := e.waitReachable(ctx); err != nil {
		return err
	}
	if sidecarS.Available {
		if err := e.checkCounted(sidecarS, "splice_insert", "spliced"); err != nil {
			return err
		}
	}
	if sockmap.Available {
		if err := e.checkCounted(sockmap, "splice_insert", "spliced"); err != nil {
			return err
		}
	}
	for _, a := range []*Arm{hbone, hboneB} {
		if a.Available {
			if err := e.checkCounted(a, "tunnel", "sent to the tunnel"); err != nil {
				return err
			}
		}
	}
	if kauthz.Available {
		if err := e.checkCounted(kauthz, "authz_allow", "authorized at connect"); err != nil {
			return err
		}
	}
	if inboundAuthz.Available {
		return e.checkCounted(inboundAuthz, "inbound_proxy", "steered to the proxy's 15006")
	}
	return nil
}

// allowPolicy is an ALLOW policy for the HBONE arm's server, as a user
// would write it: clients of the bench namespace may connect, and so may
// the plaintext client of the inbound-enforcement arm, by address.
func (e *Env) allowPolicy(ctx context.Context, app string) error {
	ap := &securityclient.AuthorizationPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: app, Namespace: "bench"},
		Spec: securityapi.AuthorizationPolicy{
			Selector: &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": app}},
			Action:   securityapi.AuthorizationPolicy_ALLOW,
			Rules: []*securityapi.Rule{
				{From: []*securityapi.Rule_From{{Source: &securityapi.Source{Namespaces: []string{"bench"}}}}},
				{From: []*securityapi.Rule_From{{Source: &securityapi.Source{IpBlocks: []string{"10.244.0.0/16"}}}}},
			},
		},
	}
	// More ports than a kernel entry singles out (16): the kernel leaves
	// this server's policy to the tunnel, so this arm keeps measuring HBONE
	// (and the fallback is exercised). The rule adds nothing the first two
	// do not allow already for the arms' clients.
	var many []string
	for p := 20000; p < 20017; p++ {
		many = append(many, fmt.Sprint(p))
	}
	ap.Spec.Rules = append(ap.Spec.Rules, &securityapi.Rule{To: []*securityapi.Rule_To{{Operation: &securityapi.Operation{Ports: many}}}})
	pols := e.cluster.CP.Kube().Istio().SecurityV1().AuthorizationPolicies("bench")
	_, err := pols.Create(ctx, ap, metav1.CreateOptions{})
	return err
}

// authzPolicy is the kernel-authorization arm's ALLOW policy: one the
// kernel holds, so a same-node client is authorized at connect().
func (e *Env) authzPolicy(ctx context.Context) error {
	pols := e.cluster.CP.Kube().Istio().SecurityV1().AuthorizationPolicies("bench")
	kp := &securityclient.AuthorizationPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "server-authz", Namespace: "bench"},
		Spec: securityapi.AuthorizationPolicy{
			Selector: &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "server-authz"}},
			Action:   securityapi.AuthorizationPolicy_ALLOW,
			Rules:    []*securityapi.Rule{{From: []*securityapi.Rule_From{{Source: &securityapi.Source{Namespaces: []string{"bench"}}}}}},
		},
	}
	_, err := pols.Create(ctx, kp, metav1.CreateOptions{})
	return err
}

// checkCounted makes sure an arm measures what it says: a probe through it
// must move the kernel's counter stat (the HBONE arm: connections sent to
// the tunnel; the inbound arm: connections steered to 15006).
func (e *Env) checkCounted(a *Arm, stat, what string) error {
	maps, closeMaps, err := bpf.OpenPinned(filepath.Join(sim.PinParent, e.cluster.ID, e.cluster.Nodes[a.node].Name))
	if err != nil {
		return err
	}
	defer closeMaps()
	before, err := maps.Stats()
	if err != nil {
		return err
	}
	if _, err := e.fortio(a, "-qps", "10", "-c", "1", "-n", "3", "-keepalive=false", fmt.Sprintf("http://%s:%d/echo", a.addr, portHTTP)); err != nil {
		return fmt.Errorf("arm %s: %w", a.Name, err)
	}
	after, err := maps.Stats()
	if err != nil {
		return err
	}
	if after[stat] < before[stat]+3 {
		return fmt.Errorf("arm %s: the kernel counted %d of 3 connections %s", a.Name, after[stat]-before[stat], what)
	}
	return nil
}

// clientSysctls lets a client pod open connections as fast as the machine
// allows: the whole ephemeral port range, and reuse of its own TIME_WAIT
// sockets (connection-rate runs open tens of thousands per run).
func clientSysctls(p *sim.Pod) error {
	return p.Net.NS.Do(func() error {
		for k, v := range map[string]string{
			"/proc/sys/net/ipv4/ip_local_port_range": "1024 65000",
			"/proc/sys/net/ipv4/tcp_tw_reuse":        "1",
		} {
			if err := os.WriteFile(k, []byte(v), 0); err != nil {
				return err
			}
		}
		return nil
	})
}

func (e *Env) iptables(p *sim.Pod, args ...string) error {
	cmd := exec.Command("iptables", append([]string{"-w"}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := p.Net.Start(cmd, nil); err != nil {
		return err
	}
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("iptables %v in %s: %w: %s", args, p.Key(), err, out.String())
	}
	return nil
}

// waitReachable waits until every available arm answers HTTP.
func (e *Env) waitReachable(ctx context.Context) error {
	deadline := time.Now().Add(30 * time.Second)
	for _, a := range e.Arms {
		if !a.Available {
			continue
		}
		for {
			_, err := e.fortio(a, "-qps", "10", "-c", "1", "-n", "3", fmt.Sprintf("http://%s:%d/echo", a.addr, portHTTP))
			if err == nil {
				break
			}
			if time.Now().After(deadline) || ctx.Err() != nil {
				return fmt.Errorf("arm %s never answered: %w%s", a.Name, err, e.proxyLogs())
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return nil
}

// run runs a client tool inside the arm's client pod, pinned to CPU 0, and
// returns its stdout and the CPU it used.
func (e *Env) run(a *Arm, argv ...string) ([]byte, time.Duration, error) {
	cmd := exec.Command("taskset", append([]string{"-c", "0"}, argv...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := a.client.Net.Start(cmd, a.client.Cgroup); err != nil {
		return nil, 0, err
	}
	err := cmd.Wait()
	var cpu time.Duration
	if cmd.ProcessState != nil {
		cpu = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	}
	if err != nil {
		return nil, cpu, fmt.Errorf("%s: %w: %s", argv[0], err, strings.TrimSpace(lastLines(errb.String(), 5)))
	}
	return out.Bytes(), cpu, nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func (e *Env) fortio(a *Arm, args ...string) (Sample, error) {
	argv := append([]string{e.opts.Fortio, "load", "-loglevel", "error", "-json", "-"}, args...)
	out, _, err := e.run(a, argv...)
	if err != nil {
		return Sample{}, err
	}
	s, err := ParseFortio(bytes.NewReader(out))
	if err == nil && s.Count == 0 {
		err = errors.New("fortio completed no request")
	}
	if err == nil && s.Errors > 0 {
		err = fmt.Errorf("%d of %d requests failed", s.Errors, s.Count+s.Errors)
	}
	return s, err
}

// cpuSnapshot is everything whose CPU a run accounts.
type cpuSnapshot struct {
	system  SystemCPU
	server  uint64 // ns, every server process
	proxies uint64 // ns, the arm's proxies
	daemon  uint64 // ns, the node's kmesh-daemon
	bpf     uint64 // ns, Kmesh's programs
}

func (e *Env) snapshot(a *Arm) cpuSnapshot {
	var s cpuSnapshot
	s.system, _ = ReadSystemCPU()
	for _, pid := range e.serverPids {
		v, _ := TaskCPU(pid)
		s.server += v
	}
	for _, pid := range a.proxies {
		v, _ := TaskCPU(pid)
		s.proxies += v
	}
	// The arm's node: its daemon is the arm's tunnel, its programs ran
	// for the arm's connections.
	n := e.cluster.Nodes[a.node]
	s.daemon, _ = TaskCPU(n.Daemon.Pid())
	if ps, err := bpf.PinnedProgramStats(filepath.Join(sim.PinParent, e.cluster.ID, n.Name)); err == nil {
		for _, p := range ps {
			s.bpf += p.RunTimeNs
		}
	}
	return s
}

// CPU is where one run's CPU went, in milliseconds.
type CPU struct {
	Client  float64 `json:"client_ms"`
	Server  float64 `json:"server_ms"`
	Proxies float64 `json:"proxies_ms"`
	Daemon  float64 `json:"daemon_ms"`
	BPF     float64 `json:"bpf_ms"` // included in client and server time (programs run in their syscalls)
	Softirq float64 `json:"softirq_ms"`
	System  float64 `json:"system_busy_ms"` // /proc/stat, tick-sampled: a cross-check
}

// Total is the CPU the data path and its applications used.
func (c CPU) Total() float64 { return c.Client + c.Server + c.Proxies + c.Daemon + c.Softirq }

func diffCPU(a, b cpuSnapshot, client time.Duration) CPU {
	return CPU{
		Client:  float64(client.Microseconds()) / 1000,
		Server:  float64(b.server-a.server) / 1e6,
		Proxies: float64(b.proxies-a.proxies) / 1e6,
		Daemon:  float64(b.daemon-a.daemon) / 1e6,
		BPF:     float64(b.bpf-a.bpf) / 1e6,
		Softirq: TicksToMs(b.system.Softirq - a.system.Softirq),
		System:  TicksToMs(b.system.Busy - a.system.Busy),
	}
}

// Close tears the topology down.
func (e *Env) Close() error {
	err := e.cluster.Close()
	if e.stats != nil {
		e.stats.Close()
	}
	return err
}

func shuffle[T any](xs []T, rng *rand.Rand) []T {
	out := append([]T(nil), xs...)
	rng.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	return out
}

func (e *Env) proxyLogs() string {
	var b strings.Builder
	logs, _ := filepath.Glob(filepath.Join(e.dir, "*.log"))
	for _, l := range logs {
		c, _ := os.ReadFile(l)
		fmt.Fprintf(&b, "\n--- %s:\n%s", filepath.Base(l), lastLines(string(c), 10))
	}
	return b.String()
}
