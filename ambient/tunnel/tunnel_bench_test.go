package tunnel

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"runtime"
	"slices"
	"testing"
	"time"

	"kmesh.dev/kmesh/ambient/hbone"
)

// BenchmarkTunnelPingPong: 64-byte ping-pong from an application socket
// through both ends of the tunnel (pipe, hbone, TLS over loopback TCP) to
// an echo server and back, all in this process. Reports p50, p99 and the
// worst round trip (on a shared machine, compare runs made together).
func BenchmarkTunnelPingPong(b *testing.B) {
	client := tunnelPair(b)
	msg, got := make([]byte, 64), make([]byte, 64)
	var lat []time.Duration
	for b.Loop() {
		start := time.Now()
		if _, err := client.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(client, got); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
	b.ReportMetric(float64(lat[len(lat)-1].Microseconds()), "max-µs")
}

// tunnelPair: an application connection whose bytes go through pipe on
// the outbound side, one HBONE stream over TLS, pipeInbound on the
// inbound side, to an echo server.
func tunnelPair(b testing.TB) *net.TCPConn {
	b.Helper()
	return newTestTunnel(b).open(b)
}

// testTunnel: both ends of the tunnel in this process, one HBONE
// connection over TLS on loopback; open adds an application connection
// carried by a stream of its own.
type testTunnel struct {
	cc    *hbone.Conn
	front *net.TCPListener
}

func newTestTunnel(b testing.TB) *testTunnel {
	b.Helper()
	listen := func() *net.TCPListener {
		l, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { l.Close() })
		return l
	}
	echo := listen()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); c.Close() }()
		}
	}()
	ca := newTestCA(b, "bench")
	cert := ca.issue(b, "spiffe://cluster.local/ns/a/sa/b", time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	hb := listen()
	go func() {
		for {
			c, err := hb.AcceptTCP()
			if err != nil {
				return
			}
			go func() {
				tc, nc := tlsOver(c, &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert.TLS}}, true)
				if tc.Handshake() != nil {
					return
				}
				_ = hbone.Serve(nc, hbone.Config{MaxStreams: 1000}, func(st *hbone.Stream, _ *hbone.Request) {
					app, err := net.DialTCP("tcp", nil, echo.Addr().(*net.TCPAddr))
					if err != nil || st.Respond(200) != nil {
						return
					}
					_, _, _ = pipeInbound(app, st)
					app.Close()
				})
			}()
		}
	}()
	raw, err := net.DialTCP("tcp", nil, hb.Addr().(*net.TCPAddr))
	if err != nil {
		b.Fatal(err)
	}
	tc, nc := tlsOver(raw, &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true}, false)
	if err := tc.Handshake(); err != nil {
		b.Fatal(err)
	}
	cc, err := hbone.Client(nc, hbone.Config{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cc.Close() })
	return &testTunnel{cc: cc, front: listen()}
}

func (t *testTunnel) open(b testing.TB) *net.TCPConn {
	b.Helper()
	st, status, err := t.cc.Connect(context.Background(), "127.0.0.1:1", nil)
	if err != nil || status != 200 {
		b.Fatalf("CONNECT: %d %v", status, err)
	}
	go func() {
		c, err := t.front.AcceptTCP()
		if err != nil {
			return
		}
		_, _, _ = pipe(c, st)
		c.Close()
	}()
	client, err := net.DialTCP("tcp", nil, t.front.Addr().(*net.TCPAddr))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { client.Close() })
	return client
}

// TestTunnelRoundTripAllocs: a keep-alive round trip through both ends of
// the tunnel allocates nothing of ours. The two allocations left are
// crypto/tls's, one per record read (readFromUntil's atLeastReader).
func TestTunnelRoundTripAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are meaningless under the race detector (go test without -race runs this)")
	}
	client := tunnelPair(t)
	msg, got := make([]byte, 64), make([]byte, 64)
	rt := func() {
		if _, err := client.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(client, got); err != nil {
			t.Fatal(err)
		}
	}
	for range 100 { // warm: pools, buffers, TLS record sizes
		rt()
	}
	if a := testing.AllocsPerRun(500, rt); a > 2.5 {
		t.Errorf("%.1f allocations per round trip, want at most crypto/tls's 2", a)
	}
}

// idleConnKiB bounds TestTunnelIdleMemory (23.6 KiB measured; one copy
// buffer kept per connection would add 64). burstKeptKiB bounds what a
// connection keeps after a burst: a stream keeps a receive buffer of up to
// 64 KiB (hbone's keepBuf), one per end; 1.9 MiB measured when streams
// kept the buffers they grew to the window.
const idleConnKiB, burstKeptKiB = 64, 256

// TestTunnelIdleMemory: what an idle tunnelled connection holds, both
// ends of the tunnel together (two pipes, their goroutines and the HBONE
// stream on each side), after one exchange. Node proxies carry thousands
// of pooled, mostly idle connections: a relay must not keep a copy buffer
// while it waits. The echo server's goroutine and sockets are counted
// too (a few KiB).
func TestTunnelIdleMemory(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector's shadow memory makes heap figures meaningless (go test without -race runs this)")
	}
	tun := newTestTunnel(t)
	msg, got := make([]byte, 512), make([]byte, 512)
	roundTrip := func(c *net.TCPConn) {
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, got); err != nil {
			t.Fatal(err)
		}
	}
	roundTrip(tun.open(t)) // warm: TLS, pools, the HBONE connection's buffers
	inUse := func() uint64 {
		runtime.GC()
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapInuse + m.StackInuse
	}
	const n = 200
	before := inUse()
	conns := make([]*net.TCPConn, n)
	for i := range conns {
		conns[i] = tun.open(t)
		roundTrip(conns[i])
	}
	time.Sleep(100 * time.Millisecond) // both ends back in their waits
	per := (float64(inUse()) - float64(before)) / n / 1024
	t.Logf("%.1f KiB per idle tunnelled connection (both ends, %d connections)", per, n)
	if per > idleConnKiB {
		t.Errorf("%.1f KiB per idle tunnelled connection, want at most %d", per, idleConnKiB)
	}
	for _, c := range conns {
		roundTrip(c) // still working after the wait
	}

	// A burst its reader did not take at once: the tunnel queued it in
	// the streams' receive buffers (up to the 4 MiB stream window) until
	// the application read; idle again, the buffers are let go.
	const burst, k = 32 << 20, 10 // past the sockets' buffers (loopback: several MiB each way)
	big := make([]byte, burst)
	before = inUse()
	for _, c := range conns[:k] {
		go func() { _, _ = c.Write(big) }()
	}
	time.Sleep(300 * time.Millisecond) // every buffer on the way fills
	// Read them together: the streams share one HBONE connection, whose
	// 16 MiB window four unread 4 MiB streams use up (HTTP/2).
	errs := make(chan error, k)
	for _, c := range conns[:k] {
		go func() { _, err := io.ReadFull(c, make([]byte, burst)); errs <- err }()
	}
	for range k {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(100 * time.Millisecond)
	grown := (float64(inUse()) - float64(before)) / k / 1024
	runtime.KeepAlive(big)
	t.Logf("%.1f KiB more per idle tunnelled connection after a %d MiB burst", grown, burst>>20)
	if grown > burstKeptKiB {
		t.Errorf("%.1f KiB more per idle tunnelled connection after a burst, want at most %d", grown, burstKeptKiB)
	}
}
