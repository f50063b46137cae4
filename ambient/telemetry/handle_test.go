package telemetry_test

import (
	"io"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"kmesh.dev/kmesh/ambient/telemetry"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/kernel"
)

// benchPods resolves one pod's cookie without a namespace handle.
type benchPods map[uint64]string

func (p benchPods) WorkloadByNetns(c uint64) (string, bool) { uid, ok := p[c]; return uid, ok }
func (p benchPods) PodByNetns(c uint64) (string, *os.File, bool) {
	uid, ok := p[c]
	return uid, nil, ok
}

// BenchmarkHandleConnection is the user-space cost of one kernel-path
// connection between two enrolled pods of the node: four events (open
// and close, at each end), as the daemon's reader handles them. The
// access log is on (the default) behind its rate limit, as in production.
func BenchmarkHandleConnection(b *testing.B) {
	client := workload("sleep", "demo", netip.MustParseAddr("10.244.1.2"))
	server := workload("echo", "demo", netip.MustParseAddr("10.244.1.11"))
	d := dir{client.UID: client, server.UID: server}
	ps := benchPods{1: client.UID, 2: server.UID}
	m := telemetry.NewMetrics(prometheus.NewRegistry())
	al := telemetry.NewAccessLog(io.Discard, telemetry.LogConfig{Enabled: true}, m.LogsDropped.Inc)
	r := telemetry.NewKernelReader(telemetry.KernelConfig{Pods: ps, Dir: d, Metrics: m, Log: al})
	cAddr := netip.MustParseAddrPort("10.244.1.2:40000")
	sAddr := netip.MustParseAddrPort("10.244.1.11:8080")
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		ck := uint64(i)*2 + 100
		now := time.Duration(i) * time.Millisecond
		r.Handle(bpf.ConnEvent{Kind: bpf.ConnOpen, Direction: bpf.ConnOutbound, SockCookie: ck, NetnsCookie: 1, Time: now, Local: cAddr, Remote: sAddr})
		r.Handle(bpf.ConnEvent{Kind: bpf.ConnOpen, Direction: bpf.ConnInbound, SockCookie: ck + 1, NetnsCookie: 2, Time: now, Local: sAddr, Remote: cAddr})
		r.Handle(bpf.ConnEvent{Kind: bpf.ConnClose, Direction: bpf.ConnOutbound, SockCookie: ck, NetnsCookie: 1, Time: now + time.Millisecond,
			Local: cAddr, Remote: sAddr, OldState: bpf.TCPFinWait2, BytesAcked: 100, BytesReceived: 200})
		r.Handle(bpf.ConnEvent{Kind: bpf.ConnClose, Direction: bpf.ConnInbound, SockCookie: ck + 1, NetnsCookie: 2, Time: now + time.Millisecond,
			Local: sAddr, Remote: cAddr, OldState: bpf.TCPLastAck, BytesAcked: 200, BytesReceived: 100})
	}
}

// TestHandleLabelsPerConnection checks the reader's caches never give a
// connection another's labels: two clients of one server, then one
// client's record replaced (a new revision), each counted under its own.
func TestHandleLabelsPerConnection(t *testing.T) {
	a := workload("a", "demo", netip.MustParseAddr("10.244.1.2"))
	b := workload("b", "other", netip.MustParseAddr("10.244.1.3"))
	srv := workload("echo", "demo", netip.MustParseAddr("10.244.1.11"))
	d := dir{a.UID: a, b.UID: b, srv.UID: srv}
	ps := benchPods{1: a.UID, 2: b.UID}
	m := telemetry.NewMetrics(prometheus.NewRegistry())
	var logged syncBuf
	al := telemetry.NewAccessLog(&logged, telemetry.LogConfig{Enabled: true}, nil)
	r := telemetry.NewKernelReader(telemetry.KernelConfig{Pods: ps, Dir: d, Metrics: m, Log: al})
	sAddr := netip.MustParseAddrPort("10.244.1.11:8080")
	conn := func(cookie, netns uint64, local string) {
		l := netip.MustParseAddrPort(local)
		r.Handle(bpf.ConnEvent{Kind: bpf.ConnOpen, Direction: bpf.ConnOutbound, SockCookie: cookie, NetnsCookie: netns, Local: l, Remote: sAddr})
		r.Handle(bpf.ConnEvent{Kind: bpf.ConnClose, Direction: bpf.ConnOutbound, SockCookie: cookie, NetnsCookie: netns,
			Local: l, Remote: sAddr, OldState: bpf.TCPFinWait2, BytesAcked: 10 * cookie, BytesReceived: 1})
	}
	conn(1, 1, "10.244.1.2:40001")
	conn(2, 2, "10.244.1.3:40002")
	conn(3, 1, "10.244.1.2:40003")
	a2 := workload("a", "demo", netip.MustParseAddr("10.244.1.2"))
	meta := a2.Meta()
	meta.CanonicalRevision = "v2"
	a2.SetMeta(meta)
	d[a.UID] = a2
	conn(4, 1, "10.244.1.2:40004")

	want := map[[2]string]float64{{"a", "v1"}: 2, {"b", "v1"}: 1, {"a", "v2"}: 1}
	// Bytes acknowledged include the SYN and our FIN (Payload takes them off).
	wantSent := map[[2]string]float64{{"a", "v1"}: 8 + 28, {"b", "v1"}: 18, {"a", "v2"}: 38}
	for k, n := range want {
		l := prometheus.Labels{"source_workload": k[0], "source_canonical_revision": k[1]}
		if got := sumMatching(t, m.Opened, l); got != n {
			t.Errorf("opened %v = %v, want %v", k, got, n)
		}
		if got := sumMatching(t, m.Closed, l); got != n {
			t.Errorf("closed %v = %v, want %v", k, got, n)
		}
		if got := sumMatching(t, m.Received, l); got != wantSent[k] {
			t.Errorf("bytes from client %v = %v, want %v", k, got, wantSent[k])
		}
	}
	for _, line := range []string{`src.addr=10.244.1.2:40001`, `src.addr=10.244.1.3:40002 src.workload="b" src.namespace="other"`,
		`src.addr=10.244.1.2:40004`, `dst.addr=10.244.1.11:8080`} {
		if !strings.Contains(logged.String(), line) {
			t.Errorf("access log lacks %q:\n%s", line, logged.String())
		}
	}
}

