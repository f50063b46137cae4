package agent

import (
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"istio.io/istio/pkg/workloadapi"

	"kmesh.dev/kmesh/ambient/config"
	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/ambient/reconcile"
	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/ambient/xds"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/bpf/bpftest"
)

func addressResource(t *testing.T, a *workloadapi.Address) xds.Resource {
	t.Helper()
	body, err := anypb.New(a)
	if err != nil {
		t.Fatal(err)
	}
	return xds.Resource{Name: "r", TypeURL: body.GetTypeUrl(), Body: body.GetValue()}
}

func TestDecodeAddress(t *testing.T) {
	var wl workloadapi.Workload
	var svc workloadapi.Service
	w := &workloadapi.Workload{Uid: "u1", Name: "n1", Node: "node", Services: map[string]*workloadapi.PortList{"ns/s": {}}}
	r := addressResource(t, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})
	if kind, err := decodeAddress(r, &wl, &svc); err != nil || kind != addressWorkload || !proto.Equal(&wl, w) {
		t.Fatalf("workload: %v %v %v", kind, err, &wl)
	}
	// The reused message holds nothing of the previous resource.
	r = addressResource(t, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{Uid: "u2"}}})
	if kind, err := decodeAddress(r, &wl, &svc); err != nil || kind != addressWorkload || wl.GetName() != "" || wl.GetServices() != nil {
		t.Fatalf("second workload: %v %v %v", kind, err, &wl)
	}
	s := &workloadapi.Service{Name: "s", Namespace: "ns", Hostname: "s.ns"}
	r = addressResource(t, &workloadapi.Address{Type: &workloadapi.Address_Service{Service: s}})
	if kind, err := decodeAddress(r, &wl, &svc); err != nil || kind != addressService || !proto.Equal(&svc, s) {
		t.Fatalf("service: %v %v %v", kind, err, &svc)
	}
	if kind, err := decodeAddress(addressResource(t, &workloadapi.Address{}), &wl, &svc); err != nil || kind != addressNone {
		t.Fatalf("empty address: %v %v", kind, err)
	}
	// A oneof set twice on the wire: the last one counts, as in proto.
	both := slices.Concat(addressResource(t, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}}).Body, r.Body)
	if kind, err := decodeAddress(xds.Resource{TypeURL: r.TypeURL, Body: both}, &wl, &svc); err != nil || kind != addressService {
		t.Fatalf("workload then service: %v %v", kind, err)
	}
	if _, err := decodeAddress(xds.Resource{TypeURL: "type.googleapis.com/istio.workload.Workload", Body: r.Body}, &wl, &svc); err == nil {
		t.Fatal("a resource of another type was decoded")
	}
	bad := protowire.AppendTag(nil, 1, protowire.BytesType)
	bad = append(bad, 5, 1)
	if _, err := decodeAddress(xds.Resource{TypeURL: r.TypeURL, Body: bad}, &wl, &svc); err == nil {
		t.Fatal("a truncated address was decoded")
	}
}

// served is what the kernel does with each frontend: the backend addresses
// and ports a connect to it may reach, whatever ids the maps use.
func served(t *testing.T, m dataplane.Maps) map[string][]string {
	t.Helper()
	fes, err := m.Frontends()
	if err != nil {
		t.Fatal(err)
	}
	svcs, err := m.Services()
	if err != nil {
		t.Fatal(err)
	}
	eps, err := m.Endpoints()
	if err != nil {
		t.Fatal(err)
	}
	bes, err := m.Backends()
	if err != nil {
		t.Fatal(err)
	}
	gen := map[uint32]uint8{}
	for _, s := range svcs {
		gen[s.ID] = s.Gen
	}
	addr := map[uint32]string{}
	for _, b := range bes {
		addr[b.ID] = fmt.Sprintf("%s/%d", b.Addr4, b.Capacity)
	}
	out := map[string][]string{}
	for _, f := range fes {
		var to []string
		if f.Kind == bpf.FrontendWorkload {
			to = []string{addr[f.ID]}
		}
		for _, e := range eps {
			if f.Kind == bpf.FrontendService && e.Key.Service == f.ID && e.Key.Gen == gen[f.ID] {
				to = append(to, fmt.Sprintf("%s:%d r%d", addr[e.Slot.Backend], max(e.Slot.Port, f.TargetPort), e.Key.Rank))
			}
		}
		slices.Sort(to)
		out[f.Key.String()] = slices.Compact(to)
	}
	return out
}

