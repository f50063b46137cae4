package dataplane

import "slices"

// refIndex maps a workload UID to the services (by index) that list it as
// an endpoint. Nearly every workload is in exactly one service, so that one
// is a 4-byte value and the rare others live in a side map: at 100k
// workloads this is ~3 MB instead of ~7.5 MB for a map of slices of keys.
type refIndex struct {
	first map[string]uint32
	more  map[string][]uint32
}

func newRefIndex() refIndex {
	return refIndex{first: map[string]uint32{}, more: map[string][]uint32{}}
}

func (r refIndex) add(uid string, idx uint32) {
	f, ok := r.first[uid]
	switch {
	case !ok:
		r.first[uid] = idx
	case f == idx || slices.Contains(r.more[uid], idx):
	default:
		r.more[uid] = append(r.more[uid], idx)
	}
}

func (r refIndex) del(uid string, idx uint32) {
	f, ok := r.first[uid]
	if !ok {
		return
	}
	rest := r.more[uid]
	if f == idx {
		if len(rest) == 0 {
			delete(r.first, uid)
			return
		}
		r.first[uid], rest = rest[0], rest[1:]
	} else {
		rest = slices.DeleteFunc(rest, func(i uint32) bool { return i == idx })
	}
	if len(rest) == 0 {
		delete(r.more, uid)
	} else {
		r.more[uid] = slices.Clip(rest)
	}
}

// each calls fn for every service listing uid.
func (r refIndex) each(uid string, fn func(idx uint32)) {
	if f, ok := r.first[uid]; ok {
		fn(f)
		for _, i := range r.more[uid] {
			fn(i)
		}
	}
}
