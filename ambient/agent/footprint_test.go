package agent

import (
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"runtime"
	"runtime/pprof"
	"testing"

	"istio.io/istio/pkg/workloadapi"

	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/ambient/reconcile"
	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/bpf/bpftest"
)

func liveHeap() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// BenchmarkMeshFootprint measures what the daemon keeps per workload of a
// mesh of 10k services × 10 pods on 4 nodes (the sync benchmark's): in the
// state, and in the data path (the in-memory maps' own share subtracted).
// FOOTPRINT_HEAP_PROFILE=file writes a heap profile of it all.
//
//	go test -run '^$' -bench MeshFootprint -benchtime 1x ./ambient/agent
func BenchmarkMeshFootprint(b *testing.B) {
	const services, per = 10000, 10
	n := services * per
	sizes := bpf.MapSizes{Frontend: uint32(4*services + 2*n + 1024), Backend: uint32(n + 1024),
		Endpoint: uint32(4*n + 1024), Service: uint32(2*services + 1024)}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	for range b.N {
		before := liveHeap()
		store := state.NewStore()
		all := state.Changes{Workloads: map[string]struct{}{}, Services: map[string]struct{}{}, Policies: map[string]struct{}{}}
		for s := range services {
			var u state.Update
			svc, err := state.ConvertService(&workloadapi.Service{Name: fmt.Sprintf("svc-%d", s), Namespace: "bench",
				Hostname:  fmt.Sprintf("svc-%d.bench.svc.cluster.local", s),
				Addresses: []*workloadapi.NetworkAddress{{Address: netip.AddrFrom4([4]byte{10, 96, byte(s >> 8), byte(s)}).AsSlice()}},
				Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}})
			if err != nil {
				b.Fatal(err)
			}
			u.Services = append(u.Services, svc)
			for i := s * per; i < (s+1)*per; i++ {
				app := fmt.Sprintf("app-%d", s)
				w, err := state.ConvertWorkload(&workloadapi.Workload{Uid: fmt.Sprintf("Kubernetes//Pod/bench/pod-%d", i), Name: fmt.Sprintf("pod-%d", i),
					Namespace: "bench", Addresses: [][]byte{netip.AddrFrom4([4]byte{10, 128 + byte(i>>16), byte(i >> 8), byte(i)}).AsSlice()},
					Node: fmt.Sprintf("node-%d", i%4), ClusterId: "Kubernetes", TunnelProtocol: workloadapi.TunnelProtocol_HBONE,
					Status: workloadapi.WorkloadStatus_HEALTHY, ServiceAccount: app, TrustDomain: "cluster.local", CanonicalName: app,
					CanonicalRevision: "latest", WorkloadName: app, WorkloadType: workloadapi.WorkloadType_DEPLOYMENT,
					Services: map[string]*workloadapi.PortList{svc.Key(): {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}}})
				if err != nil {
					b.Fatal(err)
				}
				u.Workloads = append(u.Workloads, w)
			}
			all.Merge(store.Apply(u))
		}
		inState := liveHeap()
		// The change set waiting for the reconciler is not the state's.
		changes := all.Clone()
		inState -= liveHeap() - inState
		runtime.KeepAlive(changes)
		changes = state.Changes{}
		maps := bpftest.New(sizes)
		a := &Agent{Store: store}
		a.rec = reconcile.New(store, dataplane.New(maps, dataplane.Options{Node: dataplane.Topology{Node: "node-0", Cluster: "Kubernetes"}, Logger: log}), reconcile.Node{Name: "node-0", Cluster: "Kubernetes"}, log)
		if errs := a.reconcile(all); len(errs) > 0 {
			b.Fatalf("%d objects refused", len(errs))
		}
		all = state.Changes{}
		inPlane := liveHeap()
		// The in-memory maps stand for the kernel's: measure a copy of them.
		mapsCopy := copyMaps(b, maps, sizes)
		mapsShare := liveHeap() - inPlane
		if p := os.Getenv("FOOTPRINT_HEAP_PROFILE"); p != "" {
			f, err := os.Create(p)
			if err != nil {
				b.Fatal(err)
			}
			_ = pprof.WriteHeapProfile(f)
			f.Close()
		}
		b.ReportMetric(float64(inState-before)/float64(n), "state-B/workload")
		b.ReportMetric(float64(inPlane-inState-mapsShare)/float64(n), "dataplane-B/workload")
		b.ReportMetric(float64(inPlane-before-mapsShare)/(1<<20), "total-MiB")
		runtime.KeepAlive(a)
		runtime.KeepAlive(mapsCopy)
	}
}

func copyMaps(b *testing.B, m dataplane.Maps, sizes bpf.MapSizes) *bpftest.Maps {
	c := bpftest.New(sizes)
	fes, _ := m.Frontends()
	svcs, _ := m.Services()
	eps, _ := m.Endpoints()
	bes, _ := m.Backends()
	if err := c.UpsertFrontends(fes); err != nil {
		b.Fatal(err)
	}
	if err := c.PutServices(svcs); err != nil {
		b.Fatal(err)
	}
	if err := c.PutEndpoints(eps); err != nil {
		b.Fatal(err)
	}
	if err := c.PutBackends(bes); err != nil {
		b.Fatal(err)
	}
	return c
}
