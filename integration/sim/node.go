package sim

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/cni/zds"
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

	cluster *Cluster
	v4, v6  netip.Prefix

	mu     sync.Mutex
	pods   map[string]*Pod // namespace/name
	nextIP int
}

// Daemon is a node's kmesh-daemon process.
type Daemon struct {
	node      *Node
	cmd       *exec.Cmd
	done      chan struct{}
	LogFile   string
	AdminAddr string
	StatsAddr string
	ReadyAddr string
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

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
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
	d := &Daemon{node: n, LogFile: filepath.Join(dir, "kmesh-daemon.log"), done: make(chan struct{})}
	for _, p := range []*string{&d.AdminAddr, &d.StatsAddr, &d.ReadyAddr} {
		a, err := freeAddr()
		if err != nil {
			return err
		}
		*p = a
	}
	logf, err := os.OpenFile(d.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(c.opts.DaemonBin)
	cmd.Env = append(os.Environ(),
		"XDS_ADDRESS="+c.cpAddr, "XDS_ROOT_CA="+c.root, "ALT_XDS_HOSTNAME=istiod.istio-system.svc", "KMESH_TOKEN_FILE="+token,
		"CLUSTER_ID="+ClusterID, "NODE_NAME="+n.Name, "POD_NAME=ztunnel-"+n.Name, "POD_NAMESPACE=istio-system",
		"INSTANCE_IP="+n.Net.Uplink4().String(),
		"KMESH_CGROUP_PATH="+n.Cgroup.Path, "KMESH_PIN_ROOT="+c.pinRootOf(n),
		"KMESH_ZDS_SOCKET="+filepath.Join(dir, "ztunnel.sock"),
		"KMESH_ADMIN_ADDR="+d.AdminAddr, "KMESH_STATS_ADDR="+d.StatsAddr, "KMESH_READINESS_ADDR="+d.ReadyAddr,
		"KMESH_LOG_LEVEL=info")
	cmd.Env = append(cmd.Env, c.opts.DaemonEnv...)
	if c.opts.NodeEnv != nil {
		cmd.Env = append(cmd.Env, c.opts.NodeEnv(n.Name)...)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	// The daemon dies with the simulator, whatever happens to it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting kmesh-daemon on %s: %w", n.Name, err)
	}
	d.cmd = cmd
	go func() {
		_ = cmd.Wait()
		close(d.done)
	}()
	n.mu.Lock()
	first := n.Daemon == nil
	n.Daemon = d
	n.mu.Unlock()
	if first {
		c.onClose(func() error {
			n.StopDaemon()
			// What an uninstall does: the simulator owns this data path.
			err := bpf.RemovePins(c.pinRootOf(n))
			_ = os.Remove(c.pinRootOf(n))
			return err
		})
	}
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
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.done
	}
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
	if old != nil {
		_ = old.cmd.Process.Signal(syscall.SIGTERM)
	}
	if err := n.StartDaemon(); err != nil {
		return err
	}
	if err := n.WaitReady(30 * time.Second); err != nil {
		return err
	}
	if old != nil {
		select {
		case <-old.done:
		case <-time.After(20 * time.Second):
			_ = old.cmd.Process.Kill()
			<-old.done
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
		_ = d.cmd.Process.Kill()
		<-d.done
	}
}

func (d *Daemon) waitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case <-d.done:
			return fmt.Errorf("kmesh-daemon exited: %s", d.tail())
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		resp, err := http.Get("http://" + d.ReadyAddr + "/healthz/ready")
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("kmesh-daemon not ready after %s: %s", timeout, d.tail())
}

// WaitReady waits for the node's (possibly restarted) daemon to be ready.
func (n *Node) WaitReady(timeout time.Duration) error {
	n.mu.Lock()
	d := n.Daemon
	n.mu.Unlock()
	return d.waitReady(context.Background(), timeout)
}

// tail returns the end of the daemon's log, for errors.
func (d *Daemon) tail() string {
	b, _ := os.ReadFile(d.LogFile)
	s := strings.TrimSpace(string(b))
	if i := len(s) - 2000; i > 0 {
		s = s[i:]
	}
	return s
}

// Log returns the daemon's log so far.
func (d *Daemon) Log() string {
	b, _ := os.ReadFile(d.LogFile)
	return string(b)
}

// Metrics returns the daemon's Prometheus text.
func (d *Daemon) Metrics() (string, error) {
	resp, err := http.Get("http://" + d.StatsAddr + "/metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
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

// Pid is the daemon's process id.
func (d *Daemon) Pid() int { return d.cmd.Process.Pid }

// ConfigDump returns the daemon's /config_dump (its view of the mesh).
func (d *Daemon) ConfigDump() string {
	resp, err := http.Get("http://" + d.AdminAddr + "/config_dump")
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}
