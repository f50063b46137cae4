package sim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"kmesh.dev/kmesh/integration/podnet"
)

// External makes the simulator's nodes kubelets of a real API server
// (Options.External): no embedded control plane, no daemon or node agent
// started by the simulator. Each node registers a Node object, keeps it
// Ready, and runs every pod bound to it as processes, whatever the pod is
// (kmesh-daemon, pilot-discovery, Istio's install-cni, apps), with the
// pod's command, args, env, volumes and probes (extkubelet.go), as the
// container runtime and CNI of its node (extcni.go).
type External struct {
	// Config reaches the API server from the simulator's process (the
	// machine's network namespace).
	Config *rest.Config
	// APIServer is the API server's "127.0.0.1:port". Inside every pod
	// and node network namespace the kubelet forwards that same address to
	// it (the serving certificate is for 127.0.0.1), and pods get
	// KUBERNETES_SERVICE_HOST/PORT for it. It must be a loopback address:
	// the forwarders dial nothing else.
	APIServer string
	// Image maps a container image to what the simulator runs for it;
	// false for an image it does not know (the container then fails, as
	// an image pull would).
	Image func(image string) (Image, bool)
	// ServiceCIDR, when valid, is routed from every pod through its node,
	// as a pod's default route does in a cluster (whatever serves
	// ClusterIPs there, e.g. a kube-proxy stand-in, sits on the node).
	// Only this prefix: pods still have no route out of the simulator.
	ServiceCIDR netip.Prefix
	// Hosts, when set, gives lines the kubelet appends to every pod's
	// /etc/hosts when it starts (e.g. Service names and their ClusterIPs:
	// a stand-in for the cluster's DNS).
	Hosts func() string
	// ClusterDNS is the nameserver of pods with dnsPolicy ClusterFirst
	// (a kubelet's --cluster-dns), with the cluster.local search path.
	// Unset, their resolv.conf has no nameserver (nothing resolves; the
	// machine's resolver is never used). Must be an address inside the
	// simulated cluster.
	ClusterDNS netip.Addr
}

// Image is what a container image holds, for the simulator: its program
// and the files a container of it sees.
type Image struct {
	// Entrypoint is the program (a host path) run for every container of
	// the image: the container's command (or the image's entrypoint when
	// the container has none) names it, then its args follow.
	Entrypoint string
	// Files are extra files of the image: container path -> host path
	// (e.g. install-cni's /opt/cni/bin/istio-cni, the plugin it installs).
	Files map[string]string
}

// Node allocatable resources: enough for istiod's and the DaemonSets'
// requests; also what limits.* resolve to for a container without limits.
var nodeAllocatable = corev1.ResourceList{
	corev1.ResourceCPU:    resource.MustParse("4"),
	corev1.ResourceMemory: resource.MustParse("16Gi"),
	corev1.ResourcePods:   resource.MustParse("110"),
}

// extNode is a node's kubelet state in the external mode.
type extNode struct {
	hostDir   string // <run>/<node>/host: the node's hostPath root
	pinDir    string // the node's bpffs directory (its /sys/fs/bpf)
	cgroupDir string // the node's cgroup (its /sys/fs/cgroup)
	init      *os.Process
	pidns     *os.File
	netnsDir  string // <host>/var/run/netns, a shared mount

	mu   sync.Mutex
	pods map[types.UID]*extPod
	cni  []string // "ADD|DEL <plugin> <namespace>/<name>", in order
}

func (c *Cluster) startExternal(ctx context.Context) error {
	x := c.opts.External
	ap, err := netip.ParseAddrPort(x.APIServer)
	if err != nil || !ap.Addr().IsLoopback() {
		return fmt.Errorf("sim: External.APIServer %q must be a loopback address:port", x.APIServer)
	}
	if x.Config == nil || x.Image == nil {
		return errors.New("sim: External needs Config and Image")
	}
	if c.ext, err = kubernetes.NewForConfig(x.Config); err != nil {
		return err
	}
	var v6 netip.Prefix
	if c.opts.IPv6 {
		v6 = netip.MustParsePrefix(cluster6)
	}
	if c.fabric, err = podnet.NewFabric(netip.MustParsePrefix(cluster4), v6); err != nil {
		return err
	}
	c.onClose(c.fabric.Close)
	for i := 1; i <= c.opts.Nodes; i++ {
		n, err := c.addExternalNode(ctx, i)
		if err != nil {
			return err
		}
		c.Nodes = append(c.Nodes, n)
	}
	return nil
}

