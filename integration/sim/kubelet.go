package sim

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"kmesh.dev/kmesh/integration/podnet"
)

// Pod is a running simulated pod.
type Pod struct {
	Namespace, Name, UID string
	Node                 *Node
	Net                  *podnet.Pod
	Cgroup               *podnet.Cgroup
	ServiceAccount       string

	mu       sync.Mutex
	procs    []*exec.Cmd
	enrolled bool
}

// Key is "namespace/name".
func (p *Pod) Key() string { return p.Namespace + "/" + p.Name }

// IPs returns the pod's addresses, IPv4 first.
func (p *Pod) IPs() []netip.Addr {
	var out []netip.Addr
	for _, a := range []netip.Addr{p.Net.IPv4, p.Net.IPv6} {
		if a.IsValid() {
			out = append(out, a)
		}
	}
	return out
}

// Helper runs a registered helper (integration/podnet) as a process of the
// pod, as `kubectl exec` would, and decodes its JSON result into out.
func (p *Pod) Helper(out any, name string, args ...string) error {
	return p.Net.Helper(p.Cgroup, out, name, args...)
}

// kubeClient returns the current API client and a channel closed when the
// control plane is replaced (so watchers restart against the new one).
func (c *Cluster) kubeClient() (kubernetes.Interface, <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.CP == nil {
		return nil, nil
	}
	return c.CP.Kube().Kube(), c.CP.Done()
}

// watch runs an informer for every control plane the cluster has, until
// the cluster closes.
func (c *Cluster) watch(setup func(informers.SharedInformerFactory, kubernetes.Interface)) {
	for c.ctx.Err() == nil {
		client, gone := c.kubeClient()
		if client == nil {
			select {
			case <-c.ctx.Done():
				return
			case <-time.After(20 * time.Millisecond):
			}
			continue
		}
		f := informers.NewSharedInformerFactory(client, 0)
		setup(f, client)
		stop := make(chan struct{})
		f.Start(stop)
		select {
		case <-c.ctx.Done():
		case <-gone:
		}
		close(stop)
		f.Shutdown()
	}
}

// kubelet manages the pods bound to this node.
func (n *Node) kubelet() {
	defer n.cluster.wg.Done()
	n.cluster.watch(func(f informers.SharedInformerFactory, client kubernetes.Interface) {
		inf := f.Core().V1().Pods().Informer()
		_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    func(o any) { n.onPod(client, o.(*corev1.Pod)) },
			UpdateFunc: func(_, o any) { n.onPod(client, o.(*corev1.Pod)) },
			DeleteFunc: func(o any) {
				if t, ok := o.(cache.DeletedFinalStateUnknown); ok {
					o = t.Obj
				}
				if p, ok := o.(*corev1.Pod); ok && p.Spec.NodeName == n.Name {
					n.removePod(p.Namespace + "/" + p.Name)
				}
			},
		})
		// After the initial list, pods this node runs that the API server no
		// longer has (it was replaced meanwhile) are deleted, as a kubelet does.
		go func() {
			if !cache.WaitForCacheSync(n.cluster.ctx.Done(), inf.HasSynced) {
				return
			}
			known := map[string]bool{}
			for _, o := range inf.GetStore().List() {
				p := o.(*corev1.Pod)
				known[p.Namespace+"/"+p.Name] = true
			}
			for _, p := range n.Pods() {
				if !known[p.Key()] {
					n.removePod(p.Key())
				}
			}
		}()
	})
}

