package dataplane

import (
	"errors"
	"net/netip"
	"slices"

	"kmesh.dev/kmesh/ambient/path"
	"kmesh.dev/kmesh/bpf"
)

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
		oldAddr []netip.Addr
	}
	items := make([]item, len(ws))
	puts := make([]bpf.Backend, 0, len(ws))
	putIdx := make([]int, 0, len(ws))
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
	fes := make([]feChange, 0, len(ws))
	fePut := make([]bpf.Frontend, 0, len(ws))
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
		d.indexBackend(&rec)
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

// removeWorkload takes a deleted workload out of the kernel: its address
// frontends first (no new connect finds it), then its backend entry. The
// services that listed it have been recomputed without it already; if one
// failed to be, its table still points at the backend, which then stays
// (removeLater) so that its id is not handed to another workload. So does
// one whose address frontends could not be deleted.
func (d *Dataplane) removeWorkload(uid string, rec *resolvedWorkload) error {
	var keep []netip.Addr // the same UID set again in this batch
	if cur := d.workloads[uid]; cur != nil {
		keep = cur.addrs
	}
	ferr := d.syncWorkloadFrontends(uid, rec.backend, rec.addrs, keep)
	if ferr != nil || d.backendInUse(rec) {
		// A frontend the kernel still holds points at the backend too.
		d.removeLater[rec.backend] = rec
		return ferr
	}
	if err := d.maps.DeleteBackends([]uint32{rec.backend}); err != nil {
		d.removeLater[rec.backend] = rec // deleted again by the next Apply
		return err
	}
	if int(rec.backend) < len(d.byBackend) && d.byBackend[rec.backend] == rec {
		d.byBackend[rec.backend] = nil
	}
	d.backendIDs.put(rec.backend)
	return nil
}

// backendInUse reports whether a table in the kernel may still point at
// the workload's backend: a set of a service listing it, or a set waiting
// to be dropped.
func (d *Dataplane) backendInUse(rec *resolvedWorkload) bool {
	uses := func(ls *liveSet) bool {
		if ls.table == nil {
			return false
		}
		for _, s := range ls.table.slots {
			if s.Backend == rec.backend || s.Alias == rec.backend {
				return true
			}
		}
		return false
	}
	inUse := false
	d.refs.each(rec.uid, func(i uint32) {
		if svc := d.byIdx[i]; svc != nil && !inUse {
			for _, ls := range append(svc.sets, svc.retired...) {
				inUse = inUse || uses(ls)
			}
		}
	})
	if inUse {
		return true
	}
	for _, ls := range d.dropLater {
		if uses(ls) {
			return true
		}
	}
	return false
}

func (d *Dataplane) indexBackend(rec *resolvedWorkload) {
	if n := int(rec.backend) + 1; n > len(d.byBackend) {
		d.byBackend = slices.Grow(d.byBackend, n-len(d.byBackend))[:n]
	}
	d.byBackend[rec.backend] = rec
}

// wlFrontendDiff says what makes the workload's address frontends right:
// entries to write, the previous daemon's to adopt as they are, and
// addresses to drop. It changes nothing.
func (d *Dataplane) wlFrontendDiff(uid string, backend uint32, old, want []netip.Addr) (put []bpf.Frontend, adopt, del []netip.Addr) {
	for _, a := range want {
		switch {
		case d.wlFE[addrKey(a)] == backend && slices.Contains(old, a):
			// already ours, and a workload keeps its backend id
		case d.orphans != nil && d.orphans.wlFE[addrKey(a)] == backend && backend != 0:
			adopt = append(adopt, a)
		default:
			put = append(put, bpf.Frontend{Key: bpf.FrontendKey{Addr: a}, Kind: bpf.FrontendWorkload, ID: backend})
		}
	}
	for _, a := range old {
		if !slices.Contains(want, a) && d.wlFE[addrKey(a)] == backend {
			del = append(del, a)
		}
	}
	return put, adopt, del
}

// wlFrontendCommit records a diff the kernel has taken.
func (d *Dataplane) wlFrontendCommit(uid string, put []bpf.Frontend, adopt, del []netip.Addr) {
	for _, f := range put {
		k := addrKey(f.Key.Addr)
		if owner, ok := d.wlFE[k]; ok && owner != f.ID {
			was := ""
			if w := d.backendByID(owner); w != nil {
				was = w.uid
			}
			d.log.Warn("address claimed by two workloads, the newer wins", "address", f.Key.Addr, "was", was, "now", uid)
		}
		d.wlFE[k] = f.ID
	}
	for _, a := range adopt {
		k := addrKey(a)
		d.wlFE[k] = d.orphans.wlFE[k]
		delete(d.orphans.wlFE, k)
	}
	for _, a := range del {
		delete(d.wlFE, addrKey(a))
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

// addrKey is an address as the workload-frontend index keys it: 16 bytes,
// no pointer (a netip.Addr is 24 and points at its zone).
func addrKey(a netip.Addr) [16]byte { return a.Unmap().As16() }

// source is this node, as the path verdicts see it.
func (d *Dataplane) source() path.Node {
	return path.Node{Name: d.opts.Node.Node, Network: d.opts.Node.Network}
}

// backendOf is the kernel's record of a workload: its addresses, and the
// path verdicts (ambient/path) the kernel follows to reach it.
func (d *Dataplane) backendOf(w *resolvedWorkload) bpf.Backend {
	topo := w.topo.Value()
	dst := path.Workload{HBONE: w.hbone, Node: topo.Node, Network: topo.Network, Waypoint: w.waypoint, Policies: w.policies, KernelAuthz: w.kauthz}
	v := path.ForWorkload(d.source(), dst)
	b := bpf.Backend{ID: w.backend, Capacity: w.capacity, PathSvc: v.Service, PathAddr: v.Addr, PathUDP: v.UDP, PathIn: v.Inbound,
		HBONE: w.hbone, Local: path.Local(d.source(), dst), Waypoint: w.waypoint, Policy: w.policies,
		KernelAuthz: v.Service == bpf.PathAuthz || v.Addr == bpf.PathAuthz}
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
