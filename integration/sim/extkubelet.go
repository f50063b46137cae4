package sim

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"

	"kmesh.dev/kmesh/integration/podnet"
)

// The external mode's kubelet: every pod whose spec.nodeName is the node
// runs here. A pod's life: sandbox (cgroup pod<uid>, network namespace with
// the node's CNI chain, or the node's namespace for hostNetwork), volumes,
// init containers in order, then every container under a supervisor that
// restarts it with back-off; probes drive Ready; status is written after
// each change. On deletionTimestamp: preStop, SIGTERM, the grace period,
// SIGKILL, CNI DEL, the sandbox removed, then the pod deleted with grace 0.

// extPod is one pod run by an external-mode kubelet.
type extPod struct {
	n        *Node
	uid      types.UID
	key      string // namespace/name
	dir      string // <run>/<node>/pods/<uid>
	cgroup   *podnet.Cgroup
	hostNet  bool
	net      *podnet.Pod   // nil for hostNetwork pods
	stopAPI  func()        // closes the pod's API server forwarder
	netns    *podnet.Netns // the pod's, or the node's
	pin      string        // netns pin (host path), "" for hostNetwork
	pinName  string
	cni      []cniAdded // chained plugins added, in order
	cniRes   json.RawMessage
	podIP    netip.Addr
	ctx      context.Context
	cancel   context.CancelFunc
	done     chan struct{} // closed when torn down
	dirty    chan struct{}
	mounts   map[string]volumeSource // by volume name
	started  time.Time
	initDone bool

	mu        sync.Mutex
	pod       *corev1.Pod
	ctrs      []*extContainer
	deleting  bool
	sandboxOK bool
	lastErr   string
}

// extContainer is one container of a pod and its current process.
type extContainer struct {
	spec     corev1.Container
	init     bool
	id       string
	cgroup   *podnet.Cgroup
	proc     *os.Process
	exited   chan struct{}
	restarts int32
	running  bool
	started  metav1.Time
	ready    bool
	last     *corev1.ContainerStateTerminated
	waiting  string // reason while not running
	message  string
	probeOK  int
	probeBad int
}

func newContainerID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// extKubelet watches the node's pods.
func (n *Node) extKubelet() {
	defer n.cluster.wg.Done()
	c := n.cluster
	f := informers.NewSharedInformerFactoryWithOptions(c.ext, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", n.Name).String()
	}))
	inf := f.Core().V1().Pods().Informer()
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { n.onExtPod(o.(*corev1.Pod)) },
		UpdateFunc: func(_, o any) { n.onExtPod(o.(*corev1.Pod)) },
		DeleteFunc: func(o any) {
			if t, ok := o.(cache.DeletedFinalStateUnknown); ok {
				o = t.Obj
			}
			if pod, ok := o.(*corev1.Pod); ok {
				n.onExtPodGone(pod.UID)
			}
		},
	})
	stop := make(chan struct{})
	f.Start(stop)
	<-c.ctx.Done()
	close(stop)
	f.Shutdown()
}

func (n *Node) onExtPod(pod *corev1.Pod) {
	if pod.Spec.NodeName != n.Name {
		return
	}
	x := n.ext
	x.mu.Lock()
	p := x.pods[pod.UID]
	if p == nil {
		if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
			x.mu.Unlock()
			return
		}
		if pod.DeletionTimestamp != nil {
			x.mu.Unlock()
			// Never started here: nothing to stop.
			n.finalDelete(pod)
			return
		}
		ctx, cancel := context.WithCancel(n.cluster.ctx)
		p = &extPod{n: n, uid: pod.UID, key: pod.Namespace + "/" + pod.Name, pod: pod.DeepCopy(), ctx: ctx, cancel: cancel,
			done: make(chan struct{}), dirty: make(chan struct{}, 1), hostNet: pod.Spec.HostNetwork,
			dir: filepath.Join(n.cluster.RunDir, n.Name, "pods", string(pod.UID))}
		x.pods[pod.UID] = p
		x.mu.Unlock()
		n.cluster.wg.Add(1)
		go p.run()
		return
	}
	x.mu.Unlock()
	p.mu.Lock()
	p.pod = pod.DeepCopy()
	del := pod.DeletionTimestamp != nil && !p.deleting
	if del {
		p.deleting = true
	}
	p.mu.Unlock()
	if del {
		p.cancel() // stops start-up, probes and restarts; run() terminates
	}
}

