package reconcile

import (
	"errors"
	"log/slog"
	"net/netip"
	"testing"

	"istio.io/istio/pkg/workloadapi"
	"istio.io/istio/pkg/workloadapi/security"

	"kmesh.dev/kmesh/ambient/authz"
	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/bpf/bpftest"
)

// Every rule of the reconciler, over a real store and a real dataplane on
// in-memory maps: what the kernel would be told, checked through Pick (the
// kernel's decision over those records).

type env struct {
	store *state.Store
	maps  *bpftest.Maps
	dp    *dataplane.Dataplane
	rec   *Reconciler
}

func newEnv(t *testing.T, node Node) *env {
	quiet := slog.New(slog.DiscardHandler)
	e := &env{store: state.NewStore(), maps: bpftest.New(bpf.MapSizes{})}
	e.dp = dataplane.New(e.maps, dataplane.Options{Node: dataplane.Topology{Node: node.Name, Cluster: node.Cluster, Network: node.Network}, Logger: quiet})
	e.rec = New(e.store, e.dp, node, quiet)
	return e
}

func (e *env) apply(t *testing.T, u state.Update) {
	t.Helper()
	if errs := e.rec.Apply(e.store.Apply(u)); len(errs) > 0 {
		t.Fatal(errs)
	}
}

func (e *env) pick(dst string) dataplane.Decision {
	return e.dp.Pick(netip.MustParseAddrPort(dst), bpf.TCP, 0, 0)
}

type wopt func(*state.Workload, *state.WorkloadMeta)

func onNode(n string) wopt { return func(_ *state.Workload, m *state.WorkloadMeta) { m.Node = n } }
func inZone(z string) wopt {
	return func(_ *state.Workload, m *state.WorkloadMeta) { m.Locality = state.Locality{Region: "r1", Zone: z} }
}
func onNetwork(n string) wopt {
	return func(_ *state.Workload, m *state.WorkloadMeta) { m.Network = n }
}
func inService(key string) wopt {
	return func(w *state.Workload, _ *state.WorkloadMeta) {
		w.Services = append(w.Services, state.ServicePorts{Service: key})
	}
}
func notInMesh() wopt { return func(w *state.Workload, _ *state.WorkloadMeta) { w.HBONE = false } }
func withWaypoint() wopt {
	return func(w *state.Workload, _ *state.WorkloadMeta) {
		w.Waypoint = &state.GatewayAddress{Address: &state.NetworkAddr{Addr: netip.MustParseAddr("10.96.9.9")}, HBONEMTLSPort: 15008}
	}
}

func wl(uid, addr string, opts ...wopt) *state.Workload {
	w := &state.Workload{UID: uid, Name: uid, HBONE: true, Healthy: true, Capacity: 1, Addresses: []netip.Addr{netip.MustParseAddr(addr)}}
	m := state.WorkloadMeta{Namespace: "shop", ServiceAccount: uid, TrustDomain: "cluster.local", ClusterID: "c1"}
	for _, o := range opts {
		o(w, &m)
	}
	w.SetMeta(m)
	return w
}

func svc(name, vip string, lb *state.LoadBalancing) *state.Service {
	return &state.Service{Name: name, Namespace: "shop", Hostname: name + ".shop.svc.cluster.local",
		VIPs: []state.NetworkAddr{{Addr: netip.MustParseAddr(vip)}}, Ports: []state.Port{{ServicePort: 80, TargetPort: 8080}},
		LoadBalancing: lb}
}

const cartKey = "shop/cart.shop.svc.cluster.local"

// The node's locality comes from the workloads on it; FAILOVER ranks
// follow it, and re-rank when it becomes known.
func TestLocality(t *testing.T) {
	e := newEnv(t, Node{Name: "n1", Cluster: "c1"})
	failover := &state.LoadBalancing{Mode: workloadapi.LoadBalancing_FAILOVER,
		RoutingPreference: []state.LBScope{workloadapi.LoadBalancing_REGION, workloadapi.LoadBalancing_ZONE}}
	e.apply(t, state.Update{
		Workloads: []*state.Workload{wl("far", "10.0.2.1", onNode("n2"), inZone("z2"), inService(cartKey)),
			wl("near", "10.0.3.1", onNode("n3"), inZone("z1"), inService(cartKey))},
		Services: []*state.Service{svc("cart", "10.96.0.1", failover)},
	})
	// Locality unknown: both endpoints share rank 0 (nothing matches).
	seen := map[string]bool{}
	for _, slot := range []uint32{0, 1 << 31, ^uint32(0)} {
		seen[e.dp.Pick(netip.MustParseAddrPort("10.96.0.1:80"), bpf.TCP, slot, 0).WorkloadUID] = true
	}
	if !seen["far"] || !seen["near"] {
		t.Fatalf("before the node's locality is known, both endpoints should be drawn: %v", seen)
	}
	// A pod on this node reveals the node's zone: z1. Only near is drawn.
	e.apply(t, state.Update{Workloads: []*state.Workload{wl("local-client", "10.0.1.9", onNode("n1"), inZone("z1"))}})
	for _, slot := range []uint32{0, 1 << 31, ^uint32(0)} {
		if got := e.dp.Pick(netip.MustParseAddrPort("10.96.0.1:80"), bpf.TCP, slot, 0).WorkloadUID; got != "near" {
			t.Fatalf("slot %#x: %s, want near (same zone ranks first)", slot, got)
		}
	}
}

