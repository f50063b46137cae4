package dataplane

import (
	"errors"
	"net/netip"
	"slices"
)

// Virtual service addresses in the kernel (kmesh_vip). The connect
// programs balance a VIP on the ports its service has (kmesh_frontend);
// any other port finds no frontend and, before this map, left the address
// untouched: the connection went out of the node to an address nobody
// answers (a ClusterIP is routed to the default gateway), where it hung
// or, worse, reached whatever the network had there. A VIP listed here is
// refused on those ports instead (ECONNREFUSED, vip_no_port), as the node
// proxy refuses such connections it captures. Only Virtual services' VIPs
// (Kubernetes ClusterIPs) are listed: a ServiceEntry's addresses may be a
// real host's, reachable on ports the entry does not name.

// vipWant is every virtual VIP with the number of services claiming it.
func (d *Dataplane) vipWant() map[netip.Addr]uint32 {
	want := map[netip.Addr]uint32{}
	for _, rec := range d.services {
		if !rec.svc.Virtual {
			continue
		}
		for _, a := range rec.svc.VIPs {
			want[a.Unmap()]++
		}
	}
	return want
}

// syncVIPs writes the VIPs that are new or whose count changed and deletes
// those no service claims any more. A VIP is written after its service's
// frontends (Apply's order), so its ports are never refused for lack of
// them; a deleted service's frontends and VIP go in the same batch, and a
// connect between the two is refused either way.
func (d *Dataplane) syncVIPs() error {
	if d.vipLive == nil {
		// A restarted daemon: the previous one's entries are ours to keep
		// or delete.
		cur, err := d.maps.VIPs()
		if err != nil {
			return err
		}
		d.vipLive = cur
	}
	want := d.vipWant()
	put := map[netip.Addr]uint32{}
	for a, n := range want {
		if d.vipLive[a] != n {
			put[a] = n
		}
	}
	var del []netip.Addr
	for a := range d.vipLive {
		if _, ok := want[a]; !ok {
			del = append(del, a)
		}
	}
	slices.SortFunc(del, netip.Addr.Compare)
	var errs []error
	if err := d.maps.PutVIPs(put); err != nil {
		// Part of the batch may be in; what is in is right (each entry
		// only refuses ports its service lacks). Forget the lot so the
		// next sync writes it again.
		for a := range put {
			delete(d.vipLive, a)
		}
		errs = append(errs, err)
	} else {
		for a, n := range put {
			d.vipLive[a] = n
		}
	}
	if err := d.maps.DeleteVIPs(del); err != nil {
		errs = append(errs, err)
	} else {
		for _, a := range del {
			delete(d.vipLive, a)
		}
	}
	return errors.Join(errs...)
}

// isVIP reports whether the kernel refuses dst's address on ports without a
// frontend (Pick's mirror of decide()'s last lookup).
func (d *Dataplane) isVIP(a netip.Addr) bool {
	_, ok := d.vipLive[a.Unmap()]
	return ok
}