func (c *Cluster) addExternalNode(ctx context.Context, idx int) (*Node, error) {
	name := fmt.Sprintf("node-%d", idx)
	n := &Node{Name: name, Index: idx, cluster: c, pods: map[string]*Pod{}, nextIP: 10}
	x := &extNode{pods: map[types.UID]*extPod{}}
	n.ext = x
	var err error
	if n.Net, err = c.fabric.AddNode(name, idx); err != nil {
		return nil, err
	}
	n.v4, n.v6 = c.fabric.NodePrefixes(idx)
	if !c.opts.IPv6 {
		n.v6 = netip.Prefix{}
	}
	if n.Cgroup, err = c.cgroup.Child(name); err != nil {
		return nil, err
	}
	x.hostDir = filepath.Join(c.RunDir, name, "host")
	x.pinDir = filepath.Join(c.pinRoot, name)
	x.cgroupDir = n.Cgroup.Path
	for _, d := range []string{x.hostDir, x.pinDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	// Where pod network namespaces are pinned: a shared mount, so that a
	// pin made after a container started reaches it (HostToContainer).
	x.netnsDir = filepath.Join(x.hostDir, "run/netns") // /var/run is /run on a node
	if err := os.MkdirAll(x.netnsDir, 0o755); err != nil {
		return nil, err
	}
	if err := unix.Mount(x.netnsDir, x.netnsDir, "", unix.MS_BIND, ""); err != nil {
		return nil, fmt.Errorf("netns directory: %w", err)
	}
	c.onClose(func() error { return unix.Unmount(x.netnsDir, unix.MNT_DETACH) })
	if err := unix.Mount("", x.netnsDir, "", unix.MS_PRIVATE, ""); err != nil {
		return nil, err
	}
	if err := unix.Mount("", x.netnsDir, "", unix.MS_SHARED, ""); err != nil {
		return nil, err
	}
	if err := n.writePrimaryCNIConfig(); err != nil {
		return nil, err
	}
	if err := n.startNodeInit(); err != nil {
		return nil, err
	}
	// The API server from the node's network namespace (hostNetwork pods,
	// CNI plugins).
	if _, err := n.forwardAPIServer(n.Net.NS); err != nil {
		return nil, err
	}
	if err := n.register(ctx); err != nil {
		return nil, err
	}
	c.onClose(n.stopExternalPods)
	c.wg.Add(2)
	go n.heartbeat()
	go n.extKubelet()
	return n, nil
}

// startNodeInit starts the node's PID 1 in a new PID namespace, in the
// node's network namespace (istio-cni opens /host/proc/1/ns/net as the
// host's) and cgroup.
func (n *Node) startNodeInit() error {
	c := n.cluster
	logf, err := os.Create(filepath.Join(c.RunDir, n.Name, "init.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := execHelper(c.opts.AppBin, nodeInitHelper)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	cg, err := n.Cgroup.Open()
	if err != nil {
		return err
	}
	defer cg.Close()
	if err := startInNode(cmd, n.Net.NS.Fd(), -1, int(cg.Fd())); err != nil {
		return fmt.Errorf("node %s init: %w", n.Name, err)
	}
	n.ext.init = cmd.Process
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	c.onClose(func() error {
		_ = cmd.Process.Kill() // the kernel kills the rest of its PID namespace
		select {
		case <-exited: // reaped: no zombie left
		case <-time.After(10 * time.Second):
			return fmt.Errorf("node %s init (pid %d) did not exit", n.Name, cmd.Process.Pid)
		}
		return nil
	})
	if n.ext.pidns, err = os.Open(fmt.Sprintf("/proc/%d/ns/pid", cmd.Process.Pid)); err != nil {
		return err
	}
	c.onClose(n.ext.pidns.Close)
	return nil
}

// register creates the node's Node object, Ready, and its Lease.
func (n *Node) register(ctx context.Context) error {
	k := n.cluster.ext
	obj := n.cluster.nodeObject(n)
	obj.Labels["kubernetes.io/os"] = "linux"
	obj.Labels["kubernetes.io/arch"] = "amd64"
	obj.Labels["node.kubernetes.io/instance-type"] = "kmesh-sim"
	obj, err := k.CoreV1().Nodes().Create(ctx, obj, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("creating Node %s: %w", n.Name, err)
	}
	n.cluster.onClose(func() error {
		err := k.CoreV1().Nodes().Delete(context.Background(), n.Name, metav1.DeleteOptions{})
		if apierrors.IsNotFound(err) {
			err = nil
		}
		lerr := k.CoordinationV1().Leases(corev1.NamespaceNodeLease).Delete(context.Background(), n.Name, metav1.DeleteOptions{})
		if apierrors.IsNotFound(lerr) {
			lerr = nil
		}
		return errors.Join(err, lerr)
	})
	if err := n.writeNodeStatus(ctx); err != nil {
		return err
	}
	return n.renewLease(ctx)
}

// writeNodeStatus writes the node's status, again on a conflict (the node
// lifecycle controller updates the same object: Modify).
func (n *Node) writeNodeStatus(ctx context.Context) error {
	nodes := n.cluster.ext.CoreV1().Nodes()
	_, err := Modify(ctx, n.Name, nodes.Get, nodes.UpdateStatus, n.nodeStatus)
	return err
}

// nodeStatus sets the status a kubelet reports on obj.
func (n *Node) nodeStatus(obj *corev1.Node) {
	now := metav1.Now()
	obj.Status.Capacity = nodeAllocatable.DeepCopy()
	obj.Status.Allocatable = nodeAllocatable.DeepCopy()
	obj.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: n.Net.Uplink4().String()}, {Type: corev1.NodeHostName, Address: n.Name}}
	obj.Status.NodeInfo = corev1.NodeSystemInfo{KubeletVersion: "v1.36.3", OperatingSystem: "linux", Architecture: "amd64",
		ContainerRuntimeVersion: "kmesh-sim://1", KernelVersion: kernelRelease()}
	obj.Status.Phase = corev1.NodeRunning
	// Where the API server reaches the node's kubelet API (port-forward):
	// a test may serve it there, inside the node (integration/cluster's
	// KubeletAPI); nothing else listens on it.
	obj.Status.DaemonEndpoints.KubeletEndpoint.Port = KubeletPort
	cond := func(t corev1.NodeConditionType, s corev1.ConditionStatus, reason string) corev1.NodeCondition {
		return corev1.NodeCondition{Type: t, Status: s, Reason: reason, LastHeartbeatTime: now, LastTransitionTime: now}
	}
	want := []corev1.NodeCondition{
		cond(corev1.NodeReady, corev1.ConditionTrue, "KubeletReady"),
		cond(corev1.NodeMemoryPressure, corev1.ConditionFalse, "KubeletHasSufficientMemory"),
		cond(corev1.NodeDiskPressure, corev1.ConditionFalse, "KubeletHasNoDiskPressure"),
		cond(corev1.NodePIDPressure, corev1.ConditionFalse, "KubeletHasSufficientPID"),
	}
	for i, w := range want {
		for _, old := range obj.Status.Conditions {
			if old.Type == w.Type && old.Status == w.Status {
				want[i].LastTransitionTime = old.LastTransitionTime
			}
		}
	}
	obj.Status.Conditions = want
}

func kernelRelease() string {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return ""
	}
	return unix.ByteSliceToString(u.Release[:])
}

