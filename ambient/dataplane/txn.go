package dataplane

import "errors"

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

// reserve marks ids as taken: the allocator continues above the highest
// and hands out the gaps below it.
func (a *idAlloc) reserve(ids []uint32) {
	used := map[uint32]bool{}
	for _, id := range ids {
		used[id] = true
		a.next = max(a.next, id)
	}
	a.free = a.free[:0]
	for id := a.next; id >= 1; id-- {
		if !used[id] {
			a.free = append(a.free, id)
		}
	}
}
