package dataplane

import (
	"cmp"
	"errors"
	"slices"

	"kmesh.dev/kmesh/ambient/path"
	"kmesh.dev/kmesh/bpf"
)

func (d *Dataplane) setService(s Service) error {
	rec, existed := d.services[s.Key]
	if !existed {
		rec = &serviceRec{idx: d.svcIdxes.get()}
	}
	prev := rec.svc
	rec.svc = s
	err := d.applyService(rec)
	var cleanup *cleanupError
	if err != nil && !errors.As(err, &cleanup) {
		rec.svc = prev
		if !existed {
			d.svcIdxes.put(rec.idx)
		}
		return err
	}
	if !existed {
		d.services[s.Key] = rec
		if n := int(rec.idx) + 1; n > len(d.byIdx) {
			d.byIdx = slices.Grow(d.byIdx, n-len(d.byIdx))[:n]
		}
		d.byIdx[rec.idx] = rec
	}
	d.updateRefs(rec.idx, prev.Endpoints, s.Endpoints)
	d.Stats.ServiceWrites.Add(1)
	return err // nil, or a cleanup that failed after the new version went live
}

// cleanupError is a failure after a service's new version went live
// (deleting what it no longer uses): reported, and retried by later
// applies, but the new version stands.
type cleanupError struct{ err error }

func (e *cleanupError) Error() string { return "cleaning up after the update: " + e.err.Error() }
func (e *cleanupError) Unwrap() error { return e.err }

// deleteService removes a service: frontends first, so no new connect finds
// it, then its tables. When the frontends cannot be deleted the service
// stays (its tables too: a frontend must never point at a set id that may
// be reused) and the error is returned, for the caller to retry.
func (d *Dataplane) deleteService(key string) error {
	rec, ok := d.services[key]
	if !ok {
		return nil
	}
	if err := d.deleteFrontends(rec.idx, rec.frontends); err != nil {
		return err
	}
	rec.frontends = nil
	var errs []error
	for _, ls := range append(rec.sets, rec.retired...) {
		errs = append(errs, d.dropSet(ls))
	}
	d.updateRefs(rec.idx, rec.svc.Endpoints, nil)
	delete(d.services, key)
	d.byIdx[rec.idx] = nil
	d.svcIdxes.put(rec.idx)
	return errors.Join(errs...)
}

func (d *Dataplane) updateRefs(idx uint32, old, new []Endpoint) {
	for _, ep := range old {
		d.refs.del(ep.WorkloadUID, idx)
	}
	for _, ep := range new {
		d.refs.add(ep.WorkloadUID, idx)
	}
}

// setPlan is one load-balancing set of a service, as planned.
type setPlan struct {
	// live is the set as the kernel has it: the service's own, or the
	// previous daemon's (adopted); nil for a new set, whose id is
	// allocated when the plan is carried out.
	live    *liveSet
	adopted bool
	table   *tableSet
	// write: the live slots differ from table (or the set is new), so a
	// new generation is written and published.
	write bool
}

// servicePlan is what it takes to make the kernel serve a service.
type servicePlan struct {
	sets []setPlan
	// drop: sets the service no longer uses.
	drop []*liveSet
}

// planService decides, without touching the kernel or the dataplane's
// records, which sets a service keeps, adopts, rewrites, creates and drops.
// Sets are matched by their first service port: a set serving the same
// ports keeps its id, so frontends need no rewrite when only its slots
// change.
func (d *Dataplane) planService(rec *serviceRec) servicePlan {
	desired := buildTables(&rec.svc, d.lookup, d.opts.Node)
	old := map[uint16]*liveSet{}
	for _, ls := range rec.sets {
		old[ls.table.ports[0]] = ls
	}
	var p servicePlan
	taken := map[uint32]bool{}
	for _, t := range desired {
		if ls, ok := old[t.ports[0]]; ok {
			delete(old, t.ports[0])
			p.sets = append(p.sets, setPlan{live: ls, table: t, write: !ls.table.equalSlots(t)})
			continue
		}
		if ls := d.adoptableSet(rec.svc.VIPs, t.ports[0], taken); ls != nil {
			taken[ls.id] = true
			p.sets = append(p.sets, setPlan{live: ls, adopted: true, table: t, write: !ls.table.equalSlots(t)})
			continue
		}
		p.sets = append(p.sets, setPlan{table: t, write: true})
	}
	for _, ls := range old {
		p.drop = append(p.drop, ls)
	}
	p.drop = append(p.drop, rec.retired...)
	slices.SortFunc(p.drop, func(a, b *liveSet) int { return cmp.Compare(a.id, b.id) })
	return p
}

// serviceFrontends is the frontends a service must have once its sets
// (ids known) are in the kernel, with each service port's path verdict.
func serviceFrontends(svc *Service, sets []setPlan, protocols []bpf.Proto) map[bpf.FrontendKey]bpf.Frontend {
	want := map[bpf.FrontendKey]bpf.Frontend{}
	ps := path.Service{Passthrough: svc.LB.Mode == bpf.LBPassthrough, Waypoint: svc.Waypoint}
	for _, vip := range svc.VIPs {
		for _, proto := range protocols {
			verdict := path.ForService(ps, proto)
			if ps.Passthrough {
				for _, sp := range svc.Ports {
					k := bpf.FrontendKey{Addr: vip, Port: sp.ServicePort, Proto: proto}
					want[k] = bpf.Frontend{Key: k, Kind: bpf.FrontendService, Path: verdict}
				}
				continue
			}
			for _, s := range sets {
				for _, sp := range s.table.ports {
					k := bpf.FrontendKey{Addr: vip, Port: sp, Proto: proto}
					want[k] = bpf.Frontend{Key: k, Kind: bpf.FrontendService, ID: s.live.id, TargetPort: s.table.target(sp), Path: verdict}
				}
			}
		}
	}
	return want
}

