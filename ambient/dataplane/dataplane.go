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
	// fe mirrors kmesh_frontend with each entry's owner ("svc:<key>" or
	// "wl:<uid>"). Two owners may claim one address (a ServiceEntry shadowing
	// a Service): the last writer wins, and the loser's cleanup must not
	// delete the winner's entry.
	fe       map[bpf.FrontendKey]feEntry
	enrolled map[uint64]string // netns cookie -> workload UID

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
	frontends map[bpf.FrontendKey]bpf.Frontend
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
		enrolled: map[uint64]string{},
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
	for _, w := range b.Workloads {
		changed, err := d.setWorkload(w)
		failed("workload", w.UID, err)
		if changed {
			for _, k := range d.refs[w.UID] {
				affected[k] = struct{}{}
			}
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

// setWorkload writes a workload's backend entry and frontends. It reports
// whether tables that list it must be recomputed.
func (d *Dataplane) setWorkload(w Workload) (bool, error) {
	prev, existed := d.workloads[w.UID]
	var inKernel *bpf.Backend // what the kernel holds under the backend id, if anything
	var id uint32
	switch {
	case existed:
		id = prev.backend
		b := backendOf(prev)
		inKernel = &b
	default:
		if b, ok := d.adoptBackend(&w); ok {
			id, inKernel = b.ID, &b
		} else {
			id = d.backendIDs.get()
		}
	}
	rec := resolve(&w, id)
	if inKernel == nil || backendOf(&rec) != *inKernel {
		if err := d.maps.PutBackends([]bpf.Backend{backendOf(&rec)}); err != nil {
			if !existed && inKernel == nil {
				d.backendIDs.put(id)
			}
			return false, err
		}
	}
	d.workloads[w.UID] = &rec
	d.Stats.WorkloadWrites.Add(1)

	var oldAddrs []netip.Addr
	if existed {
		oldAddrs = prev.addrs
	}
	err := d.syncWorkloadFrontends(w.UID, id, oldAddrs, rec.addrs)
	if !existed {
		for cookie, uid := range d.enrolled {
			if uid == w.UID {
				err = errors.Join(err, d.maps.SetManaged(cookie, rec.backend))
			}
		}
	}
	return !existed || !prev.lbEqual(&rec), err
}

// syncWorkloadFrontends points the workload's addresses (want) at its
// backend and drops the ones it no longer has (in old, not in want). An
// address another workload took over since is left to that workload.
func (d *Dataplane) syncWorkloadFrontends(uid string, backend uint32, old, want []netip.Addr) error {
	var put []bpf.Frontend
	for _, a := range want {
		if d.wlFE[a] == uid && slices.Contains(old, a) {
			continue // already ours, and a workload keeps its backend id
		}
		if d.adoptWorkloadFrontend(a, backend) {
			d.wlFE[a] = uid
			continue
		}
		put = append(put, bpf.Frontend{Key: bpf.FrontendKey{Addr: a}, Kind: bpf.FrontendWorkload, ID: backend})
	}
	if err := d.maps.UpsertFrontends(put); err != nil {
		return err
	}
	for _, f := range put {
		if owner, ok := d.wlFE[f.Key.Addr]; ok && owner != uid {
			d.log.Warn("address claimed by two workloads, the newer wins", "address", f.Key.Addr, "was", owner, "now", uid)
		}
		d.wlFE[f.Key.Addr] = uid
	}
	var del []bpf.FrontendKey
	for _, a := range old {
		if !slices.Contains(want, a) && d.wlFE[a] == uid {
			del = append(del, bpf.FrontendKey{Addr: a})
			delete(d.wlFE, a)
		}
	}
	return d.maps.DeleteFrontends(del)
}

func backendOf(w *resolvedWorkload) bpf.Backend {
	b := bpf.Backend{ID: w.backend, Capacity: w.capacity, HBONE: w.hbone}
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
		rec = &serviceRec{frontends: map[bpf.FrontendKey]bpf.Frontend{}}
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
	if _, err := d.syncFrontends("svc:"+key, rec.frontends, nil); err != nil {
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
	d.opts.Node = t
	var errs []*ObjectError
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
	d.enrolled[netnsCookie] = workloadUID
	return nil
}

// Unenroll stops managing a network namespace. Established connections are
// not affected: they were rewritten at connect time.
func (d *Dataplane) Unenroll(netnsCookie uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.enrolled, netnsCookie)
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
					desiredFE[k] = bpf.Frontend{Key: k, Kind: bpf.FrontendService, ID: c.ls.id, TargetPort: c.table.targets[sp]}
				}
			}
		}
	}
	prevFE := rec.frontends
	got, err := d.syncFrontends("svc:"+rec.svc.Key, prevFE, desiredFE)
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
	for f := range t.slots {
		for r := range t.slots[f] {
			for i, s := range t.slots[f][r] {
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

// syncFrontends moves owner's frontends from have to want: upserts first
// (new and changed), then deletes (gone), never deleting an entry another
// owner has taken over. It returns the frontends the owner now has. On error
// it restores what the kernel held before and returns have.
func (d *Dataplane) syncFrontends(owner string, have, want map[bpf.FrontendKey]bpf.Frontend) (map[bpf.FrontendKey]bpf.Frontend, error) {
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
	for k := range have {
		if _, keep := want[k]; !keep && d.fe[k].owner == owner {
			del = append(del, k)
			delete(d.fe, k)
		}
	}
	return maps.Clone(want), d.maps.DeleteFrontends(del)
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
			delete(d.enrolled, cookie)
		}
	}
	return errors.Join(errs...)
}