func (n *Node) onPod(client kubernetes.Interface, pod *corev1.Pod) {
	// Host-network pods (the node proxy's own, whose token the daemon
	// holds) are the node itself: nothing to create.
	if pod.Spec.NodeName != n.Name || pod.Spec.HostNetwork {
		return
	}
	key := pod.Namespace + "/" + pod.Name
	if pod.DeletionTimestamp != nil {
		n.removePod(key)
		return
	}
	if pod.Spec.ServiceAccountName == "" {
		// What the API server's ServiceAccount admission does; the fake one
		// does not, and Istio's CA matches pods by service account.
		pod = pod.DeepCopy()
		pod.Spec.ServiceAccountName = "default"
		if _, err := client.CoreV1().Pods(pod.Namespace).Update(context.Background(), pod, metav1.UpdateOptions{}); err != nil {
			n.cluster.log.Error("defaulting the service account", "pod", key, "err", err)
		}
		return // the update comes back as an event
	}
	n.mu.Lock()
	p := n.pods[key]
	n.mu.Unlock()
	if p == nil {
		var err error
		if p, err = n.createPod(client, pod); err != nil {
			n.cluster.log.Error("creating pod", "pod", key, "node", n.Name, "err", err)
			return
		}
	}
	n.cluster.syncEnrolment(client, n, p, pod)
}

