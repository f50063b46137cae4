package state

import (
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"runtime/pprof"
	"testing"

	"istio.io/istio/pkg/workloadapi"
)

// meshWorkload is pod i as istiod describes it, in a mesh of services with
// perService pods each on four nodes (as the sync benchmark builds it).
func meshWorkload(i, perService int) *workloadapi.Workload {
	app := fmt.Sprintf("app-%d", i/perService)
	a := netip.AddrFrom4([4]byte{10, 128 + byte(i>>16), byte(i >> 8), byte(i)})
	return &workloadapi.Workload{Uid: fmt.Sprintf("Kubernetes//Pod/bench/pod-%d", i), Name: fmt.Sprintf("pod-%d", i), Namespace: "bench",
		Addresses: [][]byte{a.AsSlice()}, Node: fmt.Sprintf("node-%d", i%4), ClusterId: "Kubernetes", TunnelProtocol: workloadapi.TunnelProtocol_HBONE,
		Status: workloadapi.WorkloadStatus_HEALTHY, ServiceAccount: app, TrustDomain: "cluster.local", CanonicalName: app,
		CanonicalRevision: "latest", WorkloadName: app, WorkloadType: workloadapi.WorkloadType_DEPLOYMENT,
		Services: map[string]*workloadapi.PortList{fmt.Sprintf("bench/svc-%d.bench.svc.cluster.local", i/perService): {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}}}
}

func heapAlloc() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// workloadBudget is what the store may hold per workload of the mesh, its
// UID included (STATE_HEAP_PROFILE=file writes a heap profile of it).
const workloadBudget = 400

// A node's daemon holds every workload of the mesh: 100k workloads must fit
// in the budget.
func TestWorkloadFootprint(t *testing.T) {
	if testing.Short() {
		t.Skip("converts 100k workloads")
	}
	const n, per = 100000, 10
	before := heapAlloc()
	s := NewStore()
	for c := 0; c < n; c += 1000 {
		var u Update
		for i := c; i < c+1000; i++ {
			u.Workloads = append(u.Workloads, mustWorkload(t, meshWorkload(i, per)))
		}
		s.Apply(u)
	}
	per1 := (heapAlloc() - before) / n
	t.Logf("%d workloads: %d bytes each", n, per1)
	if p := os.Getenv("STATE_HEAP_PROFILE"); p != "" {
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		_ = pprof.WriteHeapProfile(f)
		f.Close()
	}
	if per1 > workloadBudget {
		t.Errorf("%d bytes per workload, budget %d", per1, workloadBudget)
	}
	runtime.KeepAlive(s)
}
