package dataplane

import (
	"errors"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"

	"kmesh.dev/kmesh/bpf"
)

// Options configure a Dataplane.
type Options struct {
	// Node is this node's topology: locality ranks and path verdicts are
	// computed against it.
	Node Topology
	// Protocols get a frontend per service port; default TCP and UDP (Istio's
	// workload API carries no protocol per port).
	Protocols []bpf.Proto
	Logger    *slog.Logger
}

// Stats counts what the writer did; exported as metrics by the daemon.
type Stats struct {
	ServiceWrites  atomic.Uint64 // services (re)written to the kernel
	WorkloadWrites atomic.Uint64
	Errors         atomic.Uint64 // failed applies (each also returned and logged)
	MapFull        atomic.Uint64 // of which: a map had no room
	// Same-node authorization in the kernel: local workloads with policies
	// the kernel evaluates (AUTHZ) and those left to the tunnel (see
	// AuthzReasons), now; pair entries the kernel did not take (their
	// connections take the tunnel), ever.
	AuthzKernel, AuthzTunnel atomic.Uint64
	AuthzUnfit               atomic.Uint64
}

// Dataplane owns the contents of the load-balancing maps. Every method is
// safe for concurrent use; writes are serialised.
type Dataplane struct {
	maps Maps
	opts Options
	log  *slog.Logger

	mu        sync.Mutex
	workloads map[string]*resolvedWorkload
	// byBackend indexes workloads by backend id (ids are small and dense):
	// the user-space pick resolves the kernel's choice through it.
	byBackend []*resolvedWorkload
	services  map[string]*serviceRec
	// byIdx indexes services by their small index (refs and frontend
	// owners hold indexes, not keys).
	byIdx    []*serviceRec
	svcIdxes idAlloc
	// sets indexes the live load-balancing sets by id (the user-space pick).
	sets map[uint32]*liveSet
	// refs: workload UID -> the services listing it as an endpoint, so a
	// workload change re-derives exactly the services it affects (refs.go).
	refs refIndex
	// wlFE: workload address (addrKey) -> backend id of the workload owning
	// its frontend (kind workload, port 0, protocol 0, id = that backend).
	// Kept apart from fe and without values: the kernel value follows from
	// the owner.
	wlFE map[[16]byte]uint32
	// fe mirrors the service entries of kmesh_frontend with each entry's
	// owner (the service key). Two services may claim one address (a
	// ServiceEntry shadowing a Service): the last writer wins, and the
	// loser's cleanup must not delete the winner's entry.
	fe         feTable
	enrolled   map[uint64]string   // netns cookie -> workload UID
	enrolledBy map[string][]uint64 // workload UID -> netns cookies

	backendIDs, setIDs idAlloc
	// dropLater: sets whose deletion the kernel refused; retried by Apply.
	dropLater []*liveSet
	// removeLater: deleted workloads whose backend a table still points at
	// (its service's update failed), by backend id: the entry and the id
	// stay until no table does, so the id cannot be reused under it.
	removeLater map[uint32]*resolvedWorkload
	// orphans is the previous daemon's kernel state not yet adopted (see adopt.go).
	orphans *orphans
	// authzLive mirrors kmesh_authz (kauthz.go); nil until first read.
	authzLive map[bpf.AuthzKey]bpf.Authz
	// vipLive mirrors kmesh_vip (vips.go); nil until first read.
	vipLive map[netip.Addr]uint32
	// authzWhy: local workloads whose policies the kernel does not hold,
	// with the reason last logged.
	authzWhy map[string]string
	Stats    Stats
}

type feEntry struct {
	owner uint32 // the owning service's index; orphanOwner until adopted
	val   bpf.Frontend
}

type serviceRec struct {
	idx       uint32
	svc       Service
	sets      []*liveSet
	frontends []bpf.FrontendKey // the kernel values are in Dataplane.fe
	// retired: sets no longer used whose frontends could not be deleted
	// yet; dropped with them by a later apply.
	retired []*liveSet
}