// A change set larger than a chunk is reconciled in chunks; the kernel ends
// up serving exactly what one batch would have made it serve.
func TestChunkedReconcileMatchesOneBatch(t *testing.T) {
	defer func(n int) { reconcileChunk = n }(reconcileChunk)
	reconcileChunk = 16
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	node := reconcile.Node{Name: "node-0", Cluster: "c"}
	newAgent := func() (*Agent, dataplane.Maps) {
		maps := bpftest.New(bpf.MapSizes{})
		a := &Agent{Store: state.NewStore()}
		a.rec = reconcile.New(a.Store, dataplane.New(maps, dataplane.Options{Node: dataplane.Topology{Node: node.Name, Cluster: node.Cluster}, Logger: log}), node, log)
		return a, maps
	}
	chunked, chunkedMaps := newAgent()
	whole, wholeMaps := newAgent()

	svcKey := func(s int) string { return fmt.Sprintf("ns/svc-%d.ns", s) }
	mkSvc := func(s int) *state.Service {
		return &state.Service{Name: fmt.Sprintf("svc-%d", s), Namespace: "ns", Hostname: fmt.Sprintf("svc-%d.ns", s),
			VIPs: []state.NetworkAddr{{Addr: netip.AddrFrom4([4]byte{10, 96, 0, byte(s + 1)})}}, Ports: []state.Port{{ServicePort: 80, TargetPort: 8080}}}
	}
	mkWl := func(i, s int, healthy bool) *state.Workload {
		w := &state.Workload{UID: fmt.Sprintf("c//Pod/ns/pod-%03d", i), Name: fmt.Sprintf("pod-%03d", i), HBONE: true, Healthy: healthy, Capacity: uint32(1 + i%3),
			Addresses: []netip.Addr{netip.AddrFrom4([4]byte{10, 244, byte(i / 200), byte(i%200 + 1)})},
			Services:  []state.ServicePorts{{Service: svcKey(s), Ports: []state.Port{{ServicePort: 80, TargetPort: uint16(8080 + i%2)}}}}}
		w.SetMeta(state.WorkloadMeta{Namespace: "ns", Node: fmt.Sprintf("node-%d", i%3), ClusterID: "c"})
		return w
	}
	apply := func(u func() state.Update) {
		t.Helper()
		chunkedErrs := chunked.reconcile(chunked.Store.Apply(u()))
		wholeErrs := whole.rec.Apply(whole.Store.Apply(u()))
		if len(chunkedErrs) > 0 || len(wholeErrs) > 0 {
			t.Fatalf("kernel refused: chunked %v, whole %v", chunkedErrs, wholeErrs)
		}
		got, want := served(t, chunkedMaps), served(t, wholeMaps)
		if !maps.EqualFunc(got, want, slices.Equal) {
			for k := range want {
				if !slices.Equal(got[k], want[k]) {
					t.Errorf("%s: chunked serves %v, one batch %v", k, got[k], want[k])
				}
			}
			t.FailNow()
		}
	}
	// The first response: 40 services of 5 workloads (some arriving before
	// their service, in one batch with it).
	apply(func() state.Update {
		var u state.Update
		for s := range 40 {
			u.Services = append(u.Services, mkSvc(s))
		}
		for i := range 200 {
			u.Workloads = append(u.Workloads, mkWl(i, i/5, true))
		}
		return u
	})
	first := served(t, chunkedMaps)
	if len(first) != 40*2+200 || len(first["10.96.0.1:80/tcp"]) != 5 {
		t.Fatalf("%d frontends, want %d; svc-0 serves %v", len(first), 40*2+200, first["10.96.0.1:80/tcp"])
	}
	// A large update: workloads move between services, turn unhealthy, go;
	// services go; new ones come with new workloads.
	apply(func() state.Update {
		var u state.Update
		for i := 0; i < 200; i += 2 {
			u.Workloads = append(u.Workloads, mkWl(i, (i/5+7)%40, i%4 != 0))
		}
		for i := 1; i < 200; i += 6 {
			u.RemovedAddresses = append(u.RemovedAddresses, fmt.Sprintf("c//Pod/ns/pod-%03d", i))
		}
		for s := 0; s < 40; s += 9 {
			u.RemovedAddresses = append(u.RemovedAddresses, svcKey(s))
		}
		for s := 40; s < 45; s++ {
			u.Services = append(u.Services, mkSvc(s))
			u.Workloads = append(u.Workloads, mkWl(200+s, s, true))
		}
		return u
	})
	if got := served(t, chunkedMaps); !strings.Contains(fmt.Sprint(got), "10.244.1.45") {
		t.Fatal("new workload not served")
	}
}

// The version sent to istiod is the pinned Istio's (its VERSION file), and
// ISTIO_META_* variables still reach the metadata.
func TestIstioVersionIsThePinnedIstio(t *testing.T) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/istio").Output()
	if err != nil {
		t.Fatalf("locating the istio module: %v", err)
	}
	v, err := os.ReadFile(filepath.Join(strings.TrimSpace(string(out)), "VERSION"))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(v)); got != IstioVersion {
		t.Errorf("IstioVersion is %q, the pinned istio.io/istio is %q: update the constant", IstioVersion, got)
	}
	n, err := xdsNode(&config.Config{PodName: "ztunnel-a", PodNamespace: "istio-system"}, []string{"ISTIO_META_DNS_CAPTURE=true"})
	if err != nil {
		t.Fatal(err)
	}
	m := n.GetMetadata().GetFields()
	if m["ISTIO_VERSION"].GetStringValue() != IstioVersion || m["DNS_CAPTURE"].GetStringValue() != "true" || m["NAME"].GetStringValue() != "ztunnel-a" {
		t.Errorf("node metadata: %v", m)
	}
}