// sumMatching adds the values of a vector's series whose labels include l.
func sumMatching(t *testing.T, cv *prometheus.CounterVec, l prometheus.Labels) float64 {
	t.Helper()
	ch := make(chan prometheus.Metric, 64)
	go func() { cv.Collect(ch); close(ch) }()
	var sum float64
	for m := range ch {
		var pb dto.Metric
		if err := m.Write(&pb); err != nil {
			t.Fatal(err)
		}
		match := 0
		for _, lp := range pb.GetLabel() {
			if v, ok := l[lp.GetName()]; ok && v == lp.GetValue() {
				match++
			}
		}
		if match == len(l) {
			sum += pb.GetCounter().GetValue()
		}
	}
	return sum
}

// TestSocketsOpen follows istio_tcp_sockets_open through opens, closes and
// a connection whose close event was lost (forgotten by the walk).
func TestSocketsOpen(t *testing.T) {
	c := workload("sleep", "demo", netip.MustParseAddr("10.244.1.2"))
	s := workload("echo", "demo", netip.MustParseAddr("10.244.1.11"))
	m := telemetry.NewMetrics(prometheus.NewRegistry())
	r := telemetry.NewKernelReader(telemetry.KernelConfig{Pods: benchPods{1: c.UID, 2: s.UID}, Dir: dir{c.UID: c, s.UID: s}, Metrics: m,
		SocketBytes: func(int) (map[uint64]kernel.TCPBytes, error) { return nil, nil }})
	cAddr, sAddr := netip.MustParseAddrPort("10.244.1.2:40000"), netip.MustParseAddrPort("10.244.1.11:8080")
	gauge := func(reporter string) float64 { return testutil.ToFloat64(m.SocketsOpen.WithLabelValues(reporter)) }
	r.Handle(bpf.ConnEvent{Kind: bpf.ConnOpen, Direction: bpf.ConnOutbound, SockCookie: 1, NetnsCookie: 1, Local: cAddr, Remote: sAddr})
	r.Handle(bpf.ConnEvent{Kind: bpf.ConnOpen, Direction: bpf.ConnInbound, SockCookie: 2, NetnsCookie: 2, Local: sAddr, Remote: cAddr})
	r.Handle(bpf.ConnEvent{Kind: bpf.ConnOpen, Direction: bpf.ConnOutbound, SockCookie: 3, NetnsCookie: 1, Local: cAddr, Remote: sAddr})
	if src, dst := gauge("source"), gauge("destination"); src != 2 || dst != 1 {
		t.Fatalf("open: source %v, destination %v; want 2 and 1", src, dst)
	}
	r.Handle(bpf.ConnEvent{Kind: bpf.ConnClose, Direction: bpf.ConnOutbound, SockCookie: 1, NetnsCookie: 1, Local: cAddr, Remote: sAddr, OldState: bpf.TCPFinWait2})
	r.Handle(bpf.ConnEvent{Kind: bpf.ConnClose, Direction: bpf.ConnInbound, SockCookie: 2, NetnsCookie: 2, Local: sAddr, Remote: cAddr, OldState: bpf.TCPLastAck})
	if src, dst := gauge("source"), gauge("destination"); src != 1 || dst != 0 {
		t.Fatalf("after two closes: source %v, destination %v; want 1 and 0", src, dst)
	}
	// Socket 3's close was lost: two walks that do not find it forget it.
	r.Walk()
	r.Walk()
	if src := gauge("source"); src != 0 {
		t.Fatalf("after the lost close was forgotten: source %v, want 0", src)
	}
}