// Addresses of another network are never written: such workloads are
// reached through their network's gateway, which Kmesh does not do yet.
func TestNetworks(t *testing.T) {
	e := newEnv(t, Node{Name: "n1", Cluster: "c1", Network: "net1"})
	remoteVIP := svc("remote", "10.96.0.2", nil)
	remoteVIP.VIPs = []state.NetworkAddr{{Network: "net2", Addr: netip.MustParseAddr("10.96.0.2")}}
	e.apply(t, state.Update{
		Workloads: []*state.Workload{wl("here", "10.0.1.1", onNode("n2"), onNetwork("net1"), inService(cartKey)),
			wl("there", "10.0.9.1", onNode("n9"), onNetwork("net2"), inService(cartKey))},
		Services: []*state.Service{svc("cart", "10.96.0.1", nil), remoteVIP},
	})
	if d := e.pick("10.0.9.1:80"); d.Backend != 0 || d.Rewritten {
		t.Errorf("another network's workload address was written: %+v", d)
	}
	for _, slot := range []uint32{0, ^uint32(0)} {
		if d := e.dp.Pick(netip.MustParseAddrPort("10.96.0.1:80"), bpf.TCP, slot, 0); d.WorkloadUID != "here" {
			t.Errorf("slot %#x: %+v, want only the same network's endpoint", slot, d)
		}
	}
	if d := e.pick("10.96.0.2:80"); d.Rewritten {
		t.Errorf("a VIP of another network was written: %+v", d)
	}
	if _, ok, _ := e.maps.LookupFrontend(bpf.FrontendKey{Addr: netip.MustParseAddr("10.96.0.2"), Port: 80, Proto: bpf.TCP}); ok {
		t.Error("frontend for another network's VIP")
	}
}

// Policies on a local mesh workload send same-node traffic to the kernel's
// authorization (AUTHZ, with entries for every local source) when the
// kernel can hold them, through the tunnel (its inbound side enforces them)
// when not; removing them restores the kernel path. Policies elsewhere
// change nothing.
func TestPoliciesDecidePaths(t *testing.T) {
	e := newEnv(t, Node{Name: "n1", Cluster: "c1"})
	e.apply(t, state.Update{Workloads: []*state.Workload{wl("local", "10.0.1.1", onNode("n1")), wl("remote", "10.0.2.1", onNode("n2")),
		wl("legacy", "10.0.1.2", onNode("n1"), notInMesh()), wl("guarded", "10.0.1.3", onNode("n1"), withWaypoint())}})
	want := func(dst string, p bpf.Path) {
		t.Helper()
		if d := e.pick(dst); d.Path != p {
			t.Errorf("%s: %s, want %s", dst, d.Path, p)
		}
	}
	want("10.0.1.1:80", bpf.PathDirect)
	want("10.0.2.1:80", bpf.PathTunnel)
	want("10.0.1.2:80", bpf.PathPlain)
	want("10.0.1.3:80", bpf.PathWaypoint)

	deny := state.Policy{Authorization: &security.Authorization{Name: "deny", Namespace: "shop", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY}}
	e.apply(t, state.Update{Policies: []state.Policy{deny}})
	want("10.0.1.1:80", bpf.PathAuthz)
	want("10.0.2.1:80", bpf.PathTunnel)
	entries := func() map[bpf.AuthzKey]bpf.Authz {
		as, _ := e.maps.Authz()
		out := map[bpf.AuthzKey]bpf.Authz{}
		for _, a := range as {
			out[a.Key] = a
		}
		return out
	}
	// "local" and "guarded" are this node's mesh workloads: each is a
	// source for each destination with policies (both, in namespace shop).
	if got := entries(); len(got) != 4 {
		t.Errorf("authz entries %v, want 4 (2 destinations x 2 sources, IPv4)", got)
	} else {
		for _, a := range got {
			if !a.Allow || len(a.Except) != 0 {
				t.Errorf("%+v: a DENY policy without rules denies nothing", a)
			}
		}
	}
	want("10.0.1.2:80", bpf.PathPlain) // not in the mesh: nothing to enforce with
	bes, _ := e.maps.Backends()
	for _, b := range bes {
		if b.Addr4 == netip.MustParseAddr("10.0.1.1") && (!b.Policy || !b.Local || !b.HBONE) {
			t.Errorf("the record's inputs: %+v", b)
		}
	}
	e.apply(t, state.Update{RemovedPolicies: []string{"shop/deny"}})
	want("10.0.1.1:80", bpf.PathDirect)
	if got := entries(); len(got) != 0 {
		t.Errorf("authz entries left after the policy went: %v", got)
	}
	// Dry-run policies are reported by the proxy only: the tunnel, counted.
	dry := state.Policy{Authorization: &security.Authorization{Name: "dry", Namespace: "shop", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY, DryRun: true}}
	e.apply(t, state.Update{Policies: []state.Policy{dry}})
	want("10.0.1.1:80", bpf.PathTunnel)
	if r := e.dp.AuthzReasons(); r["local"] != authz.KernelDryRun || e.dp.Stats.AuthzTunnel.Load() != 2 {
		t.Errorf("reasons %v, %d tunnelled: want local dry_run, 2", r, e.dp.Stats.AuthzTunnel.Load())
	}
	e.apply(t, state.Update{RemovedPolicies: []string{"shop/dry"}})
	want("10.0.1.1:80", bpf.PathDirect)

	// A policy in another namespace does not apply.
	other := state.Policy{Authorization: &security.Authorization{Name: "x", Namespace: "other", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY}}
	e.apply(t, state.Update{Policies: []state.Policy{other}})
	want("10.0.1.1:80", bpf.PathDirect)
	global := state.Policy{Authorization: &security.Authorization{Name: "g", Namespace: "istio-system", Scope: security.Scope_GLOBAL, Action: security.Action_ALLOW}}
	e.apply(t, state.Update{Policies: []state.Policy{global}})
	want("10.0.1.1:80", bpf.PathAuthz)
	for _, a := range entries() {
		if a.Allow {
			t.Errorf("%+v: an ALLOW policy without rules allows nothing", a)
		}
	}
}