// heartbeat renews the node's Lease every 10 s and its status every 40 s,
// as a kubelet does, so a node lifecycle controller keeps it Ready.
func (n *Node) heartbeat() {
	defer n.cluster.wg.Done()
	ctx := n.cluster.ctx
	lastStatus := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Second):
		}
		if err := n.renewLease(ctx); err != nil && ctx.Err() == nil {
			n.cluster.log.Warn("node lease", "node", n.Name, "err", err)
		}
		if time.Since(lastStatus) >= 40*time.Second {
			if err := n.writeNodeStatus(ctx); err != nil && ctx.Err() == nil {
				n.cluster.log.Warn("node status", "node", n.Name, "err", err)
			}
			lastStatus = time.Now()
		}
	}
}

// renewLease creates or renews the node's Lease in kube-node-lease.
func (n *Node) renewLease(ctx context.Context) error {
	leases := n.cluster.ext.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	now := metav1.NewMicroTime(time.Now())
	l, err := leases.Get(ctx, n.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		dur := int32(40)
		holder := n.Name
		_, err = leases.Create(ctx, &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: n.Name, Namespace: corev1.NamespaceNodeLease},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: &holder, LeaseDurationSeconds: &dur, RenewTime: &now}}, metav1.CreateOptions{})
	case err == nil:
		l.Spec.RenewTime = &now
		_, err = leases.Update(ctx, l, metav1.UpdateOptions{})
	}
	return err
}

