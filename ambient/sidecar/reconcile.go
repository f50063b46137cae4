package sidecar

import (
	"log/slog"
	"maps"
	"net/netip"
	"sync"

	"kmesh.dev/kmesh/bpf"
)

// SpliceMap is where opt-ins go (bpf.Maps; in memory in tests).
type SpliceMap interface {
	SetSpliceNS(netnsCookie uint64, flags bpf.SpliceNS) error
	SetSidecarPod(netnsCookie uint64, addr netip.Addr) error
	DeleteSidecarPod(netnsCookie uint64) error
	SidecarPods() (map[uint64]netip.Addr, error)
}

// NetnsFinder finds pods' network namespaces (Finder; fake in tests):
// every UID asked for is in the result.
type NetnsFinder interface {
	Find(uids map[string]bool) (map[string]Found, error)
}

// Reconciler keeps kmesh_splice_ns in step with the pods of this node and
// their namespaces, as the watch reports them. Only namespaces it opted
// in itself are ever cleared.
type Reconciler struct {
	Node   string
	Map    SpliceMap
	Finder NetnsFinder
	// Max bounds the pods spliced at once (kmesh_splice_ns is shared with
	// enrolled pods' opt-ins; its size is 4096).
	Max int
	Log *slog.Logger

	mu   sync.Mutex
	pods map[string]Pod       // by UID: this node's, as last seen
	nss  map[string]Namespace // by name
	// spliced: pod UID -> netns cookie this reconciler opted in.
	spliced map[string]uint64
	// captured: pod UID -> the address registered for the kernel's
	// sidecar capture (a subset of spliced).
	captured map[string]netip.Addr
	// uncaptured counts spliced pods left to iptables' capture, by why.
	uncaptured map[CaptureReason]uint64
	// refused counts pods that asked for splicing and were refused (the
	// namespace not found, ambiguous, too many, a failed map write).
	refused map[Reason]uint64
}

// Refusals returns how often each reason refused a pod that asked.
func (r *Reconciler) Refusals() map[Reason]uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.refused)
}

func (r *Reconciler) init() {
	if r.pods == nil {
		r.pods, r.nss, r.spliced, r.refused = map[string]Pod{}, map[string]Namespace{}, map[string]uint64{}, map[Reason]uint64{}
		r.captured, r.uncaptured = map[string]netip.Addr{}, map[CaptureReason]uint64{}
	}
}

// Pod records a pod's add or change and applies it.
func (r *Reconciler) Pod(p Pod) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.init()
	if p.NodeName != r.Node {
		r.forget(p.UID)
		return
	}
	r.pods[p.UID] = p
	r.apply(p)
}

// PodGone applies a pod's deletion.
func (r *Reconciler) PodGone(uid string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.init()
	r.forget(uid)
}

// Namespace records a namespace's add or change and re-applies its pods.
func (r *Reconciler) Namespace(ns Namespace) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.init()
	r.nss[ns.Name] = ns
	for _, p := range r.pods {
		if p.Namespace == ns.Name {
			r.apply(p)
		}
	}
}

// NamespaceGone forgets a namespace: its pods fall back to their own
// annotation, or are not spliced.
func (r *Reconciler) NamespaceGone(name string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.init()
	delete(r.nss, name)
	for _, p := range r.pods {
		if p.Namespace == name {
			r.apply(p)
		}
	}
}

// Retry re-checks, in one scan of the node's processes, every pod that
// wants splicing: one not spliced yet (its containers had not started) is
// spliced once found; a spliced one whose network namespace changed (a
// new pod sandbox) moves to the new one, and one whose namespace is no
// longer found, or no longer unambiguous, is unspliced (closed).
func (r *Reconciler) Retry() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.init()
	want := map[string]bool{}
	for uid, p := range r.pods {
		if Decide(p, r.ns(p), r.Node) == Spliced {
			want[uid] = true
		}
	}
	if len(want) == 0 {
		return
	}
	found, err := r.Finder.Find(want)
	if err != nil {
		r.log().Warn("scanning the node's processes for sidecar pods", "err", err)
		return // nothing learnt: keep what is
	}
	for uid := range want {
		f := found[uid]
		if c, ok := r.spliced[uid]; ok {
			if f.Why == Spliced && f.Cookie == c {
				continue
			}
			r.unsplice(uid)
		}
		r.splice(r.pods[uid], f, nil)
	}
}

func (r *Reconciler) ns(p Pod) *Namespace {
	if n, ok := r.nss[p.Namespace]; ok {
		return &n
	}
	return nil
}

// Sweep withdraws every kernel capture this reconciler does not hold: ones
// a previous daemon left for pods that went while no daemon watched. Such
// an entry is the one harmful leftover: a new pod given the old one's
// address would have other sidecars' connections sent to a 15006 it may
// not have. Called after each complete list of the node's pods; a pod this
// reconciler has not found again yet keeps iptables' capture until it is.
func (r *Reconciler) Sweep() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.init()
	pods, err := r.Map.SidecarPods()
	if err != nil {
		r.log().Warn("listing the kernel's sidecar captures", "err", err)
		return
	}
	held := map[uint64]bool{}
	for uid := range r.captured {
		held[r.spliced[uid]] = true
	}
	for cookie, addr := range pods {
		if held[cookie] {
			continue
		}
		if err := r.Map.DeleteSidecarPod(cookie); err != nil {
			r.log().Warn("withdrawing a leftover sidecar capture", "netns_cookie", cookie, "addr", addr, "err", err)
			continue
		}
		r.log().Info("withdrew a sidecar capture no pod of this node holds", "netns_cookie", cookie, "addr", addr)
	}
}