// applyService makes the kernel serve rec.svc: it plans, then carries the
// plan out as a small transaction:
//  1. write the new alias tables of new and changed sets into their
//     inactive generation (invisible to connects);
//  2. publish: write new sets' values, flip changed sets' generation;
//  3. point the frontends at the sets;
//  4. delete what is no longer referenced.
//
// A failure in 1-3 undoes what was done, leaving the previous state whole.
// Updating an existing element never fails for room, so undo cannot fail
// for the reason the apply did.
func (d *Dataplane) applyService(rec *serviceRec) error {
	plan := d.planService(rec)
	// Slots of an inactive generation a failed cleanup left behind go
	// first: the next generation is written where they are.
	for _, s := range plan.sets {
		if s.live != nil && len(s.live.leftover) > 0 {
			if err := d.maps.DeleteEndpoints(s.live.leftover); err != nil {
				return err
			}
			s.live.leftover = nil
		}
	}
	var tx undoLog
	fresh := make([]bool, len(plan.sets))
	for i := range plan.sets {
		s := &plan.sets[i]
		if s.live == nil {
			id := d.setIDs.get()
			tx.add(func() error { d.setIDs.put(id); return nil })
			s.live, fresh[i] = &liveSet{id: id, gen: 1}, true
		}
	}
	// 1. tables into the inactive generation
	for _, s := range plan.sets {
		if !s.write {
			continue
		}
		eps := slotEntries(s.live.id, s.live.gen^1, s.table)
		err := d.maps.PutEndpoints(eps)
		keys := endpointKeys(eps)
		tx.add(func() error { return d.maps.DeleteEndpoints(keys) })
		if err != nil {
			return errors.Join(err, tx.undo())
		}
	}
	// 2. publish
	for i, s := range plan.sets {
		if !s.write {
			continue
		}
		prev := serviceValue(s.live, rec.svc.LB.Mode)
		next := &liveSet{id: s.live.id, gen: s.live.gen ^ 1, epoch: s.live.epoch + 1, table: s.table}
		if err := d.maps.PutServices([]bpf.Service{serviceValue(next, rec.svc.LB.Mode)}); err != nil {
			return errors.Join(err, tx.undo())
		}
		if fresh[i] {
			tx.add(func() error { return d.maps.DeleteServices([]uint32{prev.ID}) })
		} else {
			tx.add(func() error { return d.maps.PutServices([]bpf.Service{prev}) })
		}
	}
	// 3. frontends
	want := serviceFrontends(&rec.svc, plan.sets, d.opts.Protocols)
	stale, err := d.putFrontends(rec.idx, rec.frontends, want)
	if err != nil {
		return errors.Join(err, tx.undo())
	}

	// 4. commit: adopted sets leave the orphans; frontends no longer
	// wanted go, then the sets only they pointed at and old generations.
	var sets []*liveSet
	var errs []error
	if err := d.deleteFrontends(rec.idx, stale); err != nil {
		// They may still point at the sets this plan drops: keep those
		// until a later apply deletes the frontends.
		errs = append(errs, err)
		rec.retired, plan.drop = plan.drop, nil
	} else {
		stale, rec.retired = nil, nil
	}
	rec.frontends = frontendKeys(want, stale)
	for i, s := range plan.sets {
		if s.adopted {
			delete(d.orphans.sets, s.live.id)
		}
		ls := s.live
		if s.write {
			next := &liveSet{id: ls.id, gen: ls.gen ^ 1, epoch: ls.epoch + 1, table: s.table}
			if !fresh[i] {
				old := endpointKeys(slotEntries(ls.id, ls.gen, ls.table))
				if err := d.maps.DeleteEndpoints(old); err != nil {
					errs = append(errs, err)
					next.leftover = old // deleted before the next write
				}
			}
			ls = next
		} else {
			ls.table = s.table // same slots; ports and targets may differ
		}
		sets = append(sets, ls)
		d.sets[ls.id] = ls
	}
	for _, ls := range plan.drop {
		errs = append(errs, d.dropSet(ls))
	}
	rec.sets = sets
	if err := errors.Join(errs...); err != nil {
		return &cleanupError{err}
	}
	return nil
}

func serviceValue(ls *liveSet, mode bpf.LBMode) bpf.Service {
	v := bpf.Service{ID: ls.id, Epoch: ls.epoch, Gen: ls.gen, Mode: mode}
	if ls.table != nil {
		v.Counts = ls.table.counts()
	}
	return v
}

// dropSet deletes a set no frontend points at any more. When the kernel
// refuses, the set is kept aside (its id is not reused) and dropped again
// at the next Apply.
func (d *Dataplane) dropSet(ls *liveSet) error {
	err := errors.Join(
		d.maps.DeleteServices([]uint32{ls.id}),
		d.maps.DeleteEndpoints(endpointKeys(slotEntries(ls.id, ls.gen, ls.table))),
		d.maps.DeleteEndpoints(ls.leftover),
	)
	if d.sets[ls.id] == ls {
		delete(d.sets, ls.id)
	}
	if err != nil {
		d.dropLater = append(d.dropLater, ls)
		return err
	}
	d.setIDs.put(ls.id)
	return nil
}

// retryDrops drops again the sets whose deletion failed before.
func (d *Dataplane) retryDrops() error {
	pending := d.dropLater
	d.dropLater = nil
	var errs []error
	for _, ls := range pending {
		errs = append(errs, d.dropSet(ls))
	}
	return errors.Join(errs...)
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
