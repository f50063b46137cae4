package dataplane_test

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/bpf/bpftest"
)

// Unit tests of the dataplane over in-memory maps (bpf/bpftest): what it
// writes, how it rolls back, adopts and shares addresses. No root needed;
// the kernel tier (kernel_test.go) checks the same maps drive real sockets.

var quiet = slog.New(slog.DiscardHandler)

var unitNode = dataplane.Topology{Node: "n1", Cluster: "c1", Locality: dataplane.Locality{Region: "r1", Zone: "z1"}}

func uwl(uid string, hbone bool, node string, addrs ...string) dataplane.Workload {
	w := dataplane.Workload{UID: uid, Capacity: 1, Healthy: true, HBONE: hbone,
		Topology: dataplane.Topology{Node: node, Cluster: "c1", Locality: dataplane.Locality{Region: "r1", Zone: "z1"}}}
	for _, a := range addrs {
		w.Addrs = append(w.Addrs, netip.MustParseAddr(a))
	}
	return w
}

func usvc(key string, vips []string, eps ...string) dataplane.Service {
	s := dataplane.Service{Key: key, Ports: []dataplane.Port{{ServicePort: 80, TargetPort: 8080}, {ServicePort: 443, TargetPort: 8443}}}
	for _, v := range vips {
		s.VIPs = append(s.VIPs, netip.MustParseAddr(v))
	}
	for _, e := range eps {
		s.Endpoints = append(s.Endpoints, dataplane.Endpoint{WorkloadUID: e})
	}
	return s
}

