package sim

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/cni/zds"
	"kmesh.dev/kmesh/integration/daemonproc"
	"kmesh.dev/kmesh/integration/podnet"
)

// Node is one simulated node.
type Node struct {
	Name  string
	Index int
	Net   *podnet.Node
	// Cgroup plays the node's root cgroup: the daemon attaches there, pods
	// live in children.
	Cgroup *podnet.Cgroup
	ZDS    *zds.Server
	Daemon *Daemon
	// Holder is the listener holder beside the daemon (kmesh-daemon hold),
	// as the DaemonSet pod's second container: it survives a crash of the
	// daemon; an upgrade (a new pod) brings a new one. nil with
	// Options.NoListenerHolder.
	Holder     *daemonproc.Daemon
	holderSock string
	holderGen  int

	cluster *Cluster
	v4, v6  netip.Prefix
	ext     *extNode // External mode's kubelet

	mu     sync.Mutex
	pods   map[string]*Pod // namespace/name
	nextIP int
}

// Daemon is a node's kmesh-daemon process (integration/daemonproc).
type Daemon struct {
	*daemonproc.Daemon
	node *Node
}

func (c *Cluster) addNode(idx int) (*Node, error) {
	name := fmt.Sprintf("node-%d", idx)
	n := &Node{Name: name, Index: idx, cluster: c, pods: map[string]*Pod{}, nextIP: 10}
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
	dir := filepath.Join(c.RunDir, name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if n.ZDS, err = zds.Listen(filepath.Join(dir, "ztunnel.sock"), c.log); err != nil {
		return nil, err
	}
	c.onClose(n.ZDS.Close)
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		n.ZDS.Run(c.ctx)
	}()
	if _, err := c.Kube().CoreV1().Nodes().Create(context.Background(), c.nodeObject(n), metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("creating Node %s: %w", name, err)
	}
	if err := n.StartDaemon(); err != nil {
		return nil, err
	}
	c.onClose(n.stopPods)
	c.wg.Add(1)
	go n.kubelet()
	return n, nil
}

// StartDaemon starts the node's kmesh-daemon (again, after StopDaemon).
func (n *Node) StartDaemon() error {
	c := n.cluster
	dir := filepath.Join(c.RunDir, n.Name)
	// A token bound to the node proxy's pod (istio-system/ztunnel-<node>):
	// what the CA checks before it signs certificates for this node's pods.
	// Tokens stay valid across control-plane restarts (same PKI): while
	// istiod is down, a restarted daemon keeps the one it had.
	token := filepath.Join(dir, "istio-token")
	c.mu.Lock()
	cp := c.CP
	c.mu.Unlock()
	if cp != nil {
		tok, err := cp.NodeToken(context.Background(), n.Name)
		if err != nil {
			return fmt.Errorf("node %s: token for the CA: %w", n.Name, err)
		}
		if err := os.WriteFile(token, []byte(tok), 0o600); err != nil {
			return err
		}
	}
	resolv, err := c.writeResolvConf()
	if err != nil {
		return err
	}
	env := []string{
		"KMESH_DNS_RESOLV_CONF=" + resolv,
		"XDS_ADDRESS=" + c.cpAddr, "XDS_ROOT_CA=" + c.root, "ALT_XDS_HOSTNAME=istiod.istio-system.svc", "KMESH_TOKEN_FILE=" + token,
		"CLUSTER_ID=" + ClusterID, "NODE_NAME=" + n.Name, "POD_NAME=ztunnel-" + n.Name, "POD_NAMESPACE=istio-system",
		"INSTANCE_IP=" + n.Net.Uplink4().String(),
		"KMESH_CGROUP_PATH=" + n.Cgroup.Path, "KMESH_PIN_ROOT=" + c.pinRootOf(n),
		"KMESH_ZDS_SOCKET=" + filepath.Join(dir, "ztunnel.sock"),
		"KMESH_LOG_LEVEL=info"}
	if !c.opts.NoListenerHolder {
		sock, err := n.ensureHolder()
		if err != nil {
			return err
		}
		env = append(env, "KMESH_LISTENER_HOLDER="+sock)
	}
	env = append(env, c.opts.DaemonEnv...)
	if c.opts.NodeEnv != nil {
		env = append(env, c.opts.NodeEnv(n.Name)...)
	}
	// The daemon dies with the simulator, whatever happens to it.
	bin := c.opts.DaemonBin
	if c.opts.NodeDaemonBin != nil {
		if b := c.opts.NodeDaemonBin(n.Name); b != "" {
			bin = b
		}
	}
	p, err := daemonproc.Start(bin, filepath.Join(dir, "kmesh-daemon.log"), env)
	if err != nil {
		return fmt.Errorf("node %s: %w", n.Name, err)
	}
	d := &Daemon{Daemon: p, node: n}
	n.mu.Lock()
	first := n.Daemon == nil
	n.Daemon = d
	n.mu.Unlock()
	if first {
		c.onClose(func() error {
			n.StopDaemon()
			n.stopHolder(n.takeHolder())
			// What an uninstall does: the simulator owns this data path.
			err := bpf.RemovePins(c.pinRootOf(n))
			_ = os.Remove(c.pinRootOf(n))
			return err
		})
	}
	return nil
}

