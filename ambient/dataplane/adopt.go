package dataplane

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"kmesh.dev/kmesh/bpf"
)

// A restarted daemon finds the maps of its predecessor pinned and live:
// connections keep using them while the new daemon learns the state from
// the control plane again. Rewriting everything from scratch would briefly
// point frontends at half-built tables; instead the new daemon adopts what
// is already right and replaces only what differs:
//
//   - a workload adopts the backend id whose addresses it has;
//   - a service adopts the set its VIP's frontend points at, and when the
//     set's live table is already what it would write, writes nothing;
//   - frontends with the right value are adopted in place.
//
// Sweep then removes what nobody adopted: entries of objects that went away
// while no daemon ran, and generations left by a crash mid-update.

// orphanOwner owns frontends read back from the kernel until adopted
// (service indexes start at 1).
const orphanOwner = 0

type orphans struct {
	backends map[backendAddrs]bpf.Backend
	sets     map[uint32]*liveSet
	wlFE     map[[16]byte]uint32 // workload frontends: address (addrKey) -> backend id
}

type backendAddrs struct{ v4, v6 netip.Addr }

// Adopt reads the maps a previous daemon left and makes their contents
// adoptable by the objects this daemon is about to set. Call it once,
// right after New, when the data path was reused.
func (d *Dataplane) Adopt() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	fes, err := d.maps.Frontends()
	if err != nil {
		return err
	}
	svcs, err := d.maps.Services()
	if err != nil {
		return err
	}
	eps, err := d.maps.Endpoints()
	if err != nil {
		return err
	}
	bes, err := d.maps.Backends()
	if err != nil {
		return err
	}
	o := &orphans{backends: map[backendAddrs]bpf.Backend{}, sets: map[uint32]*liveSet{}, wlFE: map[[16]byte]uint32{}}
	var backendIDs, setIDs []uint32
	for _, b := range bes {
		o.backends[backendAddrs{b.Addr4, b.Addr6}] = b
		backendIDs = append(backendIDs, b.ID)
	}
	for _, s := range svcs {
		o.sets[s.ID] = &liveSet{id: s.ID, gen: s.Gen, epoch: s.Epoch, table: &tableSet{}}
		setIDs = append(setIDs, s.ID)
	}
	// Rebuild each live set's table: slots sorted by (family, rank, index)
	// are laid out the way tableSet lays them.
	slices.SortFunc(eps, func(a, b bpf.Endpoint) int {
		return cmp.Or(cmp.Compare(a.Key.Service, b.Key.Service), cmp.Compare(a.Key.Family, b.Key.Family),
			cmp.Compare(a.Key.Rank, b.Key.Rank), cmp.Compare(a.Key.Index, b.Key.Index))
	})
	for _, e := range eps {
		ls := o.sets[e.Key.Service]
		if ls == nil || e.Key.Gen != ls.gen || int(e.Key.Family) >= 2 || int(e.Key.Rank) >= bpf.MaxRanks ||
			e.Key.Index != ls.table.n[e.Key.Family][e.Key.Rank] {
			continue // stray or out of order: swept later, or makes the set unadoptable below
		}
		ls.table.slots = append(ls.table.slots, e.Slot)
		ls.table.n[e.Key.Family][e.Key.Rank]++
	}
	for _, sv := range svcs {
		ls := o.sets[sv.ID]
		if serviceValue(ls, 0).Counts != sv.Counts {
			// Counts and slots disagree (a crash between writes): not
			// adoptable; a fresh set replaces it and Sweep removes it.
			ls.table = nil
		}
	}
	for _, f := range fes {
		if f.Kind == bpf.FrontendWorkload {
			o.wlFE[addrKey(f.Key.Addr)] = f.ID
		} else {
			d.fe.set(orphanOwner, f)
		}
	}
	d.backendIDs.reserve(backendIDs)
	d.setIDs.reserve(setIDs)
	d.orphans = o
	d.log.Info("adopting the kernel state of the previous daemon", "frontends", len(fes), "sets", len(svcs), "backends", len(bes), "slots", len(eps))
	return nil
}