// onExtPodGone: the object is gone (deleted with grace 0 elsewhere, or by
// us): stop whatever still runs.
func (n *Node) onExtPodGone(uid types.UID) {
	n.ext.mu.Lock()
	p := n.ext.pods[uid]
	n.ext.mu.Unlock()
	if p == nil {
		return
	}
	p.mu.Lock()
	p.deleting = true
	p.mu.Unlock()
	p.cancel()
}

func (n *Node) finalDelete(pod *corev1.Pod) {
	zero := int64(0)
	uid := pod.UID
	err := n.cluster.ext.CoreV1().Pods(pod.Namespace).Delete(context.Background(), pod.Name,
		metav1.DeleteOptions{GracePeriodSeconds: &zero, Preconditions: &metav1.Preconditions{UID: &uid}})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		n.cluster.log.Warn("deleting pod", "pod", pod.Namespace+"/"+pod.Name, "err", err)
	}
}

// stopExternalPods tears every pod down (the cluster closes): processes,
// CNI DEL, sandboxes. Pod objects stay (the API server is not ours).
func (n *Node) stopExternalPods() error {
	n.ext.mu.Lock()
	pods := make([]*extPod, 0, len(n.ext.pods))
	for _, p := range n.ext.pods {
		pods = append(pods, p)
	}
	n.ext.mu.Unlock()
	for _, p := range pods {
		p.cancel()
	}
	for _, p := range pods {
		<-p.done
	}
	return nil
}

// ExtPods lists the keys (namespace/name) of the pods the node runs.
func (n *Node) ExtPods() []string {
	n.ext.mu.Lock()
	defer n.ext.mu.Unlock()
	var out []string
	for _, p := range n.ext.pods {
		out = append(out, p.key)
	}
	slices.Sort(out)
	return out
}

func (p *extPod) logf(msg string, args ...any) {
	p.n.cluster.log.Info(msg, append([]any{"node", p.n.Name, "pod", p.key}, args...)...)
}

func (p *extPod) markDirty() {
	select {
	case p.dirty <- struct{}{}:
	default:
	}
}

func (p *extPod) setErr(err error) {
	p.mu.Lock()
	p.lastErr = err.Error()
	p.mu.Unlock()
	p.markDirty()
	p.n.cluster.log.Warn("pod", "node", p.n.Name, "pod", p.key, "err", err)
}

// backoff waits d (or until the pod stops) and returns the next delay.
func (p *extPod) backoff(d time.Duration) (time.Duration, bool) {
	select {
	case <-p.ctx.Done():
		return d, false
	case <-time.After(d):
	}
	return min(2*d, maxBackoff), true
}

// Restart back-off: a kubelet uses 10 s doubling to 5 min; the simulator
// starts lower so that tests see restarts within seconds.
const (
	firstBackoff = time.Second
	maxBackoff   = 30 * time.Second
)

func (p *extPod) run() {
	defer p.n.cluster.wg.Done()
	defer close(p.done)
	statusDone := make(chan struct{})
	go func() { defer close(statusDone); p.statusLoop() }()
	p.started = time.Now()
	p.markDirty()
	if err := p.start(); err != nil && p.ctx.Err() == nil {
		p.setErr(err)
	}
	<-p.ctx.Done()
	p.terminate()
	<-statusDone
	p.teardown()
	p.n.ext.mu.Lock()
	delete(p.n.ext.pods, p.uid)
	p.n.ext.mu.Unlock()
	p.mu.Lock()
	deleting, pod := p.deleting, p.pod
	p.mu.Unlock()
	if deleting {
		p.n.finalDelete(pod)
	}
}

