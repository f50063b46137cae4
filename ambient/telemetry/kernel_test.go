package telemetry_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/ambient/telemetry"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/kerneltest"
	"kmesh.dev/kmesh/integration/podnet"
)

func TestMain(m *testing.M) {
	podnet.RegisterHelper("tel-server", telServer)
	podnet.RegisterHelper("tel-client", telClient)
	podnet.MaybeRunHelper()
	os.Exit(m.Run())
}

// telServer accepts on args[0]; for each connection reads to EOF, then
// answers args[1] bytes and closes.
func telServer(args []string) (any, error) {
	l, err := net.Listen("tcp", args[0])
	if err != nil {
		return nil, err
	}
	answer, _ := strconv.Atoi(args[1])
	for {
		c, err := l.Accept()
		if err != nil {
			return nil, err
		}
		go func() {
			defer c.Close()
			_, _ = io.Copy(io.Discard, c)
			_, _ = c.Write(make([]byte, answer))
		}()
	}
}

// telClient connects to args[0], sends args[1] bytes, waits args[2], half-
// closes and reads the answer: it prints the bytes read, or the error. With
// args[3] it does so that many times, one connection after another (one
// helper process, not one per connection: under -race each costs ~1 s).
func telClient(args []string) (any, error) {
	n, _ := strconv.Atoi(args[1])
	hold, _ := time.ParseDuration(args[2])
	times := 1
	if len(args) > 3 {
		times, _ = strconv.Atoi(args[3])
	}
	var out string
	for range times {
		c, err := net.DialTimeout("tcp", args[0], 3*time.Second)
		if err != nil {
			return "error: " + err.Error(), nil
		}
		if _, err := c.Write(make([]byte, n)); err != nil {
			c.Close()
			return nil, err
		}
		time.Sleep(hold)
		_ = c.(*net.TCPConn).CloseWrite()
		got, err := io.Copy(io.Discard, c)
		c.Close()
		if err != nil {
			return nil, err
		}
		if out != "" && out != fmt.Sprint(got) {
			return fmt.Sprintf("error: read %s, then %d", out, got), nil
		}
		out = fmt.Sprint(got)
	}
	return out, nil
}

type pods map[uint64]struct {
	uid string
	ns  *podnet.Netns
}

func (p pods) WorkloadByNetns(cookie uint64) (string, bool) {
	e, ok := p[cookie]
	return e.uid, ok
}

func (p pods) PodByNetns(cookie uint64) (string, *os.File, bool) {
	e, ok := p[cookie]
	if !ok {
		return "", nil, false
	}
	f, err := e.ns.File()
	if err != nil {
		return "", nil, false
	}
	return e.uid, f, true
}

type dir map[string]*state.Workload

func (d dir) Workload(uid string) *state.Workload { return d[uid] }
func (d dir) WorkloadByAddr(a state.NetworkAddr) *state.Workload {
	for _, w := range d {
		for _, x := range w.Addresses {
			if x == a.Addr {
				return w
			}
		}
	}
	return nil
}
func (d dir) ServiceByVIP(state.NetworkAddr) *state.Service { return nil }

