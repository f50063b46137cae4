package state

// hashIndex finds a workload by a key that is one of its own properties
// (its UID, one of its addresses), so the key need not be stored again: a
// slot holds the key's 64-bit hash and the workload's handle, 12 bytes,
// where a Go map entry holds a copy of the key beside the value (a 16-byte
// string header, a 24-byte address) in a table of its own overhead. Open
// addressing with linear probing and backward-shift deletion, at most 7/8
// full. Not safe for concurrent use (the Store's lock guards it).
//
// A slot matches a key when the hashes are equal and the workload holds
// the key: two keys of one workload (two addresses) with equal 64-bit
// hashes would share a slot, a chance of 2^-64 per pair.
type hashIndex[K any] struct {
	slots []hslot
	n     int
	// holds reports whether workload id has key k. It is asked about the
	// workloads of the slots a probe passes whose hash matches.
	holds func(id wid, k K) bool
}

type hslot struct {
	lo, hi uint32 // the key's hash (lo decides where the slot belongs)
	ref    uint32 // handle+1; 0: empty
}

func (s hslot) is(h uint64) bool { return s.lo == uint32(h) && s.hi == uint32(h>>32) }

func (x *hashIndex[K]) len() int { return x.n }

// find returns the slot of key k, or of the empty slot ending its probe.
func (x *hashIndex[K]) find(h uint64, k K) (i int, found bool) {
	mask := len(x.slots) - 1
	for i = int(h) & mask; ; i = (i + 1) & mask {
		s := x.slots[i]
		if s.ref == 0 {
			return i, false
		}
		if s.is(h) && x.holds(wid(s.ref-1), k) {
			return i, true
		}
	}
}

// get returns the workload holding key k (hash h).
func (x *hashIndex[K]) get(h uint64, k K) (wid, bool) {
	if x.n == 0 {
		return 0, false
	}
	i, ok := x.find(h, k)
	return wid(x.slots[i].ref - 1), ok
}

// put makes workload id the one found for key k (hash h): a workload that
// held the key before loses it. id must hold k already.
func (x *hashIndex[K]) put(h uint64, k K, id wid) {
	if (x.n+1)*8 > len(x.slots)*7 {
		x.grow()
	}
	i, found := x.find(h, k)
	if !found {
		x.n++
	}
	x.slots[i] = hslot{lo: uint32(h), hi: uint32(h >> 32), ref: uint32(id) + 1}
}

// del forgets key k (hash h) if workload id is the one found for it. id
// must still hold k (delete before changing the workload).
func (x *hashIndex[K]) del(h uint64, k K, id wid) {
	if x.n == 0 {
		return
	}
	i, found := x.find(h, k)
	if !found || x.slots[i].ref != uint32(id)+1 {
		return
	}
	x.n--
	// Backward shift: move later slots of the run into the hole when the
	// hole lies between their home and them, so probes need no tombstones.
	mask := len(x.slots) - 1
	for j := (i + 1) & mask; x.slots[j].ref != 0; j = (j + 1) & mask {
		home := int(x.slots[j].lo) & mask
		if (j-home)&mask >= (j-i)&mask {
			x.slots[i] = x.slots[j]
			i = j
		}
	}
	x.slots[i] = hslot{}
}

func (x *hashIndex[K]) grow() {
	old := x.slots
	x.slots = make([]hslot, max(16, 2*len(old)))
	mask := len(x.slots) - 1
	for _, s := range old {
		if s.ref == 0 {
			continue
		}
		i := int(s.lo) & mask
		for x.slots[i].ref != 0 {
			i = (i + 1) & mask
		}
		x.slots[i] = s
	}
}
