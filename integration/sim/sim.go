// Package sim is the node simulator: a Kubernetes cluster on one machine,
// made of network namespaces, cgroups and processes, with Istio's own
// control plane logic as its API server and istiod, and a real Kmesh
// daemon per node. Every end-to-end test, benchmark and the demo run on it.
//
//   - The cluster's truth is Kubernetes objects in the embedded control
//     plane (integration/controlplane): what the daemons receive is what a
//     real istiod sends for those objects.
//   - Each node plays kubelet (kubelet.go): it watches Pods bound to it
//     through client-go's kubernetes.Interface only, makes their namespaces
//     and cgroups, starts their processes and writes their status.
//   - Each node plays istio-cni's node agent (cni.go): pods of ambient
//     namespaces are annotated and handed to the node's daemon over ZDS with
//     their network namespace, as in a real cluster.
//   - Nodes are namespaces on a fabric (integration/podnet): pods route the
//     cluster's prefixes only, nothing leaves the machine.
//
// Close (also on a failed test, and after Ctrl-C through the caller's
// context) removes every namespace, cgroup, pin, socket and process.
//
// External mode (Options.External, external.go, extkubelet.go,
// extspec.go, extcni.go, container.go): the nodes are kubelets of a real
// kube-apiserver instead. Nothing above runs (no embedded control plane,
// daemon or node agent); each node registers a Ready Node with a Lease and
// runs every pod bound to it, whatever it is (pilot-discovery, kmesh-daemon
// as the ztunnel DaemonSet's pod, Istio's install-cni, apps), with the
// pod's command, args, env, volumes, probes and lifecycle, as the node's
// container runtime and CNI:
//
//   - a node has a PID namespace whose init is named kubelet and lives in
//     the node's network namespace (istio-cni reads /host/proc/1/ns/net);
//     a host directory <run>/<node>/host for hostPaths (/var/run is /run;
//     /sys/fs/bpf is its bpffs directory, /sys/fs/cgroup its cgroup,
//     /proc a procfs of its PID namespace); a CNI config
//     (/etc/cni/net.d) whose first plugin the kubelet implements;
//   - a container is a process in the pod's network namespace, the node's
//     PID namespace, the cgroup <node>/pod<uid>/<container id> and a mount
//     namespace whose root is an overlay of the machine's root (the image)
//     with the volumes at their mountPath; Image maps the container image
//     to its program (and extra files);
//   - pods reach the API server at its own 127.0.0.1:port through a
//     forwarder the kubelet runs in each network namespace (it dials only
//     that address); their resolv.conf names only External.ClusterDNS.
//
// Not simulated: users and capabilities (everything runs as root),
// resource limits, image pulls, token refresh, volume updates, kube-proxy
// and cluster DNS (services resolve only if the caller provides a DNS
// server), startup and liveness probes, ephemeral containers, gRPC probes.
package sim

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/controlplane"
	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/kernel"
)

// Options configure a simulated cluster.
type Options struct {
	// Nodes is the number of nodes (1 to 4; default 2).
	Nodes int
	// IPv6 makes pods dual-stack.
	IPv6 bool
	// Objects are initial Kubernetes objects (YAML); Nodes are added.
	Objects string
	// DaemonBin is the kmesh-daemon binary run on every node.
	DaemonBin string
	// NodeDaemonBin, when set and not empty for a node, is the binary
	// that node runs instead (A/B benchmarks: two builds side by side).
	NodeDaemonBin func(node string) string
	// AppBin is the binary pods' processes re-execute for built-in apps
	// (echo server, clients); default the running binary.
	AppBin string
	// DaemonEnv adds environment to every daemon (map sizes, log level).
	DaemonEnv []string
	// NodeEnv adds environment to one node's daemon (after DaemonEnv).
	NodeEnv func(node string) []string
	// NoListenerHolder runs the daemons without a listener holder (their
	// pods' listeners then die with them, as before the holder existed).
	NoListenerHolder bool
	// DNSUpstreamHost, when set, makes the daemons' upstream resolver (the
	// node's resolv.conf, KMESH_DNS_RESOLV_CONF) the address of that host
	// number in the first node's pod prefix (DNSUpstream): a pod the test
	// runs there (create it with that address in its status). Unset, the
	// daemons have no upstream resolver at all: nothing they forward can
	// leave the simulator.
	DNSUpstreamHost int
	// External, when set, makes the nodes kubelets of a real API server
	// (external.go): no embedded control plane, no daemon and no node
	// agent started by the simulator (DaemonBin is not needed); every pod
	// bound to a node runs there.
	External *External
	Log      *slog.Logger
}

