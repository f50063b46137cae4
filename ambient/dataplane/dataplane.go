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
	// Node is this node's topology: locality ranks are computed against it.
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
}

// Dataplane owns the contents of the load-balancing maps.
type Dataplane struct {
	maps *bpf.Maps
	opts Options
	log  *slog.Logger

	mu        sync.Mutex
	workloads map[string]*resolvedWorkload
	services  map[string]*serviceRec
	// refs: workload UID -> keys of services listing it as an endpoint, so a
	// workload change re-derives exactly the services it affects. Slices:
	// almost every workload is in one or two services.
	refs map[string][]string
	// wlFE: workload address -> UID owning its frontend (kind workload, port
	// 0, protocol 0, id = the owner's backend). Kept apart from fe and
	// without values: the kernel value follows from the owner.
	wlFE map[netip.Addr]string
	// fe mirrors the service entries of kmesh_frontend with each entry's
	// owner (the service key). Two services may claim one address (a
	// ServiceEntry shadowing a Service): the last writer wins, and the
	// loser's cleanup must not delete the winner's entry.
	fe         map[bpf.FrontendKey]feEntry
	enrolled   map[uint64]string   // netns cookie -> workload UID
	enrolledBy map[string][]uint64 // workload UID -> netns cookies

	backendIDs, setIDs idAlloc
	// orphans is the previous daemon's kernel state not yet adopted (see adopt.go).
	orphans *orphans
	Stats   Stats
}

type feEntry struct {
	owner string
	val   bpf.Frontend
}

type serviceRec struct {
	svc       Service
	sets      []*liveSet
	frontends []bpf.FrontendKey // the kernel values are in Dataplane.fe
}

// liveSet is a load-balancing set as it is in the kernel.
type liveSet struct {
	id    uint32
	gen   uint8
	epoch uint32
	table *tableSet
}

