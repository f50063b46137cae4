package dataplane

import (
	"errors"
	"slices"
)

// Enroll marks a pod's network namespace as managed: its connections are
// load-balanced from now on. workloadUID may not be known yet.
func (d *Dataplane) Enroll(netnsCookie uint64, workloadUID string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var id uint32
	if w := d.workloads[workloadUID]; w != nil {
		id = w.backend
	}
	if err := d.maps.SetManaged(netnsCookie, id); err != nil {
		return d.fail("enrolment of "+workloadUID, err)
	}
	d.forget(netnsCookie)
	d.enrolled[netnsCookie] = workloadUID
	d.enrolledBy[workloadUID] = append(d.enrolledBy[workloadUID], netnsCookie)
	return nil
}

// forget drops a cookie from the enrolment indexes.
func (d *Dataplane) forget(cookie uint64) {
	uid, ok := d.enrolled[cookie]
	if !ok {
		return
	}
	delete(d.enrolled, cookie)
	cs := slices.DeleteFunc(d.enrolledBy[uid], func(c uint64) bool { return c == cookie })
	if len(cs) == 0 {
		delete(d.enrolledBy, uid)
	} else {
		d.enrolledBy[uid] = cs
	}
}

// Unenroll stops managing a network namespace. Established connections are
// not affected: they were rewritten at connect time.
func (d *Dataplane) Unenroll(netnsCookie uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.forget(netnsCookie)
	return d.maps.DeleteManaged(netnsCookie)
}

// SweepManaged unenrols every network namespace in the kernel that keep
// does not name: pods that went away while no daemon ran.
func (d *Dataplane) SweepManaged(keep map[uint64]bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	ms, err := d.maps.Managed()
	if err != nil {
		return err
	}
	var errs []error
	for cookie := range ms {
		if !keep[cookie] {
			errs = append(errs, d.maps.DeleteManaged(cookie))
			d.forget(cookie)
		}
	}
	return errors.Join(errs...)
}
