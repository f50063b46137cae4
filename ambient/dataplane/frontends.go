package dataplane

import (
	"errors"
	"maps"
	"slices"

	"kmesh.dev/kmesh/bpf"
)

// frontendDiff says how to move owner's service frontends from have to
// want, given who owns which entry now: entries to write (new, changed, or
// taken over from another owner), the previous daemon's to adopt as they
// are, and entries to delete (no longer wanted, and still owner's: one
// another service took over is left to it). It changes nothing.
func frontendDiff(owned feTable, owner uint32, have []bpf.FrontendKey, want map[bpf.FrontendKey]bpf.Frontend) (put []bpf.Frontend, adopt, del []bpf.FrontendKey) {
	for k, f := range want {
		cur, ok := owned.get(k)
		switch {
		case ok && cur.val == f && cur.owner == owner:
		case ok && cur.val == f && cur.owner == orphanOwner:
			adopt = append(adopt, k)
		default:
			put = append(put, f)
		}
	}
	slices.SortFunc(put, func(a, b bpf.Frontend) int { return compareFrontendKey(a.Key, b.Key) })
	slices.SortFunc(adopt, compareFrontendKey)
	for _, k := range have {
		if cur, ok := owned.get(k); ok && cur.owner == owner && !keep(want, k) {
			del = append(del, k)
		}
	}
	return put, adopt, del
}

// putFrontends writes what owner's service frontends need to become want
// (new, changed, taken over) and adopts the previous daemon's entries that
// are already right; it returns the entries to delete once the sets they
// point at may go (deleteFrontends). On error it restores what the kernel
// held before: nothing changed.
func (d *Dataplane) putFrontends(owner uint32, have []bpf.FrontendKey, want map[bpf.FrontendKey]bpf.Frontend) (del []bpf.FrontendKey, err error) {
	put, adopt, del := frontendDiff(d.fe, owner, have, want)
	if err := d.maps.UpsertFrontends(put); err != nil {
		// The batch may have landed in part: put every touched key back.
		var restore []bpf.Frontend
		var drop []bpf.FrontendKey
		for _, f := range put {
			if cur, ok := d.fe.get(f.Key); ok {
				restore = append(restore, cur.val)
			} else {
				drop = append(drop, f.Key)
			}
		}
		return nil, errors.Join(err, d.maps.UpsertFrontends(restore), d.maps.DeleteFrontends(drop))
	}
	for _, f := range put {
		if cur, ok := d.fe.get(f.Key); ok && cur.owner != owner && cur.owner != orphanOwner {
			d.log.Warn("address claimed by two owners, the newer wins", "frontend", f.Key.String(), "was", d.serviceKey(cur.owner), "now", d.serviceKey(owner))
		}
		d.fe.set(owner, f)
	}
	for _, k := range adopt {
		d.fe.set(owner, want[k])
	}
	return del, nil
}

// deleteFrontends removes frontends owner no longer wants. On error the
// entries stay recorded as owner's (the kernel may still hold them), so the
// next apply deletes them again; the caller must keep whatever they point
// at until then.
func (d *Dataplane) deleteFrontends(owner uint32, del []bpf.FrontendKey) error {
	if err := d.maps.DeleteFrontends(del); err != nil {
		return err
	}
	for _, k := range del {
		if cur, ok := d.fe.get(k); ok && cur.owner == owner {
			d.fe.del(k)
		}
	}
	return nil
}

// frontendKeys is the sorted keys of want plus stale, the frontends a
// service holds after an apply (stale: ones whose deletion failed).
func frontendKeys(want map[bpf.FrontendKey]bpf.Frontend, stale []bpf.FrontendKey) []bpf.FrontendKey {
	keys := slices.AppendSeq(slices.Clone(stale), maps.Keys(want))
	slices.SortFunc(keys, compareFrontendKey)
	return slices.Clip(slices.Compact(keys))
}

func keep(want map[bpf.FrontendKey]bpf.Frontend, k bpf.FrontendKey) bool {
	_, ok := want[k]
	return ok
}

func (d *Dataplane) serviceKey(idx uint32) string {
	if int(idx) < len(d.byIdx) && d.byIdx[idx] != nil {
		return d.byIdx[idx].svc.Key
	}
	return "?"
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