// start makes the sandbox and volumes (retrying with back-off, as a
// kubelet does when a CNI plugin or a ConfigMap is not there yet), runs the
// init containers and starts the containers.
func (p *extPod) start() error {
	if err := os.MkdirAll(p.dir, 0o700); err != nil {
		return err
	}
	var err error
	if p.cgroup, err = p.n.Cgroup.Child("pod" + string(p.uid)); err != nil {
		return err
	}
	for d := firstBackoff; ; {
		err := p.sandbox()
		if err == nil {
			break
		}
		p.setErr(fmt.Errorf("sandbox: %w", err))
		var ok bool
		if d, ok = p.backoff(d); !ok {
			return nil
		}
	}
	p.mu.Lock()
	p.sandboxOK = true
	pod := p.pod
	p.mu.Unlock()
	p.markDirty()
	for d := firstBackoff; ; {
		err := p.prepareVolumes(pod)
		if err == nil {
			break
		}
		p.setErr(fmt.Errorf("volumes: %w", err))
		var ok bool
		if d, ok = p.backoff(d); !ok {
			return nil
		}
	}
	for _, ic := range pod.Spec.InitContainers {
		ec := &extContainer{spec: ic, init: true, waiting: "PodInitializing"}
		p.mu.Lock()
		p.ctrs = append(p.ctrs, ec)
		p.mu.Unlock()
		for d := firstBackoff; ; {
			code, err := p.runOnce(ec)
			if err == nil && code == 0 {
				break
			}
			if err != nil {
				p.setErr(fmt.Errorf("init container %s: %w", ic.Name, err))
			}
			var ok bool
			if d, ok = p.backoff(d); !ok {
				return nil
			}
		}
	}
	p.mu.Lock()
	p.initDone = true
	p.mu.Unlock()
	for _, ctr := range pod.Spec.Containers {
		ec := &extContainer{spec: ctr, waiting: "ContainerCreating"}
		p.mu.Lock()
		p.ctrs = append(p.ctrs, ec)
		p.mu.Unlock()
		go p.supervise(ec)
	}
	p.markDirty()
	return nil
}

// sandbox creates the pod's network: a namespace with addresses and routes
// (the primary plugin, the kubelet's own), pinned under the node's
// /var/run/netns, then the chained plugins of the node's CNI config.
func (p *extPod) sandbox() error {
	n := p.n
	if p.hostNet {
		p.netns = n.Net.NS
		p.podIP = n.Net.Uplink4()
		return nil
	}
	if p.net == nil {
		p.mu.Lock()
		pod := p.pod
		p.mu.Unlock()
		v4, v6 := n.allocIPs()
		np, err := n.Net.AddPod(pod.Name, v4, v6)
		if err != nil {
			return err
		}
		p.net, p.netns, p.podIP = np, np.NS, v4
		if cidr := n.cluster.opts.External.ServiceCIDR; cidr.IsValid() {
			if err := n.Net.RouteVia(np, cidr); err != nil {
				return fmt.Errorf("route to the service range: %w", err)
			}
		}
		p.pinName = "cni-" + string(p.uid)
		p.pin = filepath.Join(n.ext.netnsDir, p.pinName)
		if err := pinNetns(np.NS, p.pin); err != nil {
			return err
		}
		if p.stopAPI, err = n.forwardAPIServer(np.NS); err != nil {
			return err
		}
	}
	return p.cniAdd()
}

func pinNetns(ns *podnet.Netns, path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o444)
	if err != nil {
		return err
	}
	f.Close()
	src := fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), ns.Fd())
	if err := syscall.Mount(src, path, "", syscall.MS_BIND, ""); err != nil {
		_ = os.Remove(path)
		return fmt.Errorf("pinning the network namespace: %w", err)
	}
	return nil
}

