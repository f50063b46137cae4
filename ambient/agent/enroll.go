package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"

	"golang.org/x/sys/unix"
	"istio.io/istio/pkg/zdsapi"

	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/kernel"
)

// enroller is the daemon's ZDS handler: it turns the node agent's pod
// events into managed network namespaces in the kernel, and keeps each
// pod's namespace open (the in-pod listeners of the tunnel need it).
type enroller struct {
	plane   *dataplane.Dataplane
	cluster string
	log     *slog.Logger
	// hooks learn about pods after the kernel does (the tunnel's
	// listeners, the pods' certificates); nil in kernel-only setups.
	hooks podHooks
	// inbound attaches inbound enforcement to each pod's namespace; nil:
	// none (kernel-only setups, tests).
	inbound inboundEnforcer
	// afterSnapshot runs once, after the node agent's first snapshot
	// (nil: nothing).
	afterSnapshot func()
	snapshots     int

	mu   sync.Mutex
	pods map[string]*enrolledPod
	// byCookie indexes pods by network namespace cookie: the kernel-path
	// telemetry looks a pod up by it for every connection event.
	byCookie map[uint64]*enrolledPod
	// seen: pods announced since the current ZDS connection began.
	seen map[string]bool
	// blind: a keep named a pod whose namespace this daemon never saw;
	// its kernel entry cannot be told from a stale one, so sweeping waits.
	blind bool
}

type enrolledPod struct {
	info        *zdsapi.WorkloadInfo
	workloadUID string
	netns       *os.File
	cookie      uint64
}

// inboundEnforcer attaches the kernel's inbound enforcement (sk_lookup) to
// pod namespaces (*bpf.Datapath).
type inboundEnforcer interface {
	AttachInbound(netnsFd int, netnsCookie uint64) error
	DetachInbound(netnsCookie uint64) error
	InboundAttached() ([]uint64, error)
}

// podHooks is what else a pod's enrolment sets up.
type podHooks interface {
	podAdded(uid, workloadUID string, info *zdsapi.WorkloadInfo, netns *os.File, cookie uint64) error
	podRemoved(uid string, info *zdsapi.WorkloadInfo)
}

func newEnroller(plane *dataplane.Dataplane, cluster string, hooks podHooks, inbound inboundEnforcer, log *slog.Logger) *enroller {
	return &enroller{plane: plane, cluster: cluster, hooks: hooks, inbound: inbound, log: log.With("component", "enrol"),
		pods: map[string]*enrolledPod{}, byCookie: map[uint64]*enrolledPod{}, seen: map[string]bool{}}
}

// workloadUID is istiod's UID for a pod's workload.
func (e *enroller) workloadUID(info *zdsapi.WorkloadInfo) string {
	return fmt.Sprintf("%s//Pod/%s/%s", e.cluster, info.GetNamespace(), info.GetName())
}