func (n *Node) createPod(client kubernetes.Interface, pod *corev1.Pod) (*Pod, error) {
	key := pod.Namespace + "/" + pod.Name
	v4, v6 := netip.Addr{}, netip.Addr{}
	// A pod that already has addresses (the API server was replaced while it
	// ran) keeps them; a new one gets the node's next ones.
	for _, ip := range pod.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			if a.Is4() && n.v4.Contains(a) {
				v4 = a
			} else if a.Is6() && n.v6.Contains(a) {
				v6 = a
			}
		}
	}
	if !v4.IsValid() {
		v4, v6 = n.allocIPs()
	}
	np, err := n.Net.AddPod(pod.Name, v4, v6)
	if err != nil {
		return nil, err
	}
	uid := string(pod.UID)
	if uid == "" {
		uid = key // the in-memory API server does not assign UIDs
	}
	cg, err := n.Cgroup.Child("pod-" + strings.NewReplacer("/", "-", ".", "-").Replace(key))
	if err != nil {
		_ = n.Net.RemovePod(np)
		return nil, err
	}
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	p := &Pod{Namespace: pod.Namespace, Name: pod.Name, UID: uid, Node: n, Net: np, Cgroup: cg, ServiceAccount: sa}
	for _, ctr := range pod.Spec.Containers {
		if err := n.startContainer(p, ctr); err != nil {
			p.stop()
			return nil, fmt.Errorf("container %s: %w", ctr.Name, err)
		}
	}
	n.mu.Lock()
	n.pods[key] = p
	n.mu.Unlock()

	st := pod.DeepCopy()
	st.Status.Phase = corev1.PodRunning
	st.Status.HostIP = n.Net.Uplink4().String()
	st.Status.PodIPs = nil
	for _, a := range p.IPs() {
		st.Status.PodIPs = append(st.Status.PodIPs, corev1.PodIP{IP: a.String()})
	}
	st.Status.PodIP = st.Status.PodIPs[0].IP
	now := metav1.Now()
	st.Status.Conditions = []corev1.PodCondition{
		{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
		{Type: corev1.ContainersReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
	}
	if _, err := client.CoreV1().Pods(pod.Namespace).UpdateStatus(context.Background(), st, metav1.UpdateOptions{}); err != nil {
		n.cluster.log.Warn("writing pod status", "pod", key, "err", err)
	}
	return p, nil
}

// startContainer runs a container's command inside the pod: a built-in
// app (registered podnet helper) re-executed from AppBin, or a program
// from PATH (iperf3, sockperf, fortio).
func (n *Node) startContainer(p *Pod, ctr corev1.Container) error {
	argv := append(append([]string{}, ctr.Command...), ctr.Args...)
	if len(argv) == 0 {
		argv = []string{"sleep"} // a pod that only exists (clients exec into it)
	}
	var cmd *exec.Cmd
	if podnet.HasHelper(argv[0]) {
		cmd = exec.Command(n.cluster.opts.AppBin, argv[1:]...)
		cmd.Env = append(os.Environ(), podnet.HelperEnv(argv[0]))
	} else {
		path, err := exec.LookPath(argv[0])
		if err != nil {
			return fmt.Errorf("%s: %w", argv[0], err)
		}
		cmd = exec.Command(path, argv[1:]...)
		cmd.Env = os.Environ()
	}
	cmd.Env = append(cmd.Env, podnet.PodHostnameEnv+"="+p.Name, "POD_NAME="+p.Name, "POD_NAMESPACE="+p.Namespace, "POD_IP="+p.IPs()[0].String(),
		"NODE_NAME="+n.Name, "SERVICE_ACCOUNT="+p.ServiceAccount)
	for _, e := range ctr.Env {
		cmd.Env = append(cmd.Env, e.Name+"="+e.Value)
	}
	logf, err := os.OpenFile(filepath.Join(n.cluster.RunDir, n.Name, strings.ReplaceAll(p.Key(), "/", "_")+"_"+ctr.Name+".log"),
		os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	// A UTS namespace of its own: the pod's hostname is its name, which is
	// what echo servers report.
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWUTS}
	if err := p.Net.Start(cmd, p.Cgroup); err != nil {
		return err
	}
	go func() { _ = cmd.Wait() }()
	p.mu.Lock()
	p.procs = append(p.procs, cmd)
	p.mu.Unlock()
	return nil
}

// stop kills the pod's processes and removes its cgroup and namespace.
func (p *Pod) stop() {
	p.mu.Lock()
	procs := p.procs
	p.procs = nil
	p.mu.Unlock()
	for _, c := range procs {
		_ = c.Process.Kill()
	}
	_ = p.Cgroup.Remove()
	_ = p.Node.Net.RemovePod(p.Net)
}

func (n *Node) removePod(key string) {
	n.mu.Lock()
	p := n.pods[key]
	delete(n.pods, key)
	n.mu.Unlock()
	if p == nil {
		return
	}
	if p.enrolled {
		if err := n.ZDS.DelPod(context.Background(), p.UID); err != nil {
			n.cluster.log.Warn("unenrolling pod", "pod", key, "err", err)
		}
	}
	p.stop()
}

// Pods returns the pods running on the node.
func (n *Node) Pods() []*Pod {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make([]*Pod, 0, len(n.pods))
	for _, p := range n.pods {
		out = append(out, p)
	}
	return out
}

func (n *Node) stopPods() error {
	for _, p := range n.Pods() {
		n.removePod(p.Key())
	}
	return nil
}

// Pod finds a running pod by namespace and name on any node.
func (c *Cluster) Pod(namespace, name string) (*Pod, error) {
	for _, n := range c.Nodes {
		n.mu.Lock()
		p := n.pods[namespace+"/"+name]
		n.mu.Unlock()
		if p != nil {
			return p, nil
		}
	}
	return nil, fmt.Errorf("%w: %s/%s", errNoPod, namespace, name)
}

// WaitPod waits until a pod runs (and, when ambient, is enrolled).
func (c *Cluster) WaitPod(namespace, name string, timeout time.Duration) (*Pod, error) {
	deadline := time.Now().Add(timeout)
	for {
		p, err := c.Pod(namespace, name)
		if err == nil {
			return p, nil
		}
		if time.Now().After(deadline) {
			return nil, err
		}
		if c.ctx.Err() != nil {
			return nil, errors.New("cluster closed")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Start runs an extra process in the pod (like `kubectl exec` of a
// long-running command): in its network namespace and cgroup.
func (p *Pod) Start(cmd *exec.Cmd) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	if err := p.Net.Start(cmd, p.Cgroup); err != nil {
		return err
	}
	p.mu.Lock()
	p.procs = append(p.procs, cmd)
	p.mu.Unlock()
	return nil
}

// Pids lists the pod's processes (containers and extra ones).
func (p *Pod) Pids() []int {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]int, 0, len(p.procs))
	for _, c := range p.procs {
		out = append(out, c.Process.Pid)
	}
	return out
}

// RouteToNode adds a route for dst through the pod's node (a VIP that an
// in-pod iptables rule rewrites still needs a route for the first lookup).
func (p *Pod) RouteToNode(dst netip.Prefix) error { return p.Node.Net.RouteVia(p.Net, dst) }