// supervise runs a container and restarts it when it exits (restartPolicy
// Always; OnFailure only after a failure; Never not at all).
func (p *extPod) supervise(ec *extContainer) {
	probeDone := make(chan struct{}, 2)
	go func() { p.probeLoop(ec); probeDone <- struct{}{} }()
	go func() { p.livenessLoop(ec); probeDone <- struct{}{} }()
	defer func() { <-probeDone; <-probeDone }()
	d := firstBackoff
	for p.ctx.Err() == nil {
		code, err := p.runOnce(ec)
		if err != nil {
			p.setErr(fmt.Errorf("container %s: %w", ec.spec.Name, err))
		}
		if p.ctx.Err() != nil {
			return
		}
		if code == notStarted {
			// Not created (a missing ConfigMap, an unknown image): retried,
			// not a restart.
			var ok bool
			if d, ok = p.backoff(d); !ok {
				return
			}
			continue
		}
		p.mu.Lock()
		policy := p.pod.Spec.RestartPolicy
		p.mu.Unlock()
		if policy == corev1.RestartPolicyNever || policy == corev1.RestartPolicyOnFailure && code == 0 && err == nil {
			return
		}
		p.mu.Lock()
		ec.waiting, ec.message = "CrashLoopBackOff", fmt.Sprintf("back-off %s restarting failed container %s", d, ec.spec.Name)
		p.mu.Unlock()
		p.markDirty()
		var ok bool
		if d, ok = p.backoff(d); !ok {
			return
		}
		p.mu.Lock()
		ec.restarts++
		p.mu.Unlock()
	}
}

// notStarted is runOnce's code for a container that could not be created.
const notStarted = -2

// runOnce starts the container and waits for it to exit.
func (p *extPod) runOnce(ec *extContainer) (int, error) {
	cmd, err := p.startContainer(ec)
	if err != nil {
		p.mu.Lock()
		ec.waiting, ec.message = "CreateContainerConfigError", err.Error()
		p.mu.Unlock()
		p.markDirty()
		return notStarted, err
	}
	p.markDirty()
	err = cmd.Wait()
	code := 0
	if cmd.ProcessState != nil {
		code = cmd.ProcessState.ExitCode()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			code = 128 + int(ws.Signal())
		}
	}
	now := metav1.Now()
	p.mu.Lock()
	reason := "Completed"
	if code != 0 {
		reason = "Error"
	}
	ec.last = &corev1.ContainerStateTerminated{ExitCode: int32(code), Reason: reason, StartedAt: ec.started, FinishedAt: now, ContainerID: "kmesh-sim://" + ec.id}
	ec.running, ec.ready, ec.proc = false, false, nil
	ec.probeOK, ec.probeBad = 0, 0
	close(ec.exited)
	cg := ec.cgroup
	p.mu.Unlock()
	if cg != nil {
		_ = cg.Remove()
	}
	p.markDirty()
	if err != nil && code == 0 {
		return -1, err
	}
	return code, nil
}

