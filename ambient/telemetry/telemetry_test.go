package telemetry

import (
	"strings"
	"testing"
	"time"

	"kmesh.dev/kmesh/bpf"
)

func TestPayload(t *testing.T) {
	for _, c := range []struct {
		name             string
		outbound         bool
		state            uint8
		acked, received  uint64
		wantAck, wantRcv uint64
	}{
		{"client established: SYN acked", true, bpf.TCPEstablished, 101, 50, 100, 50},
		{"server established: nothing extra", false, bpf.TCPEstablished, 100, 50, 100, 50},
		{"client after orderly close (FIN_WAIT2)", true, bpf.TCPFinWait2, 102, 51, 100, 50},
		{"server after LAST_ACK", false, bpf.TCPLastAck, 301, 12346, 300, 12345},
		{"peer FIN only (CLOSE_WAIT)", true, bpf.TCPCloseWait, 11, 6, 10, 5},
		{"failed connect", true, bpf.TCPSynSent, 0, 0, 0, 0},
		{"never below zero", true, bpf.TCPLastAck, 1, 0, 0, 0},
	} {
		a, r := Payload(c.outbound, c.state, c.acked, c.received)
		if a != c.wantAck || r != c.wantRcv {
			t.Errorf("%s: %d %d, want %d %d", c.name, a, r, c.wantAck, c.wantRcv)
		}
	}
}

func TestClassifyAndDirection(t *testing.T) {
	for state, want := range map[uint8]Outcome{bpf.TCPSynSent: Failed, bpf.TCPSynRecv: Failed, bpf.TCPEstablished: Reset,
		bpf.TCPCloseWait: Reset, bpf.TCPFinWait2: Completed, bpf.TCPLastAck: Completed, bpf.TCPClosing: Completed, bpf.TCPFinWait1: Completed} {
		if got := Classify(state); got != want {
			t.Errorf("state %d: %v, want %v", state, got, want)
		}
	}
	if r, s := Directional(true, 10, 20); r != 10 || s != 20 {
		t.Errorf("outbound: %d %d", r, s)
	}
	if r, s := Directional(false, 10, 20); r != 20 || s != 10 {
		t.Errorf("inbound: %d %d", r, s)
	}
}

func TestLabelsUnknownAndPolicy(t *testing.T) {
	c := Conn{Reporter: "source", Src: Peer{Workload: "a"}}
	l := c.Labels()
	if l["destination_workload"] != "unknown" || l["connection_security_policy"] != "unknown" || l["response_flags"] != "-" ||
		l["request_protocol"] != "tcp" || l["source_workload"] != "a" || len(l) != len(Labels) {
		t.Fatalf("%v", l)
	}
	c.MTLS = true
	if c.Labels()["connection_security_policy"] != "mutual_tls" {
		t.Fatal("mTLS not reported")
	}
}

func TestAccessLogFormats(t *testing.T) {
	r := &Record{Time: time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC), Duration: 12 * time.Millisecond, BytesSent: 300, BytesRecv: 12,
		Conn: &Conn{SrcAddr: "10.0.0.1:4000", DstAddr: "10.0.0.2:80", Direction: "outbound", DstService: "echo.demo.svc.cluster.local",
			Src: Peer{Workload: "sleep", Namespace: "demo", Principal: "spiffe://td/ns/demo/sa/sleep"}, Dst: Peer{Workload: "echo", Namespace: "demo"}}}
	want := "2026-12-01T10:00:00.000000Z\tinfo\taccess\tconnection complete\tsrc.addr=10.0.0.1:4000 src.workload=\"sleep\" src.namespace=\"demo\" " +
		"dst.addr=10.0.0.2:80 dst.service=\"echo.demo.svc.cluster.local\" dst.workload=\"echo\" dst.namespace=\"demo\" direction=\"outbound\" " +
		"bytes_sent=300 bytes_recv=12 duration=\"12ms\""
	if got := FormatText(r); got != want {
		t.Errorf("text:\n%s\nwant\n%s", got, want)
	}
	wantJSON := `{"level":"info","time":"2026-12-01T10:00:00.000000Z","scope":"access","message":"connection complete","src.addr":"10.0.0.1:4000",` +
		`"src.workload":"sleep","src.namespace":"demo","dst.addr":"10.0.0.2:80","dst.service":"echo.demo.svc.cluster.local","dst.workload":"echo",` +
		`"dst.namespace":"demo","direction":"outbound","bytes_sent":300,"bytes_recv":12,"duration":"12ms"}`
	if got := FormatJSON(r); got != wantJSON {
		t.Errorf("json:\n%s\nwant\n%s", got, wantJSON)
	}
	r.Conn.MTLS, r.Failed, r.Err, r.Duration = true, true, "refused", -1
	got := FormatText(r)
	for _, w := range []string{"\terror\taccess\tconnection failed\t", `src.identity="spiffe://td/ns/demo/sa/sleep"`, ` error="refused"`} {
		if !contains(got, w) {
			t.Errorf("failed record lacks %q: %s", w, got)
		}
	}
	if contains(got, "duration") {
		t.Errorf("unknown duration printed: %s", got)
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

func TestBucket(t *testing.T) {
	b := Bucket{Rate: 10, Burst: 3}
	now := time.Unix(0, 0)
	n := 0
	for range 10 {
		if b.Take(now) {
			n++
		}
	}
	if n != 3 {
		t.Fatalf("burst: %d, want 3", n)
	}
	if !b.Take(now.Add(100*time.Millisecond)) || b.Take(now.Add(100*time.Millisecond)) {
		t.Fatal("one token per 100 ms at 10/s")
	}
}

func TestAccessLogSwitchAndDrops(t *testing.T) {
	var out syncWriter
	dropped := 0
	l := NewAccessLog(&out, LogConfig{Rate: 1, Burst: 2}, func() { dropped++ })
	r := func() *Record { return &Record{Time: time.Unix(100, 0), Conn: &Conn{}} }
	l.Log(r())
	if out.n != 0 {
		t.Fatal("logged while off")
	}
	l.Enabled.Store(true)
	for range 5 {
		l.Log(r())
	}
	if out.n != 2 || dropped != 3 {
		t.Fatalf("lines %d dropped %d, want 2 and 3", out.n, dropped)
	}
}

type syncWriter struct{ n int }

func (w *syncWriter) Write(p []byte) (int, error) { w.n++; return len(p), nil }
