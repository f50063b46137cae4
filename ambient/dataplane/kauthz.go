package dataplane

import (
	"cmp"
	"errors"
	"maps"
	"slices"

	"kmesh.dev/kmesh/ambient/authz"
	"kmesh.dev/kmesh/ambient/path"
	"kmesh.dev/kmesh/bpf"
)

// Same-node authorization in the kernel (kmesh_authz). A local mesh
// workload whose policies the kernel can hold has the AUTHZ verdict; this
// keeps its entries -- its policies' verdict for every local source
// workload, per address family (authz KernelVerdicts) -- equal to what the
// workloads and policies say now. A pair without an entry takes the tunnel,
// which evaluates the same policies, so the order of writes only ever errs
// towards the tunnel: entries of a destination that gains the verdict are
// written after it (connections meanwhile take the tunnel), entries of one
// that loses it are deleted after (nobody reads them any more), and a batch
// the kernel did not take is deleted whole, so no stale allow survives it.

// syncAuthz writes the entries that changed and deletes those nobody
// wants. It costs (local workloads)² evaluations of each destination's
// policies over the ports they name; it runs only when a batch touches
// workloads (a policy change re-applies the local ones).
func (d *Dataplane) syncAuthz() error {
	if d.authzLive == nil {
		// A restarted daemon: the previous one's entries are ours to
		// keep or delete.
		d.authzLive = map[bpf.AuthzKey]bpf.Authz{}
		cur, err := d.maps.Authz()
		if err != nil {
			d.authzLive = nil
			return err
		}
		for _, a := range cur {
			d.authzLive[a.Key] = a
		}
	}
	want, kernel, tunnel := d.authzWant()
	d.Stats.AuthzKernel.Store(uint64(kernel))
	d.Stats.AuthzTunnel.Store(uint64(tunnel))
	var put []bpf.Authz
	for _, k := range slices.SortedFunc(maps.Keys(want), authzKeyCmp) {
		a := want[k]
		if old, ok := d.authzLive[k]; !ok || old.Allow != a.Allow || !slices.Equal(old.Except, a.Except) {
			put = append(put, a)
		}
	}
	var del []bpf.AuthzKey
	for k := range d.authzLive {
		if _, ok := want[k]; !ok {
			del = append(del, k)
		}
	}
	slices.SortFunc(del, authzKeyCmp)
	var errs []error
	if err := d.maps.PutAuthz(put); err != nil {
		// Part of the batch may be in: take all of it out, so that those
		// pairs take the tunnel rather than keep an older verdict.
		keys := make([]bpf.AuthzKey, len(put))
		for i, a := range put {
			keys[i] = a.Key
		}
		if derr := d.maps.DeleteAuthz(keys); derr == nil {
			for _, k := range keys {
				delete(d.authzLive, k)
			}
		} else {
			errs = append(errs, derr)
		}
		d.Stats.AuthzUnfit.Add(uint64(len(put)))
		errs = append(errs, err)
	} else {
		for _, a := range put {
			d.authzLive[a.Key] = a
		}
	}
	if err := d.maps.DeleteAuthz(del); err != nil {
		errs = append(errs, err)
	} else {
		for _, k := range del {
			delete(d.authzLive, k)
		}
	}
	return errors.Join(errs...)
}

// authzWant computes every entry the kernel should hold, and counts the
// local workloads with policies whose verdict is AUTHZ (kernel) or not
// (tunnel).
func (d *Dataplane) authzWant() (want map[bpf.AuthzKey]bpf.Authz, kernel, tunnel int) {
	want = map[bpf.AuthzKey]bpf.Authz{}
	if d.authzWhy == nil {
		d.authzWhy = map[string]string{}
	}
	for uid := range d.authzWhy {
		if d.workloads[uid] == nil {
			delete(d.authzWhy, uid)
		}
	}
	src := d.source()
	var srcs []authz.Peer
	var dsts []*resolvedWorkload
	for _, uid := range slices.Sorted(maps.Keys(d.workloads)) {
		w := d.workloads[uid]
		topo := w.topo.Value()
		if !w.hbone || !path.Local(src, path.Workload{Node: topo.Node}) {
			continue
		}
		srcs = append(srcs, authz.Peer{ID: w.backend, Addrs: w.addrs, Identity: w.ident})
		if !w.policies {
			continue
		}
		if b := d.backendOf(w); b.KernelAuthz {
			dsts = append(dsts, w)
			kernel++
			delete(d.authzWhy, uid)
		} else {
			tunnel++
			if d.authzWhy[uid] != w.kreason {
				d.authzWhy[uid] = w.kreason
				d.log.Info("same-node connections to this workload are authorized by the tunnel, not the kernel",
					"workload", uid, "reason", w.kreason)
			}
		}
	}
	for _, w := range dsts {
		for _, pv := range w.authz.KernelVerdicts(authz.Peer{ID: w.backend, Addrs: w.addrs, Identity: w.ident}, srcs) {
			k := bpf.AuthzKey{Dst: w.backend, Src: pv.Src, Family: bpf.FamilyV4}
			if pv.V6 {
				k.Family = bpf.FamilyV6
			}
			want[k] = bpf.Authz{Key: k, Allow: pv.Allow, Except: pv.Except}
		}
	}
	return want, kernel, tunnel
}

func authzKeyCmp(a, b bpf.AuthzKey) int {
	return cmp.Or(cmp.Compare(a.Dst, b.Dst), cmp.Compare(a.Src, b.Src), cmp.Compare(a.Family, b.Family))
}

// AuthzReasons says, for each local workload with policies that the kernel
// does not evaluate, why (authz.Kernel*): for dumps and logs.
func (d *Dataplane) AuthzReasons() map[string]string {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[string]string{}
	for uid, w := range d.workloads {
		if w.policies && !w.kauthz && path.Local(d.source(), path.Workload{Node: w.topo.Value().Node}) {
			out[uid] = w.kreason
		}
	}
	return out
}