func execHelper(bin, name string) *exec.Cmd {
	cmd := exec.Command(bin)
	cmd.Env = []string{podnet.HelperEnv(name), "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	return cmd
}

// startContainer builds the container's command line, environment and
// mounts and starts it through the container helper.
func (p *extPod) startContainer(ec *extContainer) (*exec.Cmd, error) {
	n := p.n
	p.mu.Lock()
	pod := p.pod.DeepCopy()
	p.mu.Unlock()
	img, ok := n.cluster.opts.External.Image(ec.spec.Image)
	if !ok {
		return nil, fmt.Errorf("image %q is not known to the simulator", ec.spec.Image)
	}
	env, err := p.containerEnv(pod, ec.spec)
	if err != nil {
		return nil, err
	}
	argv := expandAll(ec.spec.Command, env)
	args := expandAll(ec.spec.Args, env)
	if len(argv) == 0 {
		argv = []string{filepath.Base(img.Entrypoint)}
	}
	argv = append(argv, args...)
	mounts, err := p.containerMounts(pod, ec.spec)
	if err != nil {
		return nil, err
	}
	for target, src := range img.Files {
		mounts = append(mounts, containerMount{Kind: mountBind, Source: src, Target: target, ReadOnly: true})
	}

	id := newContainerID()
	cg, err := p.cgroup.Child(id)
	if err != nil {
		return nil, err
	}
	scratch := filepath.Join(p.dir, "ctr-"+id)
	if err := os.MkdirAll(scratch, 0o700); err != nil {
		return nil, err
	}
	hostname := pod.Name
	if p.hostNet {
		hostname = n.Name
	}
	spec := containerSpec{Scratch: scratch, Mounts: mounts, Program: img.Entrypoint, Argv: argv, Env: env, Dir: ec.spec.WorkingDir, Hostname: hostname}
	specFile := scratch + ".json"
	if err := os.WriteFile(specFile, []byte(mustJSON(spec)), 0o600); err != nil {
		return nil, err
	}
	logDir := filepath.Join(n.cluster.RunDir, n.Name, "logs")
	_ = os.MkdirAll(logDir, 0o700)
	logf, err := os.OpenFile(filepath.Join(logDir, fmt.Sprintf("%s_%s_%s.log", pod.Namespace, pod.Name, ec.spec.Name)), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := execHelper(n.cluster.opts.AppBin, containerHelper)
	cmd.Env = append(cmd.Env, containerSpecEnv+"="+specFile)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNS | syscall.CLONE_NEWUTS}
	cgf, err := cg.Open()
	if err != nil {
		return nil, err
	}
	defer cgf.Close()
	if err := startInNode(cmd, p.netns.Fd(), int(n.ext.pidns.Fd()), int(cgf.Fd())); err != nil {
		_ = cg.Remove()
		return nil, err
	}
	p.mu.Lock()
	ec.id, ec.cgroup, ec.proc, ec.exited = id, cg, cmd.Process, make(chan struct{})
	ec.running, ec.started, ec.waiting, ec.message = true, metav1.Now(), "", ""
	ec.ready = ec.spec.ReadinessProbe == nil
	p.mu.Unlock()
	return cmd, nil
}

// terminate stops the containers as a kubelet does for a deleted pod:
// preStop hooks, SIGTERM, the grace period, then SIGKILL.
func (p *extPod) terminate() {
	p.mu.Lock()
	grace := int64(30)
	if p.pod.Spec.TerminationGracePeriodSeconds != nil {
		grace = *p.pod.Spec.TerminationGracePeriodSeconds
	}
	if p.pod.DeletionGracePeriodSeconds != nil {
		grace = *p.pod.DeletionGracePeriodSeconds
	}
	if !p.deleting {
		grace = 5 // the simulator closes
	}
	ctrs := append([]*extContainer(nil), p.ctrs...)
	p.mu.Unlock()
	deadline := time.Now().Add(time.Duration(grace) * time.Second)
	var wg sync.WaitGroup
	for _, ec := range ctrs {
		p.mu.Lock()
		proc, exited := ec.proc, ec.exited
		p.mu.Unlock()
		if proc == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if h := ec.spec.Lifecycle; h != nil && h.PreStop != nil {
				ctx, cancel := context.WithDeadline(context.Background(), deadline)
				if err := p.runHandler(ctx, ec, h.PreStop); err != nil {
					p.logf("preStop failed", "container", ec.spec.Name, "err", err)
				}
				cancel()
			}
			_ = proc.Signal(syscall.SIGTERM)
			select {
			case <-exited:
			case <-time.After(time.Until(deadline)):
				p.mu.Lock()
				cg := ec.cgroup
				p.mu.Unlock()
				_ = proc.Kill()
				if cg != nil {
					_ = os.WriteFile(filepath.Join(cg.Path, "cgroup.kill"), []byte("1"), 0)
				}
				<-exited
			}
		}()
	}
	wg.Wait()
}