func (e *enroller) Add(uid string, info *zdsapi.WorkloadInfo, netns *os.File) error {
	cookie, err := kernel.NetnsCookie(int(netns.Fd()))
	if err != nil {
		netns.Close()
		return fmt.Errorf("pod %s/%s: %w", info.GetNamespace(), info.GetName(), err)
	}
	wuid := e.workloadUID(info)
	// The tunnel first: when the kernel starts sending the pod's
	// connections to 15001, the listener must be there.
	if e.hooks != nil {
		if err := e.hooks.podAdded(uid, wuid, info, netns, cookie); err != nil {
			netns.Close()
			return fmt.Errorf("pod %s/%s: %w", info.GetNamespace(), info.GetName(), err)
		}
	}
	if err := e.plane.Enroll(cookie, wuid); err != nil {
		if e.hooks != nil {
			e.hooks.podRemoved(uid, info)
		}
		netns.Close()
		return err
	}
	// Inbound enforcement last: the proxy's 15006 it steers to is open.
	if e.inbound != nil {
		if err := e.inbound.AttachInbound(int(netns.Fd()), cookie); err != nil {
			_ = e.plane.Unenroll(cookie)
			if e.hooks != nil {
				e.hooks.podRemoved(uid, info)
			}
			netns.Close()
			return fmt.Errorf("pod %s/%s: %w", info.GetNamespace(), info.GetName(), err)
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if old := e.pods[uid]; old != nil {
		old.netns.Close()
		delete(e.byCookie, old.cookie)
		if old.cookie != cookie { // the pod's sandbox was recreated
			_ = e.plane.Unenroll(old.cookie)
			if e.inbound != nil {
				_ = e.inbound.DetachInbound(old.cookie)
			}
		}
	}
	np := &enrolledPod{info: info, workloadUID: wuid, netns: netns, cookie: cookie}
	e.pods[uid], e.byCookie[cookie] = np, np
	e.seen[uid] = true
	e.log.Info("pod enrolled", "pod", info.GetNamespace()+"/"+info.GetName(), "uid", uid, "netns_cookie", cookie)
	return nil
}

func (e *enroller) Keep(uid string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.seen[uid] = true
	if e.pods[uid] == nil {
		e.blind = true
	}
	return nil
}

func (e *enroller) Del(uid string) error {
	e.mu.Lock()
	p := e.pods[uid]
	delete(e.pods, uid)
	if p != nil && e.byCookie[p.cookie] == p {
		delete(e.byCookie, p.cookie)
	}
	delete(e.seen, uid)
	e.mu.Unlock()
	if p == nil {
		return nil
	}
	defer p.netns.Close()
	e.log.Info("pod unenrolled", "pod", p.info.GetNamespace()+"/"+p.info.GetName(), "uid", uid)
	var derr error
	if e.inbound != nil {
		derr = e.inbound.DetachInbound(p.cookie)
	}
	err := errors.Join(derr, e.plane.Unenroll(p.cookie))
	if e.hooks != nil {
		e.hooks.podRemoved(uid, p.info)
	}
	return err
}

// SnapshotSent drops pods the node agent no longer knows, and kernel
// entries of pods that went away while no daemon ran.
func (e *enroller) SnapshotSent() error {
	e.mu.Lock()
	var gone []string
	for uid := range e.pods {
		if !e.seen[uid] {
			gone = append(gone, uid)
		}
	}
	e.mu.Unlock()
	var errs []error
	for _, uid := range gone {
		errs = append(errs, e.Del(uid))
	}
	e.mu.Lock()
	keep := make(map[uint64]bool, len(e.pods))
	for _, p := range e.pods {
		keep[p.cookie] = true
	}
	blind := e.blind
	e.seen, e.blind = map[string]bool{}, false
	e.snapshots++
	first := e.snapshots == 1
	e.mu.Unlock()
	if first && e.afterSnapshot != nil {
		e.afterSnapshot()
	}
	if !blind {
		errs = append(errs, e.plane.SweepManaged(keep))
		if e.inbound != nil {
			attached, err := e.inbound.InboundAttached()
			errs = append(errs, err)
			for _, c := range attached {
				if !keep[c] {
					errs = append(errs, e.inbound.DetachInbound(c))
				}
			}
		}
	}
	return errors.Join(errs...)
}

// PodByNetns finds the enrolled pod with a network namespace cookie (the
// kernel path's telemetry names connections' pods by it). The namespace
// handle is a duplicate: the pod may leave meanwhile, the caller closes it.
func (e *enroller) PodByNetns(cookie uint64) (string, *os.File, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	p := e.byCookie[cookie]
	if p == nil {
		return "", nil, false
	}
	fd, err := unix.FcntlInt(p.netns.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return "", nil, false
	}
	return p.workloadUID, os.NewFile(uintptr(fd), p.netns.Name()), true
}

// WorkloadByNetns is PodByNetns without the namespace handle: what each
// connection event needs.
func (e *enroller) WorkloadByNetns(cookie uint64) (string, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if p := e.byCookie[cookie]; p != nil {
		return p.workloadUID, true
	}
	return "", false
}

// close releases every namespace the daemon holds. The kernel keeps the
// pods enrolled: the next daemon learns them again from the node agent.
// count is how many pods are enrolled.
func (e *enroller) count() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.pods)
}

func (e *enroller) close() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, p := range e.pods {
		p.netns.Close()
	}
	e.pods = map[string]*enrolledPod{}
	e.byCookie = map[uint64]*enrolledPod{}
}