// Services without a VIP on this network are not intercepted; a service
// removed is removed from the kernel.
func TestServicesWithoutVIPs(t *testing.T) {
	e := newEnv(t, Node{Name: "n1"})
	headless := svc("headless", "10.96.0.5", nil)
	headless.VIPs = nil
	e.apply(t, state.Update{Workloads: []*state.Workload{wl("a", "10.0.1.1", onNode("n2"), inService(cartKey))},
		Services: []*state.Service{svc("cart", "10.96.0.1", nil), headless}})
	if d := e.pick("10.96.0.1:80"); !d.Rewritten {
		t.Fatalf("cart not written: %+v", d)
	}
	if n := e.maps.Len(bpftest.Service); n != 1 {
		t.Errorf("%d sets, want 1 (the headless service has none)", n)
	}
	e.apply(t, state.Update{RemovedAddresses: []string{cartKey}})
	if d := e.pick("10.96.0.1:80"); d.Rewritten || e.maps.Len(bpftest.Service) != 0 {
		t.Fatalf("cart still served after removal: %+v", d)
	}
}

// An object the kernel refuses keeps its previous state, is reported, and
// is applied by Retry once the kernel takes it.
func TestRetry(t *testing.T) {
	e := newEnv(t, Node{Name: "n1"})
	full := &bpf.MapFullError{Map: bpftest.Endpoint, MaxEntries: 1}
	e.maps.Fault = func(op bpftest.Op) error {
		if op.Map == bpftest.Endpoint && op.Kind == "put" {
			return full
		}
		return nil
	}
	errs := e.rec.Apply(e.store.Apply(state.Update{Workloads: []*state.Workload{wl("a", "10.0.1.1", onNode("n2"), inService(cartKey))},
		Services: []*state.Service{svc("cart", "10.96.0.1", nil)}}))
	if !errors.As(errs[cartKey], &full) || e.rec.Failed() != 1 {
		t.Fatalf("want cart refused with a MapFullError, got %v (%d failed)", errs, e.rec.Failed())
	}
	if d := e.pick("10.96.0.1:80"); d.Rewritten {
		t.Fatalf("a refused service is served: %+v", d)
	}
	if errs := e.rec.Retry(); len(errs) != 1 {
		t.Fatalf("retry while the map is still full: %v", errs)
	}
	e.maps.Fault = nil
	if errs := e.rec.Retry(); len(errs) != 0 || e.rec.Failed() != 0 {
		t.Fatalf("retry once there is room: %v (%d failed)", errs, e.rec.Failed())
	}
	if d := e.pick("10.96.0.1:80"); d.WorkloadUID != "a" {
		t.Fatalf("after retry: %+v", d)
	}
	// A later update supersedes a pending retry of the same object.
	e.maps.Fault = func(op bpftest.Op) error {
		if op.Map == bpftest.Endpoint && op.Kind == "put" {
			return full
		}
		return nil
	}
	e.rec.Apply(e.store.Apply(state.Update{Workloads: []*state.Workload{wl("b", "10.0.1.2", onNode("n2"), inService(cartKey))}}))
	if e.rec.Failed() != 1 {
		t.Fatalf("%d failed, want cart", e.rec.Failed())
	}
	e.maps.Fault = nil
	e.apply(t, state.Update{RemovedAddresses: []string{cartKey}})
	if e.rec.Failed() != 0 {
		t.Fatalf("the removed service is still queued for retry: %d", e.rec.Failed())
	}
}