// ensureHolder starts the node's listener holder unless one runs, as the
// kubelet runs the DaemonSet pod's holder container, and returns its
// socket. Each generation (pod) has its own socket: in Kubernetes it
// lives in the pod's emptyDir.
func (n *Node) ensureHolder() (string, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.Holder != nil {
		select {
		case <-n.Holder.Done(): // it died: the kubelet restarts it
		default:
			return n.holderSock, nil
		}
	}
	n.holderGen++
	dir := filepath.Join(n.cluster.RunDir, n.Name)
	sock := filepath.Join(dir, fmt.Sprintf("holder-%d.sock", n.holderGen))
	h, err := daemonproc.Start(n.cluster.opts.DaemonBin, filepath.Join(dir, fmt.Sprintf("holder-%d.log", n.holderGen)),
		[]string{"KMESH_LISTENER_HOLDER=" + sock, "KMESH_LOG_LEVEL=info"}, "hold")
	if err != nil {
		return "", fmt.Errorf("node %s: listener holder: %w", n.Name, err)
	}
	// The daemon connects at start: wait for the socket.
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case <-h.Done():
			return "", fmt.Errorf("node %s: listener holder exited: %s", n.Name, h.Tail())
		default:
		}
		if time.Now().After(end) {
			h.Kill()
			return "", fmt.Errorf("node %s: listener holder did not listen within 10s: %s", n.Name, h.Tail())
		}
	}
	n.Holder, n.holderSock = h, sock
	return sock, nil
}

// takeHolder detaches the node's holder (the pod it belongs to goes).
func (n *Node) takeHolder() *daemonproc.Daemon {
	n.mu.Lock()
	defer n.mu.Unlock()
	h := n.Holder
	n.Holder, n.holderSock = nil, ""
	return h
}

func (n *Node) stopHolder(h *daemonproc.Daemon) {
	if h != nil {
		h.Stop(5 * time.Second)
	}
}

// KillHolder kills the node's listener holder without warning; the next
// StartDaemon (or RestartHolder) starts a new one.
func (n *Node) KillHolder() {
	n.mu.Lock()
	h := n.Holder
	n.mu.Unlock()
	if h != nil {
		h.Kill()
	}
}

// RestartHolder starts the node's listener holder again after it died,
// at the same socket (the kubelet restarting the container in the same
// pod), so the running daemon reconnects to it.
func (n *Node) RestartHolder() error {
	n.mu.Lock()
	h, sock := n.Holder, n.holderSock
	n.mu.Unlock()
	if h == nil {
		return errors.New("no listener holder")
	}
	<-h.Done()
	dir := filepath.Join(n.cluster.RunDir, n.Name)
	nh, err := daemonproc.Start(n.cluster.opts.DaemonBin, filepath.Join(dir, fmt.Sprintf("holder-%d.log", n.holderGen)),
		[]string{"KMESH_LISTENER_HOLDER=" + sock, "KMESH_LOG_LEVEL=info"}, "hold")
	if err != nil {
		return err
	}
	n.mu.Lock()
	n.Holder = nh
	n.mu.Unlock()
	return nil
}

// StopDaemon stops the node's daemon as Kubernetes stops a pod: SIGTERM,
// then SIGKILL after a grace period. The kernel data path stays.
func (n *Node) StopDaemon() {
	n.mu.Lock()
	d := n.Daemon
	n.mu.Unlock()
	if d == nil {
		return
	}
	d.Stop(10 * time.Second)
}

// UpgradeDaemon replaces the node's daemon as a rolling upgrade does: the
// old one is told to stop (it stops following the control plane at once
// and keeps accepting tunnel connections for the handover), the new one
// starts beside it and takes over the kernel state and the pods'
// listeners; the old one drains its connections and exits.
func (n *Node) UpgradeDaemon() error {
	n.mu.Lock()
	old := n.Daemon
	n.mu.Unlock()
	// The old pod's holder goes with the old pod: the new pod has its own.
	oldHolder := n.takeHolder()
	defer n.stopHolder(oldHolder)
	if old != nil {
		_ = old.Signal(syscall.SIGTERM)
	}
	if err := n.StartDaemon(); err != nil {
		return err
	}
	if err := n.WaitReady(30 * time.Second); err != nil {
		return err
	}
	if old != nil {
		select {
		case <-old.Done():
		case <-time.After(20 * time.Second):
			old.Kill()
			return errors.New("the old daemon did not exit within 20s of SIGTERM")
		}
	}
	return nil
}

// KillDaemon kills the node's daemon without warning (a crash).
func (n *Node) KillDaemon() {
	n.mu.Lock()
	d := n.Daemon
	n.mu.Unlock()
	if d != nil {
		d.Kill()
	}
}

// WaitReady waits for the node's (possibly restarted) daemon to be ready.
func (n *Node) WaitReady(timeout time.Duration) error {
	n.mu.Lock()
	d := n.Daemon
	n.mu.Unlock()
	return d.WaitReady(context.Background(), timeout)
}

func (n *Node) allocIPs() (netip.Addr, netip.Addr) {
	n.mu.Lock()
	defer n.mu.Unlock()
	host := n.nextIP
	n.nextIP++
	at := func(p netip.Prefix) netip.Addr {
		if !p.IsValid() {
			return netip.Addr{}
		}
		a := p.Masked().Addr()
		for i := 0; i < host; i++ {
			a = a.Next()
		}
		return a
	}
	return at(n.v4), at(n.v6)
}

var errNoPod = errors.New("no such pod")
