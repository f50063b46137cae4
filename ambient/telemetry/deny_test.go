package telemetry

import (
	"bytes"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/bpf"
)

type onePod struct{ uid string }

func (p onePod) PodByNetns(uint64) (string, *os.File, bool) { return p.uid, nil, false }
func (p onePod) WorkloadByNetns(uint64) (string, bool)      { return p.uid, true }

// A connect the kernel refused by the destination's policies (CONN_EV_DENY)
// is a failed connection with ztunnel's DENY flag, and an access-log line
// naming both ends.
func TestKernelDenyEvent(t *testing.T) {
	dir := state.NewStore()
	a := netip.MustParseAddr
	wl := func(uid, name, ip string) *state.Workload {
		w := &state.Workload{UID: uid, Name: name, Addresses: []netip.Addr{a(ip)}, HBONE: true}
		w.SetMeta(state.WorkloadMeta{Namespace: "app", ServiceAccount: name, WorkloadName: name})
		return w
	}
	dir.Apply(state.Update{Workloads: []*state.Workload{wl("src", "sleep", "10.244.1.2"), wl("dst", "near", "10.244.1.12")}})
	var out bytes.Buffer
	log := NewAccessLog(&out, LogConfig{}, nil)
	log.Enabled.Store(true)
	m := NewMetrics(prometheus.NewRegistry())
	k := NewKernelReader(KernelConfig{Pods: onePod{"src"}, Dir: dir, Metrics: m, Log: log})
	k.Handle(bpf.ConnEvent{Kind: bpf.ConnDeny, Direction: bpf.ConnOutbound, NetnsCookie: 7,
		Remote: netip.MustParseAddrPort("10.244.1.12:9090"), BackendID: 3})
	if n := testutil.CollectAndCount(m.Failed); n != 1 {
		t.Fatalf("%d failed series, want 1", n)
	}
	line := out.String()
	for _, want := range []string{`src.addr=10.244.1.2 `, `src.workload="sleep"`, `dst.workload="near"`, "dst.addr=10.244.1.12:9090", "denied at connect"} {
		if !strings.Contains(line, want) {
			t.Errorf("access log %q lacks %q", line, want)
		}
	}
	if k.Open() != 0 {
		t.Error("a denied connection is tracked as open")
	}
}