// New returns a Dataplane writing to maps. The maps are assumed empty of
// anything this Dataplane must own (see Adopt for a restart).
func New(m *bpf.Maps, opts Options) *Dataplane {
	if len(opts.Protocols) == 0 {
		opts.Protocols = []bpf.Proto{bpf.TCP, bpf.UDP}
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Dataplane{
		maps: m, opts: opts, log: log.With("component", "dataplane"),
		workloads: map[string]*resolvedWorkload{}, services: map[string]*serviceRec{},
		refs: map[string][]string{}, fe: map[bpf.FrontendKey]feEntry{}, wlFE: map[netip.Addr]string{},
		enrolled: map[uint64]string{}, enrolledBy: map[string][]uint64{},
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

// --- workloads and services ---

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
	affected := map[string]struct{}{}
	gone := map[string]*resolvedWorkload{}
	for _, uid := range b.DeleteWorkloads {
		if rec, ok := d.workloads[uid]; ok {
			delete(d.workloads, uid)
			gone[uid] = rec
			for _, k := range d.refs[uid] {
				affected[k] = struct{}{}
			}
		}
	}
	changed, werrs := d.setWorkloads(b.Workloads)
	for _, w := range b.Workloads {
		failed("workload", w.UID, werrs[w.UID])
	}
	for _, uid := range changed {
		for _, k := range d.refs[uid] {
			affected[k] = struct{}{}
		}
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
			failed("service", key, d.apply(rec))
		}
	}
	for uid, rec := range gone {
		var keep []netip.Addr // the same UID set again in this batch
		if cur := d.workloads[uid]; cur != nil {
			keep = cur.addrs
		}
		ferr := d.syncWorkloadFrontends(uid, rec.backend, rec.addrs, keep)
		berr := d.maps.DeleteBackends([]uint32{rec.backend})
		if berr == nil {
			d.backendIDs.put(rec.backend)
		}
		failed("workload", uid, errors.Join(ferr, berr))
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

// setWorkloads writes workloads' backend entries and frontends, batched:
// a full sync sets every workload of the mesh, and one syscall per object
// would dominate it. When a batch fails, the items are retried one by one
// so that the error lands on the object it belongs to. It returns the UIDs
// whose changes affect load-balancing tables.
func (d *Dataplane) setWorkloads(ws []Workload) (changed []string, errs map[string]error) {
	errs = map[string]error{}
	type item struct {
		rec     resolvedWorkload
		prev    *resolvedWorkload
		fresh   bool // id newly allocated
		write   bool // backend entry differs from the kernel's
		oldAddr []netip.Addr
	}
	items := make([]item, len(ws))
	var puts []bpf.Backend
	var putIdx []int
	for i := range ws {
		w := &ws[i]
		it := &items[i]
		var inKernel *bpf.Backend
		var id uint32
		if prev, ok := d.workloads[w.UID]; ok {
			it.prev, id, it.oldAddr = prev, prev.backend, prev.addrs
			b := d.backendOf(prev)
			inKernel = &b
		} else if b, ok := d.adoptBackend(w); ok {
			id, inKernel = b.ID, &b
		} else {
			id, it.fresh = d.backendIDs.get(), true
		}
		it.rec = resolve(w, id)
		if inKernel == nil || d.backendOf(&it.rec) != *inKernel {
			puts = append(puts, d.backendOf(&it.rec))
			putIdx = append(putIdx, i)
		}
	}
	if err := d.maps.PutBackends(puts); err != nil {
		for k, i := range putIdx {
			if err := d.maps.PutBackends(puts[k : k+1]); err != nil {
				errs[ws[i].UID] = err
			}
		}
	}
	type feChange struct {
		uid        string
		put        []bpf.Frontend
		adopt, del []netip.Addr
	}
	var fes []feChange
	var fePut []bpf.Frontend
	var feDel []bpf.FrontendKey
	for i := range ws {
		it := &items[i]
		uid := ws[i].UID
		if errs[uid] != nil {
			if it.fresh {
				d.backendIDs.put(it.rec.backend)
			}
			continue
		}
		rec := it.rec
		d.workloads[uid] = &rec
		d.Stats.WorkloadWrites.Add(1)
		put, adopt, del := d.wlFrontendDiff(uid, rec.backend, it.oldAddr, rec.addrs)
		fes = append(fes, feChange{uid, put, adopt, del})
		fePut = append(fePut, put...)
		for _, a := range del {
			feDel = append(feDel, bpf.FrontendKey{Addr: a})
		}
		if it.prev == nil || !it.prev.lbEqual(&rec) {
			changed = append(changed, uid)
		}
		if it.prev == nil {
			for _, cookie := range d.enrolledBy[uid] {
				if err := d.maps.SetManaged(cookie, rec.backend); err != nil {
					errs[uid] = err
				}
			}
		}
	}
	if err := errors.Join(d.maps.UpsertFrontends(fePut), d.maps.DeleteFrontends(feDel)); err != nil {
		// Attribute by redoing each workload's frontends alone.
		for i := range ws {
			if errs[ws[i].UID] == nil {
				if err := d.syncWorkloadFrontends(ws[i].UID, items[i].rec.backend, items[i].oldAddr, items[i].rec.addrs); err != nil {
					errs[ws[i].UID] = err
				}
			}
		}
		return changed, errs
	}
	for _, c := range fes {
		d.wlFrontendCommit(c.uid, c.put, c.adopt, c.del)
	}
	return changed, errs
}

// wlFrontendDiff says what makes the workload's address frontends right:
// entries to write, the previous daemon's to adopt as they are, and
// addresses to drop. It changes nothing.
func (d *Dataplane) wlFrontendDiff(uid string, backend uint32, old, want []netip.Addr) (put []bpf.Frontend, adopt, del []netip.Addr) {
	for _, a := range want {
		switch {
		case d.wlFE[a] == uid && slices.Contains(old, a):
			// already ours, and a workload keeps its backend id
		case d.orphans != nil && d.orphans.wlFE[a] == backend && d.orphans.wlFE[a] != 0:
			adopt = append(adopt, a)
		default:
			put = append(put, bpf.Frontend{Key: bpf.FrontendKey{Addr: a}, Kind: bpf.FrontendWorkload, ID: backend})
		}
	}
	for _, a := range old {
		if !slices.Contains(want, a) && d.wlFE[a] == uid {
			del = append(del, a)
		}
	}
	return put, adopt, del
}

// wlFrontendCommit records a diff the kernel has taken.
func (d *Dataplane) wlFrontendCommit(uid string, put []bpf.Frontend, adopt, del []netip.Addr) {
	for _, f := range put {
		if owner, ok := d.wlFE[f.Key.Addr]; ok && owner != uid {
			d.log.Warn("address claimed by two workloads, the newer wins", "address", f.Key.Addr, "was", owner, "now", uid)
		}
		d.wlFE[f.Key.Addr] = uid
	}
	for _, a := range adopt {
		delete(d.orphans.wlFE, a)
		d.wlFE[a] = uid
	}
	for _, a := range del {
		delete(d.wlFE, a)
	}
}

// syncWorkloadFrontends points the workload's addresses (want) at its
// backend and drops the ones it no longer has (in old, not in want). An
// address another workload took over since is left to that workload.
func (d *Dataplane) syncWorkloadFrontends(uid string, backend uint32, old, want []netip.Addr) error {
	put, adopt, del := d.wlFrontendDiff(uid, backend, old, want)
	keys := make([]bpf.FrontendKey, len(del))
	for i, a := range del {
		keys[i] = bpf.FrontendKey{Addr: a}
	}
	if err := errors.Join(d.maps.UpsertFrontends(put), d.maps.DeleteFrontends(keys)); err != nil {
		return err
	}
	d.wlFrontendCommit(uid, put, adopt, del)
	return nil
}

// backendOf is the kernel's view of a workload. Local tells the kernel path
// it may connect straight to an HBONE workload; remote ones, and local ones
// whose policies the tunnel's inbound side must enforce, get the tunnel.
func (d *Dataplane) backendOf(w *resolvedWorkload) bpf.Backend {
	local := d.opts.Node.Node != "" && w.topo.Value().Node == d.opts.Node.Node && !w.enforce
	b := bpf.Backend{ID: w.backend, Capacity: w.capacity, HBONE: w.hbone, Local: local, Waypoint: w.waypoint}
	setBackendAddrs(&b, w.addrs)
	return b
}

func setBackendAddrs(b *bpf.Backend, addrs []netip.Addr) {
	for _, a := range addrs {
		a = a.Unmap()
		if a.Is4() && !b.Addr4.IsValid() {
			b.Addr4 = a
		} else if a.Is6() && !b.Addr6.IsValid() {
			b.Addr6 = a
		}
	}
}

func (d *Dataplane) setService(s Service) error {
	rec, existed := d.services[s.Key]
	if !existed {
		rec = &serviceRec{}
	}
	prev := rec.svc
	rec.svc = s
	if err := d.apply(rec); err != nil {
		rec.svc = prev
		return err
	}
	d.services[s.Key] = rec
	d.updateRefs(s.Key, prev.Endpoints, s.Endpoints)
	d.Stats.ServiceWrites.Add(1)
	return nil
}

// deleteService removes a service: frontends first, so no new connect finds
// it, then its tables.
func (d *Dataplane) deleteService(key string) error {
	rec, ok := d.services[key]
	if !ok {
		return nil
	}
	var errs []error
	if _, err := d.syncFrontends(key, rec.frontends, nil); err != nil {
		errs = append(errs, err)
	}
	for _, ls := range rec.sets {
		errs = append(errs, d.dropSet(ls))
	}
	d.updateRefs(key, rec.svc.Endpoints, nil)
	delete(d.services, key)
	return errors.Join(errs...)
}

func (d *Dataplane) updateRefs(key string, old, new []Endpoint) {
	for _, ep := range old {
		keys := slices.DeleteFunc(d.refs[ep.WorkloadUID], func(k string) bool { return k == key })
		if len(keys) == 0 {
			delete(d.refs, ep.WorkloadUID)
		} else {
			d.refs[ep.WorkloadUID] = keys
		}
	}
	for _, ep := range new {
		if keys := d.refs[ep.WorkloadUID]; !slices.Contains(keys, key) {
			d.refs[ep.WorkloadUID] = append(keys, key)
		}
	}
}

// SetNode changes this node's topology (its locality became known, say)
// and recomputes every service's ranks against it.
func (d *Dataplane) SetNode(t Topology) []*ObjectError {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.opts.Node == t {
		return nil
	}
	renamed := d.opts.Node.Node != t.Node
	d.opts.Node = t
	var errs []*ObjectError
	if renamed { // which workloads are local changed
		var bs []bpf.Backend
		for _, uid := range slices.Sorted(maps.Keys(d.workloads)) {
			bs = append(bs, d.backendOf(d.workloads[uid]))
		}
		if err := d.maps.PutBackends(bs); err != nil {
			errs = append(errs, &ObjectError{Kind: "node", Name: t.Node, Err: d.fail("backends of node "+t.Node, err)})
		}
	}
	for _, key := range slices.Sorted(maps.Keys(d.services)) {
		if err := d.apply(d.services[key]); err != nil {
			errs = append(errs, &ObjectError{Kind: "service", Name: key, Err: d.fail("service "+key, err)})
		}
	}
	return errs
}

// --- enrolment ---

// Enroll marks a pod's network namespace as managed: its connections are
// load-balanced from now on. workloadUID may not be known yet.
func (d *Dataplane) Enroll(netnsCookie uint64, workloadUID string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var id uint32
	if w := d.workloads[workloadUID]; w != nil {
		id = w.backend
	}
	if err := d.maps.SetManaged(netnsCookie, id); err != nil {
		return d.fail("enrolment of "+workloadUID, err)
	}
	d.forget(netnsCookie)
	d.enrolled[netnsCookie] = workloadUID
	d.enrolledBy[workloadUID] = append(d.enrolledBy[workloadUID], netnsCookie)
	return nil
}

// forget drops a cookie from the enrolment indexes.
func (d *Dataplane) forget(cookie uint64) {
	uid, ok := d.enrolled[cookie]
	if !ok {
		return
	}
	delete(d.enrolled, cookie)
	cs := slices.DeleteFunc(d.enrolledBy[uid], func(c uint64) bool { return c == cookie })
	if len(cs) == 0 {
		delete(d.enrolledBy, uid)
	} else {
		d.enrolledBy[uid] = cs
	}
}

// Unenroll stops managing a network namespace. Established connections are
// not affected: they were rewritten at connect time.
func (d *Dataplane) Unenroll(netnsCookie uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.forget(netnsCookie)
	return d.maps.DeleteManaged(netnsCookie)
}

// apply makes the kernel serve rec.svc. It is a small transaction:
//  1. write the new alias tables of new and changed sets into their
//     inactive generation (invisible to connects);
//  2. publish: write new sets' values, flip changed sets' generation;
//  3. point the frontends at the sets;
//  4. delete what is no longer referenced.
//
// A failure in 1-3 undoes what was done, leaving the previous state whole.
// Updating an existing element never fails for room, so undo cannot fail
// for the reason the apply did.
func (d *Dataplane) apply(rec *serviceRec) error {
	desired := buildTables(&rec.svc, d.lookup, d.opts.Node)
	old := map[uint16]*liveSet{}
	for _, ls := range rec.sets {
		old[ls.table.ports[0]] = ls
	}

	var tx undoLog
	type change struct {
		ls    *liveSet
		table *tableSet
		fresh bool
		write bool
	}
	var changes []change
	for _, t := range desired {
		ls, ok := old[t.ports[0]]
		if ok {
			delete(old, t.ports[0])
		} else {
			ls = d.adoptSet(rec.svc.VIPs, t.ports[0])
		}
		if ls != nil {
			changes = append(changes, change{ls: ls, table: t, write: !ls.table.equalSlots(t)})
			continue
		}
		id := d.setIDs.get()
		tx.add(func() error { d.setIDs.put(id); return nil })
		changes = append(changes, change{ls: &liveSet{id: id, gen: 1}, table: t, fresh: true, write: true})
	}

	// 1. tables into the inactive generation
	for _, c := range changes {
		if !c.write {
			continue
		}
		eps := slotEntries(c.ls.id, c.ls.gen^1, c.table)
		err := d.maps.PutEndpoints(eps)
		keys := endpointKeys(eps)
		tx.add(func() error { return d.maps.DeleteEndpoints(keys) })
		if err != nil {
			return errors.Join(err, tx.undo())
		}
	}
	// 2. publish
	for _, c := range changes {
		if !c.write {
			continue
		}
		prevVal := serviceValue(c.ls, rec.svc.LB.Mode)
		next := &liveSet{id: c.ls.id, gen: c.ls.gen ^ 1, epoch: c.ls.epoch + 1, table: c.table}
		if err := d.maps.PutServices([]bpf.Service{serviceValue(next, rec.svc.LB.Mode)}); err != nil {
			return errors.Join(err, tx.undo())
		}
		if c.fresh {
			tx.add(func() error { return d.maps.DeleteServices([]uint32{c.ls.id}) })
		} else {
			tx.add(func() error { return d.maps.PutServices([]bpf.Service{prevVal}) })
		}
	}
	// 3. frontends
	desiredFE := map[bpf.FrontendKey]bpf.Frontend{}
	passthrough := rec.svc.LB.Mode == bpf.LBPassthrough
	for _, vip := range rec.svc.VIPs {
		for _, p := range d.opts.Protocols {
			if passthrough {
				for _, sp := range rec.svc.Ports {
					k := bpf.FrontendKey{Addr: vip, Port: sp.ServicePort, Proto: p}
					desiredFE[k] = bpf.Frontend{Key: k, Kind: bpf.FrontendService, Passthrough: true}
				}
				continue
			}
			for _, c := range changes {
				for _, sp := range c.table.ports {
					k := bpf.FrontendKey{Addr: vip, Port: sp, Proto: p}
					desiredFE[k] = bpf.Frontend{Key: k, Kind: bpf.FrontendService, ID: c.ls.id, TargetPort: c.table.target(sp), Waypoint: rec.svc.Waypoint}
				}
			}
		}
	}
	got, err := d.syncFrontends(rec.svc.Key, rec.frontends, desiredFE)
	if err != nil {
		return errors.Join(err, tx.undo())
	}
	rec.frontends = got

	// 4. commit: old generations, sets no longer used
	var sets []*liveSet
	var errs []error
	for _, c := range changes {
		if c.write {
			if !c.fresh {
				errs = append(errs, d.maps.DeleteEndpoints(endpointKeys(slotEntries(c.ls.id, c.ls.gen, c.ls.table))))
			}
			sets = append(sets, &liveSet{id: c.ls.id, gen: c.ls.gen ^ 1, epoch: c.ls.epoch + 1, table: c.table})
		} else {
			c.ls.table = c.table // same slots; ports and targets may differ
			sets = append(sets, c.ls)
		}
	}
	for _, ls := range old {
		errs = append(errs, d.dropSet(ls))
	}
	rec.sets = sets
	return errors.Join(errs...)
}

func serviceValue(ls *liveSet, mode bpf.LBMode) bpf.Service {
	v := bpf.Service{ID: ls.id, Epoch: ls.epoch, Gen: ls.gen, Mode: mode}
	if ls.table != nil {
		v.Counts = ls.table.counts()
	}
	return v
}

func (d *Dataplane) dropSet(ls *liveSet) error {
	err := errors.Join(
		d.maps.DeleteServices([]uint32{ls.id}),
		d.maps.DeleteEndpoints(endpointKeys(slotEntries(ls.id, ls.gen, ls.table))),
	)
	if err == nil {
		d.setIDs.put(ls.id)
	}
	return err
}

func slotEntries(id uint32, gen uint8, t *tableSet) []bpf.Endpoint {
	var out []bpf.Endpoint
	if t == nil {
		return nil
	}
	for f := range t.n {
		for r := range t.n[f] {
			for i, s := range t.bucket(f, r) {
				out = append(out, bpf.Endpoint{
					Key:  bpf.EndpointKey{Service: id, Gen: gen, Family: bpf.Family(f), Rank: uint8(r), Index: uint32(i)},
					Slot: s,
				})
			}
		}
	}
	return out
}

func endpointKeys(es []bpf.Endpoint) []bpf.EndpointKey {
	ks := make([]bpf.EndpointKey, len(es))
	for i, e := range es {
		ks[i] = e.Key
	}
	return ks
}

// syncFrontends moves a service's frontends (owner: its key) from have to
// want: upserts first (new and changed), then deletes (gone), never
// deleting an entry another service has taken over. It returns the
// frontends the service now has. On error it restores what the kernel held
// before and returns have.
func (d *Dataplane) syncFrontends(owner string, have []bpf.FrontendKey, want map[bpf.FrontendKey]bpf.Frontend) ([]bpf.FrontendKey, error) {
	var put []bpf.Frontend
	for k, f := range want {
		cur, ok := d.fe[k]
		switch {
		case ok && cur.val == f && cur.owner == owner:
		case ok && cur.val == f && cur.owner == orphanOwner:
			d.fe[k] = feEntry{owner: owner, val: f} // adopted as it is
		default:
			put = append(put, f)
		}
	}
	slices.SortFunc(put, func(a, b bpf.Frontend) int { return compareFrontendKey(a.Key, b.Key) })
	if err := d.maps.UpsertFrontends(put); err != nil {
		// The batch may have landed in part: put every touched key back.
		var restore []bpf.Frontend
		var drop []bpf.FrontendKey
		for _, f := range put {
			if cur, ok := d.fe[f.Key]; ok {
				restore = append(restore, cur.val)
			} else {
				drop = append(drop, f.Key)
			}
		}
		return have, errors.Join(err, d.maps.UpsertFrontends(restore), d.maps.DeleteFrontends(drop))
	}
	for _, f := range put {
		if cur, ok := d.fe[f.Key]; ok && cur.owner != owner && cur.owner != orphanOwner {
			d.log.Warn("address claimed by two owners, the newer wins", "frontend", f.Key.String(), "was", cur.owner, "now", owner)
		}
		d.fe[f.Key] = feEntry{owner: owner, val: f}
	}
	var del []bpf.FrontendKey
	for _, k := range have {
		if _, keep := want[k]; !keep && d.fe[k].owner == owner {
			del = append(del, k)
			delete(d.fe, k)
		}
	}
	got := slices.SortedFunc(maps.Keys(want), compareFrontendKey)
	return slices.Clip(got), d.maps.DeleteFrontends(del)
}

func compareFrontendKey(a, b bpf.FrontendKey) int {
	if c := a.Addr.Compare(b.Addr); c != 0 {
		return c
	}
	if a.Port != b.Port {
		return int(a.Port) - int(b.Port)
	}
	return int(a.Proto) - int(b.Proto)
}

// undoLog runs compensations in reverse order.
type undoLog []func() error

func (u *undoLog) add(f func() error) { *u = append(*u, f) }

func (u *undoLog) undo() error {
	var errs []error
	for i := len(*u) - 1; i >= 0; i-- {
		errs = append(errs, (*u)[i]())
	}
	*u = nil
	return errors.Join(errs...)
}

// idAlloc hands out small non-zero ids and reuses freed ones.
type idAlloc struct {
	next uint32
	free []uint32
}

func (a *idAlloc) get() uint32 {
	if n := len(a.free); n > 0 {
		id := a.free[n-1]
		a.free = a.free[:n-1]
		return id
	}
	a.next++
	return a.next
}

func (a *idAlloc) put(id uint32) { a.free = append(a.free, id) }

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

// SweepManaged unenrols every network namespace in the kernel that keep
// does not name: pods that went away while no daemon ran.
func (d *Dataplane) SweepManaged(keep map[uint64]bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	ms, err := d.maps.Managed()
	if err != nil {
		return err
	}
	var errs []error
	for cookie := range ms {
		if !keep[cookie] {
			errs = append(errs, d.maps.DeleteManaged(cookie))
			d.forget(cookie)
		}
	}
	return errors.Join(errs...)
}