// Cluster is a running simulated cluster.
type Cluster struct {
	ID    string
	CP    *controlplane.ControlPlane
	Nodes []*Node

	opts    Options
	log     *slog.Logger
	fabric  *podnet.Fabric
	cgroup  *podnet.Cgroup
	RunDir  string
	pinRoot string
	tls     *tls.Config
	root    string // mesh root certificate file for the daemons
	cpAddr  string
	ext     kubernetes.Interface // External's API server

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	closers  []func() error
	closed   bool
	nsLabels map[string]map[string]string
}

const (
	cluster4 = "10.244.0.0/16"
	cluster6 = "fd00:10:244::/48"
	// PinParent holds every simulator's pins.
	PinParent = kernel.DefaultBPFFS + "/kmesh-sim"
	runParent = "/run/kmesh-sim"
	// ClusterID is the simulated cluster's name, as istiod reports it.
	ClusterID = "Kubernetes"
)

// Start brings a cluster up: control plane, fabric, nodes with their
// daemons, kubelets and node agents. On error everything made so far is
// removed.
func Start(ctx context.Context, opts Options) (c *Cluster, err error) {
	if opts.Nodes == 0 {
		opts.Nodes = 2
	}
	if opts.Nodes < 1 || opts.Nodes > 4 {
		return nil, fmt.Errorf("the simulator runs 1 to 4 nodes, not %d", opts.Nodes)
	}
	if opts.AppBin == "" {
		opts.AppBin = "/proc/self/exe"
	}
	if opts.DaemonBin == "" && opts.External == nil {
		return nil, errors.New("sim: DaemonBin (the kmesh-daemon binary) is required")
	}
	if opts.External == nil {
		if _, err := os.Stat(opts.DaemonBin); err != nil {
			return nil, fmt.Errorf("kmesh-daemon binary: %w (run make build)", err)
		}
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("the simulator creates network namespaces, cgroups and BPF programs: run it as root")
	}
	if err := kernel.Check(kernel.Probe()); err != nil {
		return nil, err
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	cctx, cancel := context.WithCancel(context.Background())
	c = &Cluster{ID: podnet.RandomSuffix(), opts: opts, log: log.With("component", "sim"), ctx: cctx, cancel: cancel,
		nsLabels: map[string]map[string]string{}}
	built := c // `return nil, err` clears c before this runs
	defer func() {
		if err != nil {
			if cerr := built.Close(); cerr != nil {
				err = fmt.Errorf("%w (and tearing down: %v)", err, cerr)
			}
			c = nil
		}
	}()
	reapStale()
	c.RunDir = filepath.Join(runParent, c.ID)
	if err := os.MkdirAll(c.RunDir, 0o700); err != nil {
		return nil, err
	}
	if err := writeOwner(c.RunDir); err != nil {
		return nil, err
	}
	// The shared parents (/run/kmesh-sim, the bpffs kmesh-sim directory)
	// stay: removing them when empty races with another simulator (another
	// test binary) creating its own directory beneath them.
	c.onClose(func() error { return os.RemoveAll(built.RunDir) })
	c.pinRoot = filepath.Join(PinParent, c.ID)
	c.onClose(func() error {
		_ = os.RemoveAll(built.pinRoot) // daemons unpinned their own; this is the directory
		return nil
	})
	if c.cgroup, err = podnet.NewCgroup("", "kmesh-sim-"+c.ID); err != nil {
		return nil, err
	}
	c.onClose(c.cgroup.Remove)
	if opts.External != nil {
		if err := c.startExternal(ctx); err != nil {
			return nil, err
		}
		return c, nil
	}

	var rootFile string
	if c.tls, rootFile, err = controlplane.ServingTLS(c.RunDir); err != nil {
		return nil, err
	}
	c.root = rootFile
	if err := c.startControlPlane(); err != nil {
		return nil, err
	}
	var v6 netip.Prefix
	if opts.IPv6 {
		v6 = netip.MustParsePrefix(cluster6)
	}
	if c.fabric, err = podnet.NewFabric(netip.MustParsePrefix(cluster4), v6); err != nil {
		return nil, err
	}
	c.onClose(c.fabric.Close)
	for i := 1; i <= opts.Nodes; i++ {
		n, err := c.addNode(i)
		if err != nil {
			return nil, err
		}
		c.Nodes = append(c.Nodes, n)
	}
	c.wg.Add(1)
	go c.watchNamespaces()
	for _, n := range c.Nodes {
		if err := n.Daemon.WaitReady(ctx, 60*time.Second); err != nil {
			return nil, fmt.Errorf("node %s: %w", n.Name, err)
		}
	}
	return c, nil
}

func (c *Cluster) startControlPlane() error {
	cp, err := controlplane.Start(controlplane.Options{Objects: c.opts.Objects, Addr: c.cpAddr, TLS: c.tls, ClusterID: ClusterID})
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.CP, c.cpAddr = cp, cp.Addr
	c.mu.Unlock()
	return nil
}

// StopControlPlane stops istiod (the daemons keep their last state).
func (c *Cluster) StopControlPlane() {
	c.mu.Lock()
	cp := c.CP
	c.CP = nil
	c.mu.Unlock()
	if cp != nil {
		cp.Stop()
	}
}

// Kube is the cluster's Kubernetes API.
func (c *Cluster) Kube() kubernetes.Interface {
	if c.ext != nil {
		return c.ext
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.CP == nil {
		return nil
	}
	return c.CP.Kube().Kube()
}

func (c *Cluster) onClose(f func() error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closers = append(c.closers, f)
}

// Close tears everything down, in reverse order of creation. Safe to call
// more than once.
func (c *Cluster) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	closers := c.closers
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
	var errs []error
	for i := len(closers) - 1; i >= 0; i-- {
		if err := closers[i](); err != nil {
			errs = append(errs, err)
		}
	}
	c.StopControlPlane()
	return errors.Join(errs...)
}

// Node returns a node by name.
func (c *Cluster) Node(name string) *Node {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

func (c *Cluster) nodeObject(n *Node) *corev1.Node {
	zone := fmt.Sprintf("zone-%d", (n.Index+1)/2) // nodes 1,2 share zone-1; 3,4 zone-2
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: map[string]string{
		"kubernetes.io/hostname":        n.Name,
		"topology.kubernetes.io/region": "region-1",
		"topology.kubernetes.io/zone":   zone,
	}}}
}