// adoptBackend returns the orphan backend with w's addresses, if any.
func (d *Dataplane) adoptBackend(w *Workload) (bpf.Backend, bool) {
	if d.orphans == nil {
		return bpf.Backend{}, false
	}
	var want bpf.Backend
	setBackendAddrs(&want, w.Addrs)
	k := backendAddrs{want.Addr4, want.Addr6}
	b, ok := d.orphans.backends[k]
	if ok {
		delete(d.orphans.backends, k)
	}
	return b, ok
}

// adoptableSet returns the orphan set the service's frontends for port
// point at, if any and not taken. It changes nothing: the plan that uses it
// adopts it once carried out.
func (d *Dataplane) adoptableSet(vips []netip.Addr, port uint16, taken map[uint32]bool) *liveSet {
	if d.orphans == nil {
		return nil
	}
	for _, vip := range vips {
		for _, p := range d.opts.Protocols {
			cur, ok := d.fe.get(bpf.FrontendKey{Addr: vip, Port: port, Proto: p})
			if !ok || cur.owner != orphanOwner || cur.val.Kind != bpf.FrontendService {
				continue
			}
			if ls, ok := d.orphans.sets[cur.val.ID]; ok && ls.table != nil && !taken[ls.id] {
				return ls
			}
		}
	}
	return nil
}

// Sweep deletes whatever of the previous daemon's state was not adopted.
// Call it once the first full control-plane state has been applied.
func (d *Dataplane) Sweep() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.orphans == nil {
		return nil
	}
	var stale []bpf.FrontendKey
	for k, e := range d.fe {
		if e.owner == orphanOwner {
			stale = append(stale, k.frontendKey())
			delete(d.fe, k)
		}
	}
	for a := range d.orphans.wlFE {
		if _, taken := d.wlFE[a]; !taken {
			stale = append(stale, bpf.FrontendKey{Addr: netip.AddrFrom16(a).Unmap()})
		}
	}
	errs := []error{d.maps.DeleteFrontends(stale)}
	// Live sets are those services hold; every other service value and
	// every slot outside a live set's live generation goes.
	live := map[uint32]uint8{}
	for _, rec := range d.services {
		for _, ls := range rec.sets {
			live[ls.id] = ls.gen
		}
	}
	svcs, err := d.maps.Services()
	errs = append(errs, err)
	var deadSets []uint32
	for _, s := range svcs {
		if _, ok := live[s.ID]; !ok {
			deadSets = append(deadSets, s.ID)
		}
	}
	errs = append(errs, d.maps.DeleteServices(deadSets))
	eps, err := d.maps.Endpoints()
	errs = append(errs, err)
	var deadSlots []bpf.EndpointKey
	for _, e := range eps {
		if gen, ok := live[e.Key.Service]; !ok || gen != e.Key.Gen {
			deadSlots = append(deadSlots, e.Key)
		}
	}
	errs = append(errs, d.maps.DeleteEndpoints(deadSlots))
	var deadBackends []uint32
	for _, b := range d.orphans.backends {
		deadBackends = append(deadBackends, b.ID)
	}
	errs = append(errs, d.maps.DeleteBackends(deadBackends))
	// VIPs of services that went while no daemon ran: kmesh_vip is
	// otherwise reconciled only when a batch changes a service.
	errs = append(errs, d.syncVIPs())
	for _, id := range deadSets {
		d.setIDs.put(id)
	}
	for _, id := range deadBackends {
		d.backendIDs.put(id)
	}
	d.log.Info("swept the previous daemon's leftovers", "frontends", len(stale), "sets", len(deadSets), "slots", len(deadSlots), "backends", len(deadBackends))
	d.orphans = nil
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("sweeping stale kernel state: %w", err)
	}
	return nil
}
