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
func frontendDiff(owned map[bpf.FrontendKey]feEntry, owner string, have []bpf.FrontendKey, want map[bpf.FrontendKey]bpf.Frontend) (put []bpf.Frontend, adopt, del []bpf.FrontendKey) {
	for k, f := range want {
		cur, ok := owned[k]
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
		if _, keep := want[k]; !keep && owned[k].owner == owner {
			del = append(del, k)
		}
	}
	return put, adopt, del
}

// syncFrontends moves a service's frontends (owner: its key) from have to
// want: upserts first (new and changed), then deletes (gone). It returns
// the frontends the service now has. On error it restores what the kernel
// held before and returns have.
func (d *Dataplane) syncFrontends(owner string, have []bpf.FrontendKey, want map[bpf.FrontendKey]bpf.Frontend) ([]bpf.FrontendKey, error) {
	put, adopt, del := frontendDiff(d.fe, owner, have, want)
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
	for _, k := range adopt {
		d.fe[k] = feEntry{owner: owner, val: want[k]}
	}
	for _, k := range del {
		delete(d.fe, k)
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