// liveSet is a load-balancing set as it is in the kernel.
type liveSet struct {
	id    uint32
	gen   uint8
	epoch uint32
	table *tableSet
	// leftover: slots of the inactive generation whose deletion failed;
	// deleted before anything is written there again.
	leftover []bpf.EndpointKey
}

// New returns a Dataplane writing to maps. The maps are assumed empty of
// anything this Dataplane must own (see Adopt for a restart).
func New(m Maps, opts Options) *Dataplane {
	if len(opts.Protocols) == 0 {
		opts.Protocols = []bpf.Proto{bpf.TCP, bpf.UDP}
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Dataplane{
		maps: m, opts: opts, log: log.With("component", "dataplane"),
		workloads: map[string]*resolvedWorkload{}, services: map[string]*serviceRec{}, sets: map[uint32]*liveSet{},
		refs: newRefIndex(), fe: feTable{}, wlFE: map[[16]byte]uint32{},
		enrolled: map[uint64]string{}, enrolledBy: map[string][]uint64{}, removeLater: map[uint32]*resolvedWorkload{},
	}
}

func (d *Dataplane) lookup(uid string) *resolvedWorkload { return d.workloads[uid] }

// fail records and logs an apply error and returns it unchanged.
func (d *Dataplane) fail(what string, err error) error {
	d.Stats.Errors.Add(1)
	var full *bpf.MapFullError
	if errors.As(err, &full) {
		d.Stats.MapFull.Add(1)
		d.log.Error("kernel map full: update not applied, previous state keeps serving", "object", what, "map", full.Map, "max_entries", full.MaxEntries)
	} else {
		d.log.Error("kernel update failed: previous state keeps serving", "object", what, "err", err)
	}
	return err
}

// ObjectError is the failure to apply one workload or service. The kernel
// keeps serving that object's previous state.
type ObjectError struct {
	Kind string // "workload" or "service"
	Name string // workload UID or service key
	Err  error
}

func (e *ObjectError) Error() string { return e.Kind + " " + e.Name + ": " + e.Err.Error() }
func (e *ObjectError) Unwrap() error { return e.Err }

// Batch is a set of changes applied together: each affected service is
// recomputed once, however many of its workloads changed.
type Batch struct {
	Workloads       []Workload
	DeleteWorkloads []string
	Services        []Service
	DeleteServices  []string
}

// Apply applies a batch. Order matters for connections in flight: deleted
// workloads leave the tables before their backends go; new workloads get
// backends before any table points at them; frontends of deleted services
// go before their tables.
func (d *Dataplane) Apply(b Batch) []*ObjectError {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []*ObjectError
	failed := func(kind, name string, err error) {
		if err != nil {
			errs = append(errs, &ObjectError{Kind: kind, Name: name, Err: d.fail(kind+" "+name, err)})
		}
	}
	if err := d.retryDrops(); err != nil {
		d.log.Warn("deleting unused load-balancing sets failed again; they stay unused until the next update", "err", err)
	}
	affected := map[string]struct{}{}
	gone := map[string]*resolvedWorkload{}
	for _, uid := range b.DeleteWorkloads {
		if rec, ok := d.workloads[uid]; ok {
			delete(d.workloads, uid)
			gone[uid] = rec
			d.refs.each(uid, func(i uint32) { affected[d.byIdx[i].svc.Key] = struct{}{} })
		}
	}
	changed, werrs := d.setWorkloads(b.Workloads)
	for _, w := range b.Workloads {
		failed("workload", w.UID, werrs[w.UID])
	}
	for _, uid := range changed {
		d.refs.each(uid, func(i uint32) { affected[d.byIdx[i].svc.Key] = struct{}{} })
	}
	for _, s := range b.Services {
		delete(affected, s.Key)
		failed("service", s.Key, d.setService(s))
	}
	for _, key := range b.DeleteServices {
		delete(affected, key)
		failed("service", key, d.deleteService(key))
	}
	for _, key := range slices.Sorted(maps.Keys(affected)) {
		if rec := d.services[key]; rec != nil {
			failed("service", key, d.applyService(rec))
		}
	}
	for uid, rec := range gone {
		failed("workload", uid, d.removeWorkload(uid, rec))
	}
	for id, rec := range d.removeLater {
		if !d.backendInUse(rec) {
			delete(d.removeLater, id)
			failed("workload", rec.uid, d.removeWorkload(rec.uid, rec))
		}
	}
	if len(b.Services)+len(b.DeleteServices) > 0 {
		if err := d.syncVIPs(); err != nil {
			// Not an object's failure: a VIP without its entry passes
			// untouched on the ports its service lacks, as before
			// kmesh_vip; the next batch tries again.
			d.Stats.Errors.Add(1)
			d.log.Warn("service VIP entries not all written; those VIPs are not refused on ports their services lack", "err", err)
		}
	}
	if len(b.Workloads)+len(b.DeleteWorkloads) > 0 {
		if err := d.syncAuthz(); err != nil {
			// Not an object's failure: the pairs concerned take the
			// tunnel, and the next batch tries again.
			d.Stats.Errors.Add(1)
			d.log.Warn("same-node authorization entries not all written; those connections take the tunnel", "err", err)
		}
	}
	return errs
}

func joinObjectErrors(errs []*ObjectError) error {
	var out []error
	for _, e := range errs {
		out = append(out, e)
	}
	return errors.Join(out...)
}

// SetWorkload adds or updates one workload (see Apply).
func (d *Dataplane) SetWorkload(w Workload) error {
	return joinObjectErrors(d.Apply(Batch{Workloads: []Workload{w}}))
}

// DeleteWorkload removes one workload (see Apply).
func (d *Dataplane) DeleteWorkload(uid string) error {
	return joinObjectErrors(d.Apply(Batch{DeleteWorkloads: []string{uid}}))
}

// SetService adds or updates one service (see Apply). On error the kernel
// keeps serving the previous version of the service, whole.
func (d *Dataplane) SetService(s Service) error {
	return joinObjectErrors(d.Apply(Batch{Services: []Service{s}}))
}

// DeleteService removes one service (see Apply).
func (d *Dataplane) DeleteService(key string) error {
	return joinObjectErrors(d.Apply(Batch{DeleteServices: []string{key}}))
}

// SetNode changes this node's topology (its locality became known, say)
// and recomputes every service's ranks and every workload's path verdicts
// against it.
func (d *Dataplane) SetNode(t Topology) []*ObjectError {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.opts.Node == t {
		return nil
	}
	// Which workloads are local, or on this network, decides their verdicts.
	moved := d.opts.Node.Node != t.Node || d.opts.Node.Network != t.Network
	d.opts.Node = t
	var errs []*ObjectError
	if moved {
		var bs []bpf.Backend
		for _, uid := range slices.Sorted(maps.Keys(d.workloads)) {
			bs = append(bs, d.backendOf(d.workloads[uid]))
		}
		if err := d.maps.PutBackends(bs); err != nil {
			errs = append(errs, &ObjectError{Kind: "node", Name: t.Node, Err: d.fail("backends of node "+t.Node, err)})
		}
		if err := d.syncAuthz(); err != nil {
			d.log.Warn("same-node authorization entries not all written; those connections take the tunnel", "err", err)
		}
	}
	for _, key := range slices.Sorted(maps.Keys(d.services)) {
		if err := d.applyService(d.services[key]); err != nil {
			errs = append(errs, &ObjectError{Kind: "service", Name: key, Err: d.fail("service "+key, err)})
		}
	}
	return errs
}

// ServiceVIPs returns the VIPs of a service known to the dataplane (for tests
// and dumps).
func (d *Dataplane) ServiceVIPs(key string) []netip.Addr {
	d.mu.Lock()
	defer d.mu.Unlock()
	if rec := d.services[key]; rec != nil {
		return slices.Clone(rec.svc.VIPs)
	}
	return nil
}