func workload(name, ns string, addr netip.Addr) *state.Workload {
	w := &state.Workload{UID: "c1//Pod/" + ns + "/" + name, Name: name, Addresses: []netip.Addr{addr}}
	w.SetMeta(state.WorkloadMeta{Namespace: ns, WorkloadName: name, ServiceAccount: name, CanonicalName: name, CanonicalRevision: "v1"})
	return w
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

type telFixture struct {
	env            *kerneltest.Env
	client, server *podnet.Pod
	m              *telemetry.Metrics
	log            *syncBuf
	reader         *telemetry.KernelReader
	events         *bpf.ConnEvents
}

func newTelFixture(t *testing.T, sizes bpf.MapSizes, interval time.Duration) *telFixture {
	return newTelFixtureWith(t, bpf.Config{Sizes: sizes}, interval)
}

func newTelFixtureWith(t *testing.T, cfg bpf.Config, interval time.Duration) *telFixture {
	env := kerneltest.New(t, cfg)
	node, err := podnet.NewNode("n1", netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("fd00:10:244:1::/64"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { node.Close() })
	f := &telFixture{env: env, log: &syncBuf{}}
	f.client, err = node.AddPod("client", netip.MustParseAddr("10.244.1.2"), netip.MustParseAddr("fd00:10:244:1::2"))
	if err != nil {
		t.Fatal(err)
	}
	f.server, err = node.AddPod("server", netip.MustParseAddr("10.244.1.11"), netip.MustParseAddr("fd00:10:244:1::11"))
	if err != nil {
		t.Fatal(err)
	}
	d := dir{}
	ps := pods{}
	dp := dataplane.New(env.DP.Maps, dataplane.Options{Node: dataplane.Topology{Node: "n1", Cluster: "c1"}})
	for _, p := range []struct {
		pod  *podnet.Pod
		name string
	}{{f.client, "sleep"}, {f.server, "echo"}} {
		w := workload(p.name, "demo", p.pod.IPv4)
		d[w.UID] = w
		cookie, err := p.pod.NS.Cookie()
		if err != nil {
			t.Fatal(err)
		}
		ps[cookie] = struct {
			uid string
			ns  *podnet.Netns
		}{w.UID, p.pod.NS}
		if err := dp.Enroll(cookie, w.UID); err != nil {
			t.Fatal(err)
		}
	}
	f.m = telemetry.NewMetrics(prometheus.NewRegistry())
	f.events, err = env.DP.Maps.OpenConnEvents()
	if err != nil {
		t.Fatal(err)
	}
	al := telemetry.NewAccessLog(f.log, telemetry.LogConfig{Enabled: true}, f.m.LogsDropped.Inc)
	f.reader = telemetry.NewKernelReader(telemetry.KernelConfig{Events: f.events, Pods: ps, Dir: d, Metrics: f.m, Log: al, Interval: interval,
		SpliceReceived: env.DP.Maps.SpliceReceived})
	cmd := exec.Command("/proc/self/exe")
	cmd.Env = append(os.Environ(), podnet.HelperEnv("tel-server"))
	cmd.Args = []string{"/proc/self/exe", ":8080", "300"}
	if err := f.server.Start(cmd, env.Cgroup); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return f
}

func (f *telFixture) connect(t *testing.T, addr string, n int, hold time.Duration) string {
	t.Helper()
	return f.connectTimes(t, addr, n, hold, 1)
}

// connectTimes is connect made times over, one connection after another,
// from one helper process.
func (f *telFixture) connectTimes(t *testing.T, addr string, n int, hold time.Duration, times int) string {
	t.Helper()
	var out string
	if err := f.client.Helper(f.env.Cgroup, &out, "tel-client", addr, strconv.Itoa(n), hold.String(), strconv.Itoa(times)); err != nil {
		t.Fatal(err)
	}
	return out
}

// waitServer retries until the server pod listens.
func (f *telFixture) waitServer(t *testing.T) {
	for i := 0; ; i++ {
		if out := f.connect(t, "10.244.1.11:8080", 0, 0); !strings.HasPrefix(out, "error") {
			return
		}
		if i > 50 {
			t.Fatal("server pod never listened")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func labels(reporter string) prometheus.Labels {
	c := telemetry.Conn{Reporter: reporter,
		Src: telemetry.Peer{Workload: "sleep", Namespace: "demo", Principal: "spiffe://cluster.local/ns/demo/sa/sleep", CanonicalService: "sleep", CanonicalRev: "v1", App: "sleep", Version: "v1"},
		Dst: telemetry.Peer{Workload: "echo", Namespace: "demo", Principal: "spiffe://cluster.local/ns/demo/sa/echo", CanonicalService: "echo", CanonicalRev: "v1", App: "echo", Version: "v1"}}
	return c.Labels()
}

func counter(cv *prometheus.CounterVec, l prometheus.Labels) float64 {
	return testutil.ToFloat64(cv.With(l))
}

// TestPrivilegedKernelPathTelemetry opens real connections between two
// enrolled pods on the kernel path and checks what both ends report.
func TestPrivilegedKernelPathTelemetry(t *testing.T) {
	f := newTelFixture(t, bpf.MapSizes{}, 300*time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); f.reader.Run(ctx) }()
	defer func() { cancel(); <-done }()
	f.waitServer(t)
	src, dst := labels("source"), labels("destination")
	// waitServer's connections are reported first.
	eventually(t, func() error {
		if o, c := counter(f.m.Opened, src), counter(f.m.Closed, src); o != c || o == 0 {
			return fmt.Errorf("opened %v, closed %v", o, c)
		}
		return nil
	})
	base := func(cv *prometheus.CounterVec, l prometheus.Labels) float64 { return counter(cv, l) }
	opened0, closed0, recv0, sent0 := base(f.m.Opened, src), base(f.m.Closed, src), base(f.m.Received, src), base(f.m.Sent, src)
	dopened0, drecv0, dsent0 := base(f.m.Opened, dst), base(f.m.Received, dst), base(f.m.Sent, dst)

	if got := f.connect(t, "10.244.1.11:8080", 12345, 0); got != "300" {
		t.Fatalf("client read %s", got)
	}
	eventually(t, func() (err error) {
		for _, c := range []struct {
			name      string
			got, want float64
		}{
			{"source opened", counter(f.m.Opened, src) - opened0, 1},
			{"source closed", counter(f.m.Closed, src) - closed0, 1},
			{"source received (client to server)", counter(f.m.Received, src) - recv0, 12345},
			{"source sent (server to client)", counter(f.m.Sent, src) - sent0, 300},
			{"destination opened", counter(f.m.Opened, dst) - dopened0, 1},
			{"destination received", counter(f.m.Received, dst) - drecv0, 12345},
			{"destination sent", counter(f.m.Sent, dst) - dsent0, 300},
		} {
			if c.got != c.want {
				err = errors.Join(err, fmt.Errorf("%s: %v, want %v", c.name, c.got, c.want))
			}
		}
		return err
	})
	// The access log: one line per end, ztunnel's fields.
	eventually(t, func() error {
		log := f.log.String()
		for _, want := range []string{"\tinfo\taccess\tconnection complete\tsrc.addr=10.244.1.2:", ` src.workload="sleep" src.namespace="demo" dst.addr=10.244.1.11:8080 dst.workload="echo" dst.namespace="demo" direction="outbound" bytes_sent=300 bytes_recv=12345 duration="`,
			`direction="inbound" bytes_sent=300 bytes_recv=12345`} {
			if !strings.Contains(log, want) {
				return fmt.Errorf("access log lacks %q:\n%s", want, log)
			}
		}
		return nil
	})

	t.Run("long-lived connection reports before it closes", func(t *testing.T) {
		r0 := counter(f.m.Received, src)
		res := make(chan string, 1)
		go func() {
			var out string
			_ = f.client.Helper(f.env.Cgroup, &out, "tel-client", "10.244.1.11:8080", "7000", "3s")
			res <- out
		}()
		eventually(t, func() error {
			if got := counter(f.m.Received, src) - r0; got != 7000 {
				return fmt.Errorf("received while open: %v, want 7000", got)
			}
			return nil
		})
		select {
		case out := <-res:
			t.Fatalf("the connection closed (%s) before its bytes were seen: the periodic report did not work", out)
		default:
		}
		// The open connection is listed under both pods (the config dump's
		// per-pod connections), each end by its namespace cookie.
		clientNS, _ := f.client.NS.Cookie()
		serverNS, _ := f.server.NS.Cookie()
		var out, in int
		for _, c := range f.reader.Connections() {
			ok := strings.HasPrefix(c.Src, "10.244.1.2:") && c.ActualDst == "10.244.1.11:8080" && c.OriginalDst == "10.244.1.11:8080" && c.Protocol == "TCP"
			switch {
			case ok && !c.Inbound && c.Netns == clientNS:
				out++
			case ok && c.Inbound && c.Netns == serverNS:
				in++
			default:
				t.Errorf("unexpected connection listed: %+v", c)
			}
		}
		if out != 1 || in != 1 {
			t.Errorf("open connections listed: %d outbound at the client, %d inbound at the server; want 1 and 1", out, in)
		}
		if out := <-res; out != "300" {
			t.Fatalf("client read %s", out)
		}
		eventually(t, func() error {
			if got := counter(f.m.Received, src) - r0; got != 7000 {
				return fmt.Errorf("received after close: %v, want 7000 (counted once)", got)
			}
			return nil
		})
	})

	t.Run("failed connect", func(t *testing.T) {
		l := labels("source")
		l["destination_workload"], l["destination_workload_namespace"], l["destination_principal"] = "echo", "demo", "spiffe://cluster.local/ns/demo/sa/echo"
		l["response_flags"] = "CONNECT"
		f0 := counter(f.m.Failed, l)
		if out := f.connect(t, "10.244.1.11:9999", 10, 0); !strings.Contains(out, "refused") {
			t.Fatalf("connect to a closed port: %s", out)
		}
		eventually(t, func() error {
			if got := counter(f.m.Failed, l) - f0; got != 1 {
				return fmt.Errorf("failed: %v, want 1", got)
			}
			if log := f.log.String(); !strings.Contains(log, "\terror\taccess\tconnection failed\t") || !strings.Contains(log, "dst.addr=10.244.1.11:9999") {
				return fmt.Errorf("no failure in the access log:\n%s", log)
			}
			return nil
		})
	})
}

// TestPrivilegedRingBufferOverflowCounted: with the smallest ring buffer
// and no reader, events beyond its room are dropped and counted, and the
// connections themselves are not affected.
func TestPrivilegedRingBufferOverflowCounted(t *testing.T) {
	f := newTelFixture(t, bpf.MapSizes{Events: 4096}, time.Second)
	f.waitServer(t)
	// 60 connections, 4 events each (~100 bytes) > 4 KiB
	if got := f.connectTimes(t, "10.244.1.11:8080", 1, 0, 60); got != "300" {
		t.Fatalf("client read %s", got)
	}
	st, err := f.env.DP.Maps.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st["conn_event_drop"] == 0 || st["conn_event"] == 0 {
		t.Fatalf("queued %d, dropped %d: want both above 0", st["conn_event"], st["conn_event_drop"])
	}
}

// KMESH_CONN_EVENTS=false (bpf.Config.NoConnEvents): enrolled pods'
// kernel-path connections are not reported at all, so they cost what they
// did before reporting existed; the same connections with it on are.
func TestPrivilegedConnEventsOff(t *testing.T) {
	for _, off := range []bool{true, false} {
		f := newTelFixtureWith(t, bpf.Config{NoConnEvents: off}, time.Second)
		f.waitServer(t)
		if got := f.connectTimes(t, "10.244.1.11:8080", 1, 0, 5); got != "300" {
			t.Fatalf("client read %s", got)
		}
		st, err := f.env.DP.Maps.Stats()
		if err != nil {
			t.Fatal(err)
		}
		if queued := st["conn_event"] + st["conn_event_drop"]; (queued == 0) != off {
			t.Errorf("NoConnEvents %v: %d events for 5 connections", off, queued)
		}
	}
}

func eventually(t *testing.T, f func() error) {
	t.Helper()
	var err error
	for range 100 {
		if err = f(); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal(err)
}

// TestPrivilegedSplicedTelemetry: with splicing on, the kernel path's
// bytes go through sk_msg, not TCP; both ends still report every byte
// (the connection events add what sk_msg redirected to TCP's counters).
func TestPrivilegedSplicedTelemetry(t *testing.T) {
	f := newTelFixtureWith(t, bpf.Config{Splice: true}, time.Second)
	// Splicing across pods wants both ends to be mesh workloads on this
	// node (kmesh_frontend, kmesh_backend), each pod under its own address.
	m := f.env.DP.Maps
	for i, p := range []*podnet.Pod{f.client, f.server} {
		id := uint32(100 + i)
		if err := m.PutBackends([]bpf.Backend{{ID: id, Addr4: p.IPv4, Capacity: 1, PathSvc: bpf.PathDirect,
			PathAddr: bpf.PathDirect, PathUDP: bpf.PathDirect, PathIn: bpf.PathDirect, HBONE: true, Local: true}}); err != nil {
			t.Fatal(err)
		}
		if err := m.UpsertFrontends([]bpf.Frontend{{Key: bpf.FrontendKey{Addr: p.IPv4}, Kind: bpf.FrontendWorkload, ID: id}}); err != nil {
			t.Fatal(err)
		}
		cookie, err := p.NS.Cookie()
		if err != nil {
			t.Fatal(err)
		}
		if err := m.SetManaged(cookie, id); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); f.reader.Run(ctx) }()
	defer func() { cancel(); <-done }()
	f.waitServer(t)
	src, dst := labels("source"), labels("destination")
	eventually(t, func() error {
		if o, c := counter(f.m.Closed, src), counter(f.m.Closed, dst); o == 0 || c == 0 {
			return fmt.Errorf("closed: source %v, destination %v", o, c)
		}
		return nil
	})
	recv0, sent0, drecv0, dsent0 := counter(f.m.Received, src), counter(f.m.Sent, src), counter(f.m.Received, dst), counter(f.m.Sent, dst)
	st0, err := f.env.DP.Maps.Stats()
	if err != nil {
		t.Fatal(err)
	}
	const n = 3 << 20
	for range 2 { // the second: a reused tuple must not inherit the first's bytes
		if got := f.connect(t, "10.244.1.11:8080", n, 0); got != "300" {
			t.Fatalf("client read %s", got)
		}
	}
	st, err := f.env.DP.Maps.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if moved := st["splice_bytes"] - st0["splice_bytes"]; moved < 2*(n+300) {
		t.Fatalf("only %d bytes went through sk_msg: the connections were not spliced", moved)
	}
	eventually(t, func() (err error) {
		for _, c := range []struct {
			name      string
			got, want float64
		}{
			{"source received (client to server)", counter(f.m.Received, src) - recv0, 2 * n},
			{"source sent (server to client)", counter(f.m.Sent, src) - sent0, 2 * 300},
			{"destination received", counter(f.m.Received, dst) - drecv0, 2 * n},
			{"destination sent", counter(f.m.Sent, dst) - dsent0, 2 * 300},
		} {
			if c.got != c.want {
				err = errors.Join(err, fmt.Errorf("%s: %v, want %v", c.name, c.got, c.want))
			}
		}
		return err
	})
	if rows, err := f.env.DP.Maps.Dump("kmesh_splice_rx"); err != nil || len(rows.Rows) != 0 {
		t.Errorf("kmesh_splice_rx after every connection closed: %v %v (want empty: the close events take their entries)", rows.Rows, err)
	}

	// A long-lived spliced connection's bytes are reported while it is
	// open (the periodic walk adds kmesh_splice_rx to TCP's counters), and
	// counted once.
	r0, dr0 := counter(f.m.Received, src), counter(f.m.Received, dst)
	res := make(chan string, 1)
	go func() {
		var out string
		_ = f.client.Helper(f.env.Cgroup, &out, "tel-client", "10.244.1.11:8080", "7000", "4s")
		res <- out
	}()
	eventually(t, func() error {
		if got, dgot := counter(f.m.Received, src)-r0, counter(f.m.Received, dst)-dr0; got != 7000 || dgot != 7000 {
			return fmt.Errorf("received while open: source %v, destination %v, want 7000", got, dgot)
		}
		return nil
	})
	select {
	case out := <-res:
		t.Fatalf("the connection closed (%s) before its bytes were seen: the periodic report missed the spliced bytes", out)
	default:
	}
	if out := <-res; out != "300" {
		t.Fatalf("client read %s", out)
	}
	eventually(t, func() error {
		if got, dgot := counter(f.m.Received, src)-r0, counter(f.m.Received, dst)-dr0; got != 7000 || dgot != 7000 {
			return fmt.Errorf("received after close: source %v, destination %v, want 7000 (counted once)", got, dgot)
		}
		return nil
	})
}

// goroutineState is the scheduler state ("IO wait", "syscall", "running",
// …) of the first goroutine whose stack contains fn (a frame: "pkg.F(" is
// the function itself, not its closures or the goroutines it started), ""
// if none does.
func goroutineState(fn string) string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range strings.Split(string(buf), "\n\n") {
		if !strings.Contains(g, fn) {
			continue
		}
		head, _, _ := strings.Cut(g, "\n") // goroutine 7 [IO wait, 2 minutes]:
		_, st, _ := strings.Cut(head, "[")
		st, _, _ = strings.Cut(st, "]")
		st, _, _ = strings.Cut(st, ",")
		return st
	}
	return ""
}

// TestPrivilegedReaderWaitsInPoller: between drains the kernel-path reader
// waits in Go's network poller, not blocked in a system call. A thread
// blocked in epoll_wait makes the runtime's monitor (kept awake in the
// daemon, cmd/kmesh-daemon/sysmon.go) take its P after 10 ms and poll
// every 20 µs again: ~770 wake-ups a second on an idle node. Events still
// reach the metrics, and cancelling ends the reader.
func TestPrivilegedReaderWaitsInPoller(t *testing.T) {
	f := newTelFixture(t, bpf.MapSizes{}, time.Hour)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); f.reader.Run(ctx) }()
	f.waitServer(t)
	time.Sleep(250 * time.Millisecond) // a few drains and waits
	states := map[string]int{}
	for range 20 {
		states[goroutineState("(*KernelReader).Run(")]++
		time.Sleep(15 * time.Millisecond)
	}
	if states["IO wait"] < 16 || states["syscall"] > 0 {
		t.Errorf("the reader's goroutine, sampled 20 times: %v; want it parked in the poller (IO wait), never in a system call", states)
	}
	src := labels("source")
	eventually(t, func() error {
		if o := counter(f.m.Opened, src); o == 0 {
			return fmt.Errorf("no connection reported yet")
		}
		return nil
	})
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the reader did not stop")
	}

	// Close ends a Wait parked in the poller with ErrEventsClosed (the
	// poller says "use of closed file", which is not os.ErrClosed), and a
	// Wait after Close says the same.
	ev, err := f.env.DP.Maps.OpenConnEvents()
	if err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() { waited <- ev.Wait(time.Now().Add(time.Minute)) }()
	time.Sleep(50 * time.Millisecond)
	ev.Close()
	select {
	case err := <-waited:
		if err != bpf.ErrEventsClosed {
			t.Errorf("Wait ended by Close: %v, want ErrEventsClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not end a parked Wait")
	}
	if err := ev.Wait(time.Now().Add(time.Minute)); err != bpf.ErrEventsClosed {
		t.Errorf("Wait after Close: %v, want ErrEventsClosed", err)
	}
}

// TestPrivilegedEventsWaitWokenByKernel: a Wait parked in the poller ends
// when the kernel forces a wakeup (sockops.c, at each 64 KiB queued), not
// only at its deadline, so a burst of connections is drained before the
// ring fills.
func TestPrivilegedEventsWaitWokenByKernel(t *testing.T) {
	f := newTelFixture(t, bpf.MapSizes{}, time.Hour)
	f.waitServer(t)
	ev, err := f.env.DP.Maps.OpenConnEvents()
	if err != nil {
		t.Fatal(err)
	}
	defer ev.Close()
	ev.SetDeadline(time.Unix(1, 0))
	for { // start from an empty ring
		if _, err := ev.Read(); err != nil {
			break
		}
	}
	const deadline = time.Minute
	waited := make(chan time.Duration, 1)
	go func() {
		start := time.Now()
		_ = ev.Wait(start.Add(deadline))
		waited <- time.Since(start)
	}()
	time.Sleep(50 * time.Millisecond) // parked
	// 300 connections, 4 events each of ~100 bytes: past 64 KiB.
	if got := f.connectTimes(t, "10.244.1.11:8080", 1, 0, 300); got != "300" {
		t.Fatalf("client read %s", got)
	}
	select {
	case d := <-waited:
		if d >= deadline {
			t.Fatalf("Wait ran to its deadline (%v) although the kernel queued past 64 KiB", d)
		}
	case <-time.After(deadline / 2):
		t.Fatal("Wait not woken by the kernel after 300 connections' events")
	}
}