// view renders what the maps make connects do, independent of the ids the
// dataplane chose: per frontend, its verdict and, for a service, the live
// generation's slots resolved to backend addresses and verdicts; per
// workload frontend, its backend's record. Two maps with equal views serve
// every connection alike.
func view(t testing.TB, m *bpftest.Maps) string {
	t.Helper()
	fes, _ := m.Frontends()
	svcs, _ := m.Services()
	eps, _ := m.Endpoints()
	bes, _ := m.Backends()
	backend := map[uint32]bpf.Backend{}
	for _, b := range bes {
		backend[b.ID] = b
	}
	// Slots and frontends name backends by address (the workload), so that
	// each line is one object's state: a service's table, or a workload's
	// record.
	be := func(id uint32, port uint16) string {
		b, ok := backend[id]
		if !ok {
			return fmt.Sprintf("missing(%d)", id)
		}
		return fmt.Sprintf("%s/%s:%d", b.Addr4, b.Addr6, port)
	}
	sets := map[uint32]bpf.Service{}
	for _, s := range svcs {
		sets[s.ID] = s
	}
	var lines []string
	for _, f := range fes {
		line := f.Key.String() + " " + f.Path.String()
		switch f.Kind {
		case bpf.FrontendWorkload:
			line += " workload " + be(f.ID, 0)
		case bpf.FrontendService:
			if f.Path != bpf.PathBalance {
				break
			}
			s, ok := sets[f.ID]
			if !ok {
				line += " missing set"
				break
			}
			line += fmt.Sprintf(" target %d mode %s counts %v:", f.TargetPort, s.Mode, s.Counts)
			var slots []string
			for _, e := range eps {
				if e.Key.Service == f.ID && e.Key.Gen == s.Gen {
					slots = append(slots, fmt.Sprintf("%d.%d.%d=%s|%s|%d", e.Key.Family, e.Key.Rank, e.Key.Index,
						be(e.Slot.Backend, e.Slot.Port), be(e.Slot.Alias, e.Slot.AliasPort), e.Slot.Threshold))
				}
			}
			slices.Sort(slots)
			line += strings.Join(slots, " ")
		}
		lines = append(lines, line)
	}
	for _, b := range bes {
		lines = append(lines, fmt.Sprintf("backend %s/%s capacity %d paths %s,%s,%s", b.Addr4, b.Addr6, b.Capacity, b.PathSvc, b.PathAddr, b.PathUDP))
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

// entries counts every entry of the load-balancing maps: leftovers show up.
func entries(m *bpftest.Maps) [5]int {
	return [5]int{m.Len(bpftest.Managed), m.Len(bpftest.Frontend), m.Len(bpftest.Service), m.Len(bpftest.Endpoint), m.Len(bpftest.Backend)}
}

func TestApplyWritesVerdicts(t *testing.T) {
	m := bpftest.New(bpf.MapSizes{})
	dp := dataplane.New(m, dataplane.Options{Node: unitNode, Logger: quiet})
	local, remote, plain := uwl("local", true, "n1", "10.0.1.1"), uwl("remote", true, "n2", "10.0.2.1"), uwl("plain", false, "n2", "10.0.2.2")
	guarded := uwl("guarded", true, "n1", "10.0.1.2")
	guarded.Policies = true
	wp := usvc("ns/wp", []string{"10.96.0.2"}, "local")
	wp.Waypoint = true
	errs := dp.Apply(dataplane.Batch{Workloads: []dataplane.Workload{local, remote, plain, guarded},
		Services: []dataplane.Service{usvc("ns/web", []string{"10.96.0.1"}, "local", "remote", "plain"), wp}})
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	bes, _ := m.Backends()
	got := map[netip.Addr][3]bpf.Path{}
	for _, b := range bes {
		got[b.Addr4] = [3]bpf.Path{b.PathSvc, b.PathAddr, b.PathUDP}
	}
	want := map[netip.Addr][3]bpf.Path{
		netip.MustParseAddr("10.0.1.1"): {bpf.PathDirect, bpf.PathDirect, bpf.PathDirect},
		netip.MustParseAddr("10.0.2.1"): {bpf.PathTunnel, bpf.PathTunnel, bpf.PathPlain},
		netip.MustParseAddr("10.0.2.2"): {bpf.PathPlain, bpf.PathPlain, bpf.PathPlain},
		netip.MustParseAddr("10.0.1.2"): {bpf.PathTunnel, bpf.PathTunnel, bpf.PathDirect},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("backend verdicts\n got %v\nwant %v", got, want)
	}
	for _, tc := range []struct {
		key  bpf.FrontendKey
		path bpf.Path
	}{
		{bpf.FrontendKey{Addr: netip.MustParseAddr("10.96.0.1"), Port: 80, Proto: bpf.TCP}, bpf.PathBalance},
		{bpf.FrontendKey{Addr: netip.MustParseAddr("10.96.0.2"), Port: 80, Proto: bpf.TCP}, bpf.PathWaypoint},
		{bpf.FrontendKey{Addr: netip.MustParseAddr("10.96.0.2"), Port: 80, Proto: bpf.UDP}, bpf.PathBalance},
	} {
		f, ok, _ := m.LookupFrontend(tc.key)
		if !ok || f.Path != tc.path {
			t.Errorf("frontend %s: %+v (present %v), want path %s", tc.key, f, ok, tc.path)
		}
	}

	// The node learns its name late: verdicts of local workloads change.
	dp2 := dataplane.New(bpftest.New(bpf.MapSizes{}), dataplane.Options{Logger: quiet})
	if err := dp2.SetWorkload(local); err != nil {
		t.Fatal(err)
	}
	if d := dp2.Pick(netip.MustParseAddrPort("10.0.1.1:80"), bpf.TCP, 0, 0); d.Path != bpf.PathTunnel {
		t.Fatalf("node unknown: %s, want tunnel", d.Path)
	}
	dp2.SetNode(unitNode)
	if d := dp2.Pick(netip.MustParseAddrPort("10.0.1.1:80"), bpf.TCP, 0, 0); d.Path != bpf.PathDirect {
		t.Fatalf("node known: %s, want direct", d.Path)
	}
}

// Every write of an update fails in turn (a full map, or any error, at
// each element of each batch): the maps keep serving the old state or the
// new one whole, never a mix; and the same update retried without faults
// converges to exactly what a clean apply writes, with nothing left over.
func TestApplyRollbackAtEveryWrite(t *testing.T) {
	before := dataplane.Batch{
		Workloads: []dataplane.Workload{uwl("a", true, "n1", "10.0.1.1", "fd00::1"), uwl("b", true, "n2", "10.0.2.1"), uwl("c", false, "n2", "10.0.2.2")},
		Services:  []dataplane.Service{usvc("ns/web", []string{"10.96.0.1", "fd00:96::1"}, "a", "b"), usvc("ns/db", []string{"10.96.0.2"}, "c")},
	}
	web2 := usvc("ns/web", []string{"10.96.0.1", "fd00:96::3"}, "a", "b", "c", "d")
	web2.Ports = append(web2.Ports, dataplane.Port{ServicePort: 8080, TargetPort: 8080})
	web2.Endpoints[1].Ports = []dataplane.Port{{ServicePort: 443, TargetPort: 9443}}
	update := dataplane.Batch{
		Workloads:       []dataplane.Workload{uwl("d", true, "n1", "10.0.1.4"), uwl("a", true, "n2", "10.0.1.1", "fd00::1")},
		DeleteWorkloads: []string{"c"},
		Services:        []dataplane.Service{web2, usvc("ns/new", []string{"10.96.0.3"}, "d")},
		DeleteServices:  []string{"ns/db"},
	}
	fresh := func() (*bpftest.Maps, *dataplane.Dataplane) {
		m := bpftest.New(bpf.MapSizes{})
		dp := dataplane.New(m, dataplane.Options{Node: unitNode, Logger: quiet})
		if errs := dp.Apply(before); len(errs) > 0 {
			t.Fatal(errs)
		}
		return m, dp
	}
	// The reference: the update applied cleanly.
	m, dp := fresh()
	old := view(t, m)
	var writes int
	m.Fault = func(bpftest.Op) error { writes++; return nil }
	if errs := dp.Apply(update); len(errs) > 0 {
		t.Fatal(errs)
	}
	want, wantEntries := view(t, m), entries(m)
	if want == old {
		t.Fatal("the update changes nothing: the test would prove nothing")
	}
	var reported, recovered int
	defer func() {
		t.Logf("%d element writes; faults reported %d, recovered by per-object retry %d", writes, reported, recovered)
	}()
	for i := range writes {
		for _, fault := range []error{&bpf.MapFullError{Map: "injected", MaxEntries: 1}, errors.New("injected I/O error")} {
			m, dp := fresh()
			n := 0
			m.Fault = func(op bpftest.Op) error {
				n++
				if n == i+1 {
					t.Logf("write %d fails: %+v", i, op)
					return fault
				}
				return nil
			}
			errs := dp.Apply(update)
			got := view(t, m)
			if len(errs) == 0 {
				// A failed batch is retried element by element; when that
				// succeeds the update is whole and nothing is reported.
				if got != want {
					t.Fatalf("write %d (%v): no error reported, but the update is not whole:\n%s", i, fault, got)
				}
				recovered++
				continue
			}
			reported++
			if got != old && got != want && !servesEither(got, old, want) {
				t.Fatalf("write %d (%v): the maps serve a mix of old and new:\n%s\n--- old:\n%s\n--- new:\n%s", i, fault, got, old, want)
			}
			m.Fault = nil
			if errs := dp.Apply(update); len(errs) > 0 {
				t.Fatalf("write %d: retry: %v", i, errs)
			}
			if got := view(t, m); got != want || entries(m) != wantEntries {
				t.Fatalf("write %d: after retry\n%s\n%v entries, want\n%s\n%v entries", i, got, entries(m), want, wantEntries)
			}
		}
	}
}

// servesEither accepts a view where every line (one service frontend's
// table, one workload's record) is as in old or as in want: objects are
// applied one by one, so a failure may leave some updated and others not,
// but never one object half-written. One exception: a frontend the update
// drops whose deletion failed is still there (reported, and deleted by the
// retry); it must still lead to a live table, never to a missing one.
func servesEither(got, old, want string) bool {
	o := map[string]bool{}
	oldKeys, wantKeys := map[string]bool{}, map[string]bool{}
	key := func(l string) string { return strings.SplitN(l, " ", 2)[0] }
	for _, l := range strings.Split(old, "\n") {
		o[l], oldKeys[key(l)] = true, true
	}
	for _, l := range strings.Split(want, "\n") {
		o[l], wantKeys[key(l)] = true, true
	}
	for _, l := range strings.Split(got, "\n") {
		stale := oldKeys[key(l)] && !wantKeys[key(l)] && !strings.HasPrefix(l, "backend")
		if !o[l] && !(stale && !strings.Contains(l, "missing")) {
			return false
		}
	}
	return true
}

func TestMapFullKeepsPreviousService(t *testing.T) {
	m := bpftest.New(bpf.MapSizes{Endpoint: 5})
	dp := dataplane.New(m, dataplane.Options{Node: unitNode, Logger: quiet})
	ws := []dataplane.Workload{uwl("a", true, "n1", "10.0.1.1"), uwl("b", true, "n1", "10.0.1.2"), uwl("c", true, "n1", "10.0.1.3")}
	if errs := dp.Apply(dataplane.Batch{Workloads: ws, Services: []dataplane.Service{usvc("ns/web", []string{"10.96.0.1"}, "a", "b")}}); len(errs) > 0 {
		t.Fatal(errs)
	}
	old := view(t, m)
	err := dp.SetService(usvc("ns/web", []string{"10.96.0.1"}, "a", "b", "c", "a"))
	var full *bpf.MapFullError
	if !errors.As(err, &full) || full.Map != bpftest.Endpoint {
		t.Fatalf("want a MapFullError naming %s, got %v", bpftest.Endpoint, err)
	}
	if dp.Stats.MapFull.Load() != 1 {
		t.Errorf("map-full counter %d, want 1", dp.Stats.MapFull.Load())
	}
	if got := view(t, m); got != old {
		t.Fatalf("a full map changed what is served:\n%s\nwant\n%s", got, old)
	}
	if m.Len(bpftest.Endpoint) != 2 {
		t.Errorf("%d slots, want the 2 live ones (no half-written generation)", m.Len(bpftest.Endpoint))
	}
}

// After a restart the new daemon adopts what is right and rewrites nothing;
// Sweep removes only what nobody claimed.
func TestAdoptRewritesNothing(t *testing.T) {
	m := bpftest.New(bpf.MapSizes{})
	batch := dataplane.Batch{
		Workloads: []dataplane.Workload{uwl("a", true, "n1", "10.0.1.1", "fd00::1"), uwl("b", true, "n2", "10.0.2.1"), uwl("gone", true, "n2", "10.0.2.9")},
		Services:  []dataplane.Service{usvc("ns/web", []string{"10.96.0.1", "fd00:96::1"}, "a", "b"), usvc("ns/gone", []string{"10.96.0.9"}, "gone")},
	}
	if errs := dataplane.New(m, dataplane.Options{Node: unitNode, Logger: quiet}).Apply(batch); len(errs) > 0 {
		t.Fatal(errs)
	}
	// A crash mid-update left a generation nobody published.
	if err := m.PutEndpoints([]bpf.Endpoint{{Key: bpf.EndpointKey{Service: 1, Gen: 1, Index: 7}, Slot: bpf.EndpointSlot{Backend: 1, Alias: 1}}}); err != nil {
		t.Fatal(err)
	}
	before := view(t, m)

	dp := dataplane.New(m, dataplane.Options{Node: unitNode, Logger: quiet})
	if err := dp.Adopt(); err != nil {
		t.Fatal(err)
	}
	m.ResetCounts()
	again := dataplane.Batch{Workloads: batch.Workloads[:2], Services: batch.Services[:1]}
	if errs := dp.Apply(again); len(errs) > 0 {
		t.Fatal(errs)
	}
	for _, name := range []string{bpftest.Frontend, bpftest.Service, bpftest.Endpoint, bpftest.Backend} {
		if n := m.Writes(name, "put") + m.Writes(name, "delete"); n != 0 {
			t.Errorf("adoption wrote %d elements of %s", n, name)
		}
	}
	if got := view(t, m); got != before {
		t.Fatalf("adoption changed what is served:\n%s\nwant\n%s", got, before)
	}
	if err := dp.Sweep(); err != nil {
		t.Fatal(err)
	}
	fresh := bpftest.New(bpf.MapSizes{})
	if errs := dataplane.New(fresh, dataplane.Options{Node: unitNode, Logger: quiet}).Apply(again); len(errs) > 0 {
		t.Fatal(errs)
	}
	if got, want := view(t, m), view(t, fresh); got != want || entries(m) != entries(fresh) {
		t.Fatalf("after sweep\n%s\n%v entries; a clean daemon writes\n%s\n%v entries", got, entries(m), want, entries(fresh))
	}
	// The adopted daemon carries on: a change is applied as usual.
	if err := dp.SetService(usvc("ns/web", []string{"10.96.0.1", "fd00:96::1"}, "b")); err != nil {
		t.Fatal(err)
	}
	if d := dp.Pick(netip.MustParseAddrPort("10.96.0.1:80"), bpf.TCP, 0, 0); d.To != netip.MustParseAddrPort("10.0.2.1:8080") {
		t.Fatalf("after adoption and a change: %+v", d)
	}
}

// A set whose counts and slots disagree (a crash between writes) is not
// adopted: it is replaced, and swept.
func TestAdoptRefusesInconsistentSet(t *testing.T) {
	m := bpftest.New(bpf.MapSizes{})
	batch := dataplane.Batch{Workloads: []dataplane.Workload{uwl("a", true, "n1", "10.0.1.1")},
		Services: []dataplane.Service{usvc("ns/web", []string{"10.96.0.1"}, "a")}}
	if errs := dataplane.New(m, dataplane.Options{Node: unitNode, Logger: quiet}).Apply(batch); len(errs) > 0 {
		t.Fatal(errs)
	}
	svcs, _ := m.Services()
	bad := svcs[0]
	bad.Counts[bpf.FamilyV4][0] = 5
	if err := m.PutServices([]bpf.Service{bad}); err != nil {
		t.Fatal(err)
	}
	dp := dataplane.New(m, dataplane.Options{Node: unitNode, Logger: quiet})
	if err := dp.Adopt(); err != nil {
		t.Fatal(err)
	}
	if errs := dp.Apply(batch); len(errs) > 0 {
		t.Fatal(errs)
	}
	if err := dp.Sweep(); err != nil {
		t.Fatal(err)
	}
	svcs, _ = m.Services()
	if len(svcs) != 1 || svcs[0].ID == bad.ID || svcs[0].Counts[bpf.FamilyV4][0] != 1 {
		t.Fatalf("sets after adoption: %+v (the inconsistent one was %d)", svcs, bad.ID)
	}
}

// Two owners of one address: the newer wins, and the loser's cleanup
// never removes the winner's entry.
func TestAddressOwnership(t *testing.T) {
	m := bpftest.New(bpf.MapSizes{})
	dp := dataplane.New(m, dataplane.Options{Node: unitNode, Logger: quiet})
	vip := netip.MustParseAddrPort("10.96.0.1:80")
	ws := []dataplane.Workload{uwl("a", true, "n1", "10.0.1.1"), uwl("b", true, "n1", "10.0.1.2")}
	if errs := dp.Apply(dataplane.Batch{Workloads: ws}); len(errs) > 0 {
		t.Fatal(errs)
	}
	to := func() netip.AddrPort { return dp.Pick(vip, bpf.TCP, 0, 0).To }
	mustSet := func(s dataplane.Service) {
		t.Helper()
		if err := dp.SetService(s); err != nil {
			t.Fatal(err)
		}
	}
	mustSet(usvc("ns/k8s", []string{"10.96.0.1"}, "a"))
	mustSet(usvc("ns/entry", []string{"10.96.0.1"}, "b")) // a ServiceEntry shadowing the Service
	if got := to(); got != netip.MustParseAddrPort("10.0.1.2:8080") {
		t.Fatalf("the newer owner should win: %s", got)
	}
	mustSet(usvc("ns/k8s", []string{"10.96.0.1"}, "a")) // the loser changes again: it takes the VIP back
	if got := to(); got != netip.MustParseAddrPort("10.0.1.1:8080") {
		t.Fatalf("the latest writer should win: %s", got)
	}
	if err := dp.DeleteService("ns/entry"); err != nil {
		t.Fatal(err)
	}
	if got := to(); got != netip.MustParseAddrPort("10.0.1.1:8080") {
		t.Fatalf("deleting the loser removed the winner's frontend: %s", got)
	}
	if err := dp.DeleteService("ns/k8s"); err != nil {
		t.Fatal(err)
	}
	if d := dp.Pick(vip, bpf.TCP, 0, 0); d.Rewritten || m.Len(bpftest.Frontend) != 2 {
		t.Fatalf("after deleting both: %+v, %d frontends (want only the 2 workload ones)", d, m.Len(bpftest.Frontend))
	}

	// Workload addresses: a pod IP reused by a new pod before the old one is
	// deleted.
	if err := dp.SetWorkload(uwl("a2", false, "n2", "10.0.1.1")); err != nil {
		t.Fatal(err)
	}
	if d := dp.Pick(netip.MustParseAddrPort("10.0.1.1:80"), bpf.TCP, 0, 0); d.WorkloadUID != "a2" || d.Path != bpf.PathPlain {
		t.Fatalf("the newer workload should own the address: %+v", d)
	}
	if err := dp.DeleteWorkload("a"); err != nil {
		t.Fatal(err)
	}
	if d := dp.Pick(netip.MustParseAddrPort("10.0.1.1:80"), bpf.TCP, 0, 0); d.WorkloadUID != "a2" {
		t.Fatalf("deleting the old workload removed the new one's frontend: %+v", d)
	}
	if f, ok, _ := m.LookupFrontend(bpf.FrontendKey{Addr: netip.MustParseAddr("10.0.1.1")}); !ok || f.Kind != bpf.FrontendWorkload {
		t.Fatalf("kernel frontend of the reused address: %+v %v", f, ok)
	}
}

func TestEnrolment(t *testing.T) {
	m := bpftest.New(bpf.MapSizes{})
	dp := dataplane.New(m, dataplane.Options{Node: unitNode, Logger: quiet})
	if err := dp.Enroll(11, "a"); err != nil { // before the workload is known
		t.Fatal(err)
	}
	if err := dp.SetWorkload(uwl("a", true, "n1", "10.0.1.1")); err != nil {
		t.Fatal(err)
	}
	ms, _ := m.Managed()
	if ms[11] == 0 {
		t.Fatalf("enrolled pod's backend id not filled in once known: %v", ms)
	}
	if err := dp.Enroll(12, "b"); err != nil {
		t.Fatal(err)
	}
	if err := dp.SweepManaged(map[uint64]bool{12: true}); err != nil {
		t.Fatal(err)
	}
	if ms, _ := m.Managed(); len(ms) != 1 || ms[12] != 0 {
		t.Fatalf("after sweep: %v", ms)
	}
	if err := dp.Unenroll(12); err != nil {
		t.Fatal(err)
	}
	if m.Len(bpftest.Managed) != 0 {
		t.Fatal("unenrol left the cookie")
	}
}