// forwardAPIServer listens on the API server's loopback address inside ns
// and forwards each connection to the API server in the simulator's
// network namespace. It dials nothing else.
func (n *Node) forwardAPIServer(ns *podnet.Netns) (stop func(), err error) {
	c := n.cluster
	addr := c.opts.External.APIServer
	var l net.Listener
	if err := ns.Do(func() (err error) {
		l, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		return nil, fmt.Errorf("API server forwarder in %s: %w", ns.Name, err)
	}
	unhook := context.AfterFunc(c.ctx, func() { l.Close() })
	c.onClose(func() error {
		unhook()
		if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			return err
		}
		return nil
	})
	// A pod's forwarder goes with the pod: its listener would keep the
	// pod's namespace (and its veth on the node) alive until the cluster
	// closes.
	stop = func() { unhook(); l.Close() }
	go func() {
		for {
			in, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer in.Close()
				var d net.Dialer
				out, err := d.DialContext(c.ctx, "tcp", addr) // the simulator's namespace: the real API server
				if err != nil {
					return
				}
				defer out.Close()
				done := make(chan struct{}, 2)
				go func() { _, _ = io.Copy(out, in); done <- struct{}{} }()
				go func() { _, _ = io.Copy(in, out); done <- struct{}{} }()
				select {
				case <-done:
				case <-c.ctx.Done():
				}
			}()
		}
	}()
	return stop, nil
}

// DialContext connects from inside the node's network namespace (the
// node's own addresses and routes: pods of every node, nothing else).
func (n *Node) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := n.Net.NS.Do(func() (err error) {
		var d net.Dialer
		conn, err = d.DialContext(ctx, network, addr)
		return err
	})
	return conn, err
}

// BPFFS is the node's bpffs directory on the machine (what its pods see
// at /sys/fs/bpf); "" in the embedded mode.
func (n *Node) BPFFS() string {
	if n.ext == nil {
		return ""
	}
	return n.ext.pinDir
}

// KubeletPort is the kubelet API's port in the Node's status.
const KubeletPort = 10250

// DialInPod connects from inside the network namespace of a pod running on
// this node (what a container runtime's port-forward does).
func (n *Node) DialInPod(ctx context.Context, namespace, pod, network, addr string) (net.Conn, error) {
	if n.ext == nil {
		return nil, errors.New("DialInPod: only in the external mode")
	}
	p, err := n.extPod(namespace, pod)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	ok := p.sandboxOK
	p.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("pod %s/%s has no network yet", namespace, pod)
	}
	return p.dialIn(ctx, network, addr)
}

// extPod finds a pod this node runs (external mode).
func (n *Node) extPod(namespace, pod string) (*extPod, error) {
	n.ext.mu.Lock()
	defer n.ext.mu.Unlock()
	for _, q := range n.ext.pods {
		if q.key == namespace+"/"+pod {
			return q, nil
		}
	}
	return nil, fmt.Errorf("%w: %s/%s on %s", errNoPod, namespace, pod, n.Name)
}

// InitPid is the pid of the node's init (its PID namespace's PID 1, named
// kubelet), in the simulator's PID namespace; 0 in the embedded mode.
func (n *Node) InitPid() int {
	if n.ext == nil || n.ext.init == nil {
		return 0
	}
	return n.ext.init.Pid
}

// CNICalls lists the chained CNI plugin calls the node's kubelet made
// ("ADD istio-cni ns/name"), in order.
func (n *Node) CNICalls() []string {
	n.ext.mu.Lock()
	defer n.ext.mu.Unlock()
	return append([]string(nil), n.ext.cni...)
}

// HostPath is where a path of the node's file system (a hostPath) lives
// on the machine: /sys/fs/bpf is the node's bpffs directory, /sys/fs/cgroup
// its cgroup, /var/run is /run, the rest is under <run>/<node>/host.
func (n *Node) HostPath(p string) string {
	if n.ext == nil {
		return ""
	}
	return n.ext.hostFile(p)
}

// hostFile maps a path of the node's file system to the machine's: under
// the node's host directory, with /var/run as /run (a symlink on a node).
func (x *extNode) hostFile(p string) string {
	p = filepath.Clean("/" + p)
	for prefix, dir := range map[string]string{"/sys/fs/bpf": x.pinDir, "/sys/fs/cgroup": x.cgroupDir} {
		if p == prefix || strings.HasPrefix(p, prefix+"/") {
			return filepath.Join(dir, strings.TrimPrefix(p, prefix))
		}
	}
	if p == "/var/run" || strings.HasPrefix(p, "/var/run/") {
		p = "/run" + strings.TrimPrefix(p, "/var/run")
	}
	return filepath.Join(x.hostDir, p)
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
