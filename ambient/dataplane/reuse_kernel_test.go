package dataplane_test

import (
	"fmt"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/bpf"
)

// TestPrivilegedDecideUnderElementReuse: since Linux 6.1 a hash element
// freed by an update or delete is handed to the next insert on that CPU at
// once, so a program still reading it may find another key's value
// (kmesh_maps.h). Two services with disjoint backends (A: 10.1.0.0/24 port
// 8001, B: 10.2.0.0/24 port 8002) are decided over and over through
// BPF_PROG_RUN, each read waiting between its lookup and its copy, while a
// writer on the other CPU replaces every record of both services again and
// again (same contents: nothing changes but which element holds what) and
// deletes and restores their slots and backends. A decision may be refused
// (a record deleted, or changed under it twice), but it must never send a
// connection for one service to anything but that service's backends.
func TestPrivilegedDecideUnderElementReuse(t *testing.T) {
	here := dataplane.Topology{Node: "n1", Network: "net1"}
	far := dataplane.Topology{Node: "n2", Network: "net1"}
	e := newDecideEnv(t, here)

	const perService = 8
	type svcSpec struct {
		name   string
		vip    netip.AddrPort
		lo, hi netip.Addr
		port   uint16
	}
	specs := []svcSpec{
		{"a", netip.MustParseAddrPort("10.96.1.1:80"), netip.MustParseAddr("10.1.0.1"), netip.MustParseAddr("10.1.0.254"), 8001},
		{"b", netip.MustParseAddrPort("10.96.2.1:80"), netip.MustParseAddr("10.2.0.1"), netip.MustParseAddr("10.2.0.254"), 8002},
	}
	var b dataplane.Batch
	for si, s := range specs {
		svc := dataplane.Service{Key: "ns/" + s.name, VIPs: []netip.Addr{s.vip.Addr()},
			Ports: []dataplane.Port{{ServicePort: s.vip.Port(), TargetPort: s.port}}}
		for i := range perService {
			uid := fmt.Sprintf("%s%d", s.name, i)
			// Plaintext workloads elsewhere: the verdict is PLAIN and the
			// destination is rewritten to the backend.
			b.Workloads = append(b.Workloads, dataplane.Workload{UID: uid, Capacity: uint32(1 + i%3), Healthy: true, Topology: far,
				Addrs: []netip.Addr{netip.AddrFrom4([4]byte{10, byte(1 + si), 0, byte(1 + i)})}})
			svc.Endpoints = append(svc.Endpoints, dataplane.Endpoint{WorkloadUID: uid})
		}
		b.Services = append(b.Services, svc)
	}
	if errs := e.dp.Apply(b); len(errs) > 0 {
		t.Fatal(errs)
	}
	k := dumpKernel(t, e.maps)
	for _, s := range specs {
		if r, err := e.dec.Hammer(s.vip, s.lo, s.hi, s.port, 1000, 0); err != nil || r.OK != 1000 {
			t.Fatalf("%s before the writer runs: %+v, %v", s.name, r, err)
		}
	}
	before, err := e.maps.Stats()
	must(t, err)

	stop := make(chan struct{})
	var writes atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the writer
		defer wg.Done()
		var epKeys []bpf.EndpointKey
		for _, ep := range k.ep {
			epKeys = append(epKeys, ep.Key)
		}
		var beIDs []uint32
		for _, be := range k.be {
			beIDs = append(beIDs, be.ID)
		}
		for round := 0; ; round++ {
			select {
			case <-stop:
				return
			default:
			}
			steps := []func() error{
				func() error { return e.maps.UpsertFrontends(k.fe) },
				func() error { return e.maps.PutServices(k.svc) },
				func() error { return e.maps.PutEndpoints(k.ep) },
				func() error { return e.maps.PutBackends(k.be) },
			}
			if round%4 == 3 {
				// Deleted, then written again: the next inserts take the
				// elements just freed.
				steps = append(steps,
					func() error { return e.maps.DeleteEndpoints(epKeys[round%len(epKeys):]) },
					func() error { return e.maps.DeleteBackends(beIDs[round%len(beIDs):]) },
					func() error { return e.maps.PutBackends(k.be) },
					func() error { return e.maps.PutEndpoints(k.ep) })
			}
			for _, step := range steps {
				if err := step(); err != nil {
					t.Error(err)
					return
				}
			}
			writes.Add(1)
		}
	}()

	const (
		duration = 3 * time.Second
		window   = 1000 // bpf_loop iterations between a lookup and its copy
	)
	type tally struct {
		ok, refused, foreign uint64
		last                 netip.AddrPort
	}
	results := make([]tally, len(specs))
	for i, s := range specs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for end := time.Now().Add(duration); time.Now().Before(end); {
				r, err := e.dec.Hammer(s.vip, s.lo, s.hi, s.port, 500, window)
				if err != nil {
					t.Error(err)
					return
				}
				results[i].ok += uint64(r.OK)
				results[i].refused += uint64(r.Refused)
				results[i].foreign += uint64(r.Foreign)
				if r.Foreign > 0 {
					results[i].last = r.LastForeign
				}
			}
		}()
	}
	time.Sleep(duration)
	close(stop)
	wg.Wait()

	after, err := e.maps.Stats()
	must(t, err)
	reused := after["record_reused"] - before["record_reused"]
	t.Logf("%d writer rounds; records caught reused: %d, lookups retried: %d", writes.Load(), reused, after["lb_retry"]-before["lb_retry"])
	for i, s := range specs {
		r := results[i]
		t.Logf("service %s: %d decisions to its backends, %d refused, %d elsewhere", s.name, r.ok, r.refused, r.foreign)
		if r.foreign > 0 {
			t.Errorf("service %s: %d decisions went to a backend it never had (last: %s)", s.name, r.foreign, r.last)
		}
		if r.ok == 0 {
			t.Errorf("service %s: no decision reached its backends", s.name)
		}
	}
	// On more than one CPU the writer runs inside the readers' windows: the
	// test is only worth something if reuse actually happened there.
	if runtime.NumCPU() > 1 && reused == 0 {
		t.Errorf("no record was read after its element was reused: the race was not provoked")
	}
	// Afterwards everything is as before.
	for _, s := range specs {
		if r, err := e.dec.Hammer(s.vip, s.lo, s.hi, s.port, 1000, 0); err != nil || r.OK != 1000 {
			t.Errorf("%s after the writer stopped: %+v, %v", s.name, r, err)
		}
	}
}