// Captured returns the spliced pods whose capture the kernel performs:
// UID -> pod address.
func (r *Reconciler) Captured() map[string]netip.Addr {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.captured)
}

// Uncaptured returns how often a spliced pod was left to iptables'
// capture (only its in-pod leg spliced), by reason.
func (r *Reconciler) Uncaptured() map[CaptureReason]uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.uncaptured)
}

// Spliced returns the pods this reconciler opted in: UID -> netns cookie.
func (r *Reconciler) Spliced() map[string]uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.spliced)
}

func (r *Reconciler) forget(uid string) {
	delete(r.pods, uid)
	r.unsplice(uid)
}

func (r *Reconciler) unsplice(uid string) {
	cookie, ok := r.spliced[uid]
	if !ok {
		return
	}
	// The capture first: while the namespace is still opted in, its
	// sockets keep being spliced, never captured without a record.
	if !r.uncapture(uid) {
		return
	}
	if err := r.Map.SetSpliceNS(cookie, 0); err != nil {
		// Kept: the next event retries the removal.
		r.log().Warn("clearing a pod's splicing opt-in", "uid", uid, "err", err)
		return
	}
	delete(r.spliced, uid)
}

func (r *Reconciler) apply(p Pod) {
	if Decide(p, r.ns(p), r.Node) != Spliced {
		r.unsplice(p.UID)
		return
	}
	if c, ok := r.spliced[p.UID]; ok {
		// A changed sandbox is Retry's to find; what can change here is
		// the capture (the pod's address arrives after it started).
		if _, on := r.captured[p.UID]; !on && Capture(p) == KernelCapture {
			r.capture(p, c)
		}
		return
	}
	if len(r.spliced) >= r.Max {
		r.refuse(p, TooManyPods, nil)
		return
	}
	found, err := r.Finder.Find(map[string]bool{p.UID: true})
	r.splice(p, found[p.UID], err)
}

// splice opts p's network namespace f in, or counts why not.
func (r *Reconciler) splice(p Pod, f Found, err error) {
	if f.Why == "" {
		f.Why = NetnsUnknown
	}
	if f.Why != Spliced || err != nil {
		r.refuse(p, f.Why, err)
		return
	}
	if len(r.spliced) >= r.Max {
		r.refuse(p, TooManyPods, nil)
		return
	}
	cookie := f.Cookie
	for _, c := range r.spliced {
		if c == cookie {
			// Two pods in one network namespace: one of the records is
			// stale (a pod gone, its deletion not seen yet). Refuse
			// rather than guess; the deletion's event retries.
			r.refuse(p, NetnsAmbiguous, nil)
			return
		}
	}
	if err := r.Map.SetSpliceNS(cookie, bpf.SpliceInPod); err != nil {
		r.refuse(p, MapWriteFailure, err)
		return
	}
	r.spliced[p.UID] = cookie
	r.log().Info("splicing a sidecar pod's in-pod connections", "pod", p.Namespace+"/"+p.Name, "netns_cookie", cookie)
	r.capture(p, cookie)
}

// capture hands spliced pod p's sidecar capture to the kernel when its
// capture is the one the kernel implements (Capture), so that its other
// legs splice too; else counts why not. Its iptables rules capture either
// way.
func (r *Reconciler) capture(p Pod, cookie uint64) {
	why := Capture(p)
	if why == KernelCapture {
		for uid, a := range r.captured {
			if a == p.IPv4 && uid != p.UID {
				// Two pods at one address: one record is stale. The
				// address must name one namespace, so neither guesses.
				why = AddrInUse
			}
		}
	}
	if why == KernelCapture {
		if err := r.Map.SetSidecarPod(cookie, p.IPv4); err != nil {
			why = MapWriteCapture
			r.log().Warn("registering a sidecar pod for the kernel's capture", "pod", p.Namespace+"/"+p.Name, "err", err)
		} else if err := r.Map.SetSpliceNS(cookie, bpf.SpliceInPod|bpf.SpliceSidecar); err != nil {
			why = MapWriteCapture
			_ = r.Map.DeleteSidecarPod(cookie)
			r.log().Warn("opting a sidecar pod into the kernel's capture", "pod", p.Namespace+"/"+p.Name, "err", err)
		}
	}
	if why != KernelCapture {
		r.uncaptured[why]++
		r.log().Info("sidecar pod keeps iptables' capture: only its in-pod leg is spliced", "pod", p.Namespace+"/"+p.Name, "reason", string(why))
		return
	}
	r.captured[p.UID] = p.IPv4
	r.log().Info("the kernel captures a sidecar pod's connections: every leg spliced", "pod", p.Namespace+"/"+p.Name, "addr", p.IPv4)
}

// uncapture withdraws a pod's kernel capture; false when the map refused
// (kept: the next event retries).
func (r *Reconciler) uncapture(uid string) bool {
	if _, ok := r.captured[uid]; !ok {
		return true
	}
	if err := r.Map.DeleteSidecarPod(r.spliced[uid]); err != nil {
		r.log().Warn("withdrawing a sidecar pod from the kernel's capture", "uid", uid, "err", err)
		return false
	}
	delete(r.captured, uid)
	return true
}

func (r *Reconciler) refuse(p Pod, why Reason, err error) {
	r.refused[why]++
	r.log().Info("not splicing a sidecar pod that asked for it", "pod", p.Namespace+"/"+p.Name, "reason", string(why), "err", err)
}

func (r *Reconciler) log() *slog.Logger {
	if r.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return r.Log
}