// pinRootOf is where a node's daemon pins its maps.
// DNSUpstream is the daemons' upstream resolver (Options.DNSUpstreamHost),
// invalid when there is none.
func (c *Cluster) DNSUpstream() netip.Addr {
	if c.opts.DNSUpstreamHost <= 0 {
		return netip.Addr{}
	}
	p4, _ := c.fabric.NodePrefixes(1)
	a := p4.Masked().Addr()
	for range c.opts.DNSUpstreamHost {
		a = a.Next()
	}
	return a
}

// writeResolvConf writes the daemons' resolver configuration: the
// simulator's upstream, or no nameserver at all, never the machine's.
func (c *Cluster) writeResolvConf() (string, error) {
	path := filepath.Join(c.RunDir, "resolv.conf")
	text := "# kmesh simulator: no upstream resolver\n"
	if a := c.DNSUpstream(); a.IsValid() {
		text = "nameserver " + a.String() + "\noptions ndots:5\n"
	}
	return path, os.WriteFile(path, []byte(text), 0o644)
}

func (c *Cluster) pinRootOf(n *Node) string { return filepath.Join(c.pinRoot, n.Name) }

// Maps opens a node's pinned maps for inspection (read-only).
func (n *Node) Maps() (*bpf.Maps, func(), error) { return bpf.OpenPinned(n.cluster.pinRootOf(n)) }

// Snapshot lists the objects of the current API server that the simulator
// cares about, to start a replacement control plane with them.
func (c *Cluster) Snapshot(ctx context.Context) ([]runtime.Object, error) {
	c.mu.Lock()
	cp := c.CP
	c.mu.Unlock()
	if cp == nil {
		return nil, errors.New("no control plane running")
	}
	k := cp.Kube().Kube()
	var out []runtime.Object
	add := func(items int, get func(i int) runtime.Object) {
		for i := 0; i < items; i++ {
			o := get(i)
			if m, ok := o.(metav1.Object); ok {
				m.SetResourceVersion("")
			}
			out = append(out, o)
		}
	}
	nss, err := k.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	add(len(nss.Items), func(i int) runtime.Object { return &nss.Items[i] })
	nodes, err := k.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	add(len(nodes.Items), func(i int) runtime.Object { return &nodes.Items[i] })
	svcs, err := k.CoreV1().Services("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	add(len(svcs.Items), func(i int) runtime.Object { return &svcs.Items[i] })
	pods, err := k.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	add(len(pods.Items), func(i int) runtime.Object { return &pods.Items[i] })
	ist := cp.Kube().Istio()
	ses, err := ist.NetworkingV1().ServiceEntries("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	add(len(ses.Items), func(i int) runtime.Object { return ses.Items[i] })
	aps, err := ist.SecurityV1().AuthorizationPolicies("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	add(len(aps.Items), func(i int) runtime.Object { return aps.Items[i] })
	pas, err := ist.SecurityV1().PeerAuthentications("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	add(len(pas.Items), func(i int) runtime.Object { return pas.Items[i] })
	return out, nil
}

// RestartControlPlane replaces the control plane (same address, same
// serving certificate) by a new one holding objects, as after an istiod
// and API server restart. Nodes reconcile their pods against it.
func (c *Cluster) RestartControlPlane(objects []runtime.Object) error {
	c.StopControlPlane()
	cp, err := controlplane.Start(controlplane.Options{KubeObjects: objects, Addr: c.cpAddr, TLS: c.tls, ClusterID: ClusterID})
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.CP = cp
	c.mu.Unlock()
	return nil
}