// teardown removes the sandbox: CNI DEL, the pin, the namespace, the
// cgroup, the pod's files.
func (p *extPod) teardown() {
	if p.stopAPI != nil {
		p.stopAPI()
	}
	if p.net != nil {
		if err := p.cniDel(); err != nil {
			p.logf("CNI DEL failed", "err", err)
		}
		if p.pin != "" {
			_ = syscall.Unmount(p.pin, syscall.MNT_DETACH)
			_ = os.Remove(p.pin)
		}
		_ = p.n.Net.RemovePod(p.net)
	}
	if p.cgroup != nil {
		if err := p.cgroup.Remove(); err != nil {
			p.logf("removing cgroup", "err", err)
		}
	}
	_ = os.RemoveAll(p.dir)
}

// statusLoop writes the pod's status whenever it changed, until the pod is
// torn down.
func (p *extPod) statusLoop() {
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-p.dirty:
		}
		for i := 0; i < 5 && p.ctx.Err() == nil; i++ {
			err := p.writeStatus()
			if err == nil || apierrors.IsNotFound(err) {
				break
			}
			if !apierrors.IsConflict(err) {
				p.logf("writing status", "err", err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

func (p *extPod) writeStatus() error {
	k := p.n.cluster.ext
	p.mu.Lock()
	ns, name := p.pod.Namespace, p.pod.Name
	p.mu.Unlock()
	cur, err := k.CoreV1().Pods(ns).Get(p.ctx, name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	if cur.UID != p.uid {
		return apierrors.NewNotFound(corev1.Resource("pods"), name)
	}
	st := p.status(cur)
	cur.Status = st
	_, err = k.CoreV1().Pods(ns).UpdateStatus(p.ctx, cur, metav1.UpdateOptions{})
	return err
}

func condition(old []corev1.PodCondition, t corev1.PodConditionType, ok bool, reason string) corev1.PodCondition {
	s := corev1.ConditionFalse
	if ok {
		s = corev1.ConditionTrue
	}
	c := corev1.PodCondition{Type: t, Status: s, LastTransitionTime: metav1.Now()}
	if !ok {
		c.Reason = reason
	}
	for _, o := range old {
		if o.Type == t && o.Status == s {
			c.LastTransitionTime = o.LastTransitionTime
		}
	}
	return c
}

func (p *extPod) status(cur *corev1.Pod) corev1.PodStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := cur.Status
	st.HostIP = p.n.Net.Uplink4().String()
	st.HostIPs = []corev1.HostIP{{IP: st.HostIP}}
	if st.StartTime == nil {
		t := metav1.NewTime(p.started)
		st.StartTime = &t
	}
	if p.sandboxOK {
		st.PodIP = p.podIP.String()
		st.PodIPs = []corev1.PodIP{{IP: st.PodIP}}
		if p.net != nil && p.net.IPv6.IsValid() {
			st.PodIPs = append(st.PodIPs, corev1.PodIP{IP: p.net.IPv6.String()})
		}
	}
	byName := map[string]*extContainer{}
	for _, ec := range p.ctrs {
		byName[ec.spec.Name] = ec
	}
	cs := func(c corev1.Container) corev1.ContainerStatus {
		s := corev1.ContainerStatus{Name: c.Name, Image: c.Image, ImageID: "kmesh-sim://" + c.Image}
		ec := byName[c.Name]
		if ec == nil {
			reason := "ContainerCreating"
			if p.lastErr != "" {
				reason = "CreateContainerError"
			}
			s.State.Waiting = &corev1.ContainerStateWaiting{Reason: reason, Message: p.lastErr}
			return s
		}
		s.RestartCount = ec.restarts
		if ec.id != "" {
			s.ContainerID = "kmesh-sim://" + ec.id
		}
		s.Ready = ec.ready
		started := ec.running
		s.Started = &started
		switch {
		case ec.running:
			s.State.Running = &corev1.ContainerStateRunning{StartedAt: ec.started}
			if ec.last != nil {
				s.LastTerminationState.Terminated = ec.last
			}
		case ec.waiting != "":
			s.State.Waiting = &corev1.ContainerStateWaiting{Reason: ec.waiting, Message: ec.message}
			if ec.last != nil {
				s.LastTerminationState.Terminated = ec.last
			}
		case ec.last != nil:
			s.State.Terminated = ec.last
		default:
			s.State.Waiting = &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}
		}
		return s
	}
	st.InitContainerStatuses = nil
	for _, c := range cur.Spec.InitContainers {
		st.InitContainerStatuses = append(st.InitContainerStatuses, cs(c))
	}
	st.ContainerStatuses = nil
	allReady := len(cur.Spec.Containers) > 0
	for _, c := range cur.Spec.Containers {
		s := cs(c)
		allReady = allReady && s.Ready
		st.ContainerStatuses = append(st.ContainerStatuses, s)
	}
	// A pod whose containers are not restarted ends when they all have:
	// Succeeded if each exited 0, Failed if one did not (Never only).
	done, failed := len(cur.Spec.Containers) > 0, false
	for _, c := range st.ContainerStatuses {
		t := c.State.Terminated
		done = done && t != nil
		failed = failed || t != nil && t.ExitCode != 0
	}
	rp := cur.Spec.RestartPolicy
	switch {
	case !p.initDone:
		st.Phase = corev1.PodPending
	case rp == corev1.RestartPolicyNever && done && failed:
		st.Phase = corev1.PodFailed
	case (rp == corev1.RestartPolicyNever || rp == corev1.RestartPolicyOnFailure) && done && !failed:
		st.Phase = corev1.PodSucceeded
	default:
		st.Phase = corev1.PodRunning
	}
	old := cur.Status.Conditions
	st.Conditions = []corev1.PodCondition{
		condition(old, corev1.PodReadyToStartContainers, p.sandboxOK, "SandboxNotReady"),
		condition(old, corev1.PodInitialized, p.initDone, "ContainersNotInitialized"),
		condition(old, corev1.ContainersReady, allReady, "ContainersNotReady"),
		condition(old, corev1.PodReady, allReady, "ContainersNotReady"),
		condition(old, corev1.PodScheduled, true, ""),
	}
	return st
}

// dialIn connects from the pod's network namespace.
func (p *extPod) dialIn(ctx context.Context, network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := p.netns.Do(func() (err error) {
		var d net.Dialer
		conn, err = d.DialContext(ctx, network, addr)
		return err
	})
	return conn, err
}

// Exec runs a command inside a running container of a pod on this node
// (its mount, network and PID namespaces), as kubectl exec would, and
// returns its combined output.
func (n *Node) Exec(ctx context.Context, namespace, pod, container string, argv ...string) ([]byte, error) {
	p, err := n.extPod(namespace, pod)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	var ec *extContainer
	for _, c := range p.ctrs {
		if (c.spec.Name == container || container == "") && c.running && !c.init {
			ec = c
			break
		}
	}
	p.mu.Unlock()
	if ec == nil {
		return nil, fmt.Errorf("no running container %q in %s/%s", container, namespace, pod)
	}
	return p.execIn(ctx, ec, argv)
}

func (p *extPod) execIn(ctx context.Context, ec *extContainer, argv []string) ([]byte, error) {
	p.mu.Lock()
	proc, cg := ec.proc, ec.cgroup
	p.mu.Unlock()
	if proc == nil || cg == nil {
		return nil, errors.New("container not running")
	}
	args := append([]string{"--target", fmt.Sprint(proc.Pid), "--mount", "--net", "--pid", "--uts", "--"}, argv...)
	cmd := exec.CommandContext(ctx, "nsenter", args...)
	// In the container's cgroup, as kubectl exec's process is: programs
	// attached to the node's cgroup see its sockets.
	cgf, err := cg.Open()
	if err != nil {
		return nil, err
	}
	defer cgf.Close()
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, UseCgroupFD: true, CgroupFD: int(cgf.Fd())}
	return cmd.CombinedOutput()
}
