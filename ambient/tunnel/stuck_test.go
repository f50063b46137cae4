package tunnel

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"kmesh.dev/kmesh/ambient/hbone"
	"kmesh.dev/kmesh/ambient/identity"
	"kmesh.dev/kmesh/ambient/state"
)

// A peer that stops reading mid-transfer must not hold up the node: pod
// removal runs on the goroutine that enrols every pod of the node, the
// daemon's shutdown has a deadline, and the pool serves every pod. These
// tests run the proxy's own accept loop and pool on loopback (no root).

// smallBuffers makes a socket block after a few tens of KiB.
func smallBuffers(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetReadBuffer(16 << 10)
		_ = tc.SetWriteBuffer(16 << 10)
	}
}

// h2Peer is a hand-driven HTTP/2 peer (client or server) on a raw socket.
type h2Peer struct {
	nc   net.Conn
	bw   *bufio.Writer
	fr   *http2.Framer
	henc *hpack.Encoder
	hbuf bytes.Buffer
}

func newH2Peer(nc net.Conn) *h2Peer {
	p := &h2Peer{nc: nc, bw: bufio.NewWriter(nc)}
	p.fr = http2.NewFramer(p.bw, nc)
	p.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	p.henc = hpack.NewEncoder(&p.hbuf)
	return p
}

// openWide sends our SETTINGS with the largest windows, so the other side
// may send as much as it likes.
func (p *h2Peer) openWide() error {
	if err := p.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1}); err != nil {
		return err
	}
	if err := p.fr.WriteWindowUpdate(0, 1<<31-1-65535); err != nil {
		return err
	}
	return p.bw.Flush()
}

func (p *h2Peer) headers(id uint32, end bool, fields ...string) error {
	p.hbuf.Reset()
	for i := 0; i+1 < len(fields); i += 2 {
		_ = p.henc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	if err := p.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: p.hbuf.Bytes(), EndHeaders: true, EndStream: end}); err != nil {
		return err
	}
	return p.bw.Flush()
}

// endless is an application that sends without end to whoever connects.
func endless(t *testing.T) netip.AddrPort {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 64<<10)
				for {
					if _, err := c.Write(buf); err != nil {
						return
					}
				}
			}()
		}
	}()
	return addrPortOf(l.Addr())
}

// loopbackPod serves a pod's inbound HBONE listener on loopback with the
// proxy's own accept loop; the application is app (dialled directly).
func loopbackPod(t *testing.T, p *Proxy, uid string, app netip.AddrPort) string {
	t.Helper()
	l, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	pp := &podProxy{pod: Pod{UID: uid, WorkloadUID: uid, Addrs: []netip.Addr{netip.MustParseAddr("127.0.0.1")},
		Identity: identity.Identity{TrustDomain: "cluster.local", Namespace: "app", ServiceAccount: uid}},
		listeners: []net.Listener{l}, ctx: ctx, cancel: cancel, refs: 1}
	p.dialApp = func(ctx context.Context, _ *podProxy, _ netip.AddrPort) (*net.TCPConn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", app.String())
		if err != nil {
			return nil, err
		}
		return c.(*net.TCPConn), nil
	}
	p.mu.Lock()
	p.pods[uid] = pp
	p.mu.Unlock()
	p.wg.Add(1)
	go p.acceptLoop(pp, l, func(pp *podProxy, c *net.TCPConn) {
		smallBuffers(c)
		p.serveHBONE(pp, c)
	}, p.inbound)
	return l.Addr().String()
}

func newLoopbackProxy(t *testing.T, ca *testCA, cfg Config) *Proxy {
	t.Helper()
	dir := state.NewStore()
	dir.Apply(state.Update{Workloads: []*state.Workload{workload("echo", "app", "echo", true, "127.0.0.1")}})
	cfg.Dir, cfg.Certs, cfg.TrustDomain = dir, ca, "cluster.local"
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		p.Close(ctx, 0)
	})
	return p
}

// hboneClient opens mutual TLS to addr as sleep and starts an HTTP/2
// connection by hand: a peer that will stop reading when told to.
func hboneClient(t *testing.T, ca *testCA, addr string) *h2Peer {
	t.Helper()
	cert, err := ca.Certificate(t.Context(), identity.Identity{TrustDomain: "cluster.local", Namespace: "app", ServiceAccount: "sleep"})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	smallBuffers(raw)
	t.Cleanup(func() { raw.Close() })
	tc := tls.Client(raw, &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"},
		Certificates: []tls.Certificate{cert.TLS}, InsecureSkipVerify: true})
	if err := tc.HandshakeContext(t.Context()); err != nil {
		t.Fatal(err)
	}
	p := newH2Peer(tc)
	if _, err := p.bw.WriteString(http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := p.openWide(); err != nil {
		t.Fatal(err)
	}
	return p
}

// within fails the test if fn takes longer than d.
func within(t *testing.T, d time.Duration, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	start := time.Now()
	go func() { fn(); close(done) }()
	select {
	case <-done:
		t.Logf("%s took %v", what, time.Since(start).Round(time.Millisecond))
	case <-time.After(d):
		t.Fatalf("%s blocked for %v behind a peer that stopped reading", what, d)
	}
}

// An inbound HBONE peer opens a stream to an application that sends
// without end, and stops reading: the proxy's writer blocks on the full
// socket. Removing the pod returns at once, and the daemon's shutdown
// returns at its drain deadline.
func TestStuckPeerDoesNotBlockPodRemovalOrShutdown(t *testing.T) {
	ca := newTestCA(t, "cluster.local")
	p := newLoopbackProxy(t, ca, Config{})
	addr := loopbackPod(t, p, "echo", endless(t))
	c := hboneClient(t, ca, addr)
	if err := c.headers(1, false, ":method", "CONNECT", ":authority", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 7000).String()); err != nil {
		t.Fatal(err)
	}
	// Read until the stream carries data, then stop reading.
	_ = c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if d, ok := f.(*http2.DataFrame); ok && d.StreamID == 1 && len(d.Data()) > 0 {
			break
		}
	}
	time.Sleep(300 * time.Millisecond) // the proxy fills the socket and blocks

	within(t, 2*time.Second, "RemovePod", func() { p.RemovePod("echo") })
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	within(t, 500*time.Millisecond+closeGrace+time.Second, "Close with a 500ms drain", func() { p.Close(ctx, 0) })
}

// hungServer is an HTTP/2 server that answers the first CONNECT with 200,
// lets the client send as much as it likes, then never reads again.
func hungServer(t *testing.T) (addr string, answered <-chan struct{}) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	ok := make(chan struct{})
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		t.Cleanup(func() { c.Close() })
		smallBuffers(c)
		if _, err := io.ReadFull(c, make([]byte, len(http2.ClientPreface))); err != nil {
			return
		}
		p := newH2Peer(c)
		if p.openWide() != nil {
			return
		}
		for {
			f, err := p.fr.ReadFrame()
			if err != nil {
				return
			}
			if h, isH := f.(*http2.MetaHeadersFrame); isH {
				if p.headers(h.StreamID, false, ":status", "200") == nil {
					close(ok)
				}
				return // and never read again
			}
		}
	}()
	return l.Addr().String(), ok
}

// A pooled connection whose peer hangs while a stream writes to it: the
// pod's removal (GOAWAY on it) and other callers of the pool do not wait
// for that peer.
func TestPoolHungPeerDoesNotBlockOthers(t *testing.T) {
	pl := newPool(hbone.Config{}, newMetrics(nil, nil, nil, 0), time.Minute)
	defer func() { within(t, time.Second, "closeAll", pl.closeAll) }()
	hung, answered := hungServer(t)
	dialTo := func(addr string) func(context.Context) (net.Conn, error) {
		return func(ctx context.Context) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", addr)
			if err == nil {
				smallBuffers(c)
			}
			return c, err
		}
	}
	hungKey := poolKey{pod: "a", addr: netip.MustParseAddrPort(hung)}
	pc, release, err := pl.get(t.Context(), hungKey, dialTo(hung))
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	st, status, err := pc.cc.Connect(t.Context(), "10.0.0.1:80", nil)
	if err != nil || status != 200 {
		t.Fatalf("connect: %d %v", status, err)
	}
	<-answered
	go func() { // a transfer the peer stops reading
		buf := make([]byte, 64<<10)
		for {
			if _, err := st.Write(buf); err != nil {
				return
			}
		}
	}()
	time.Sleep(300 * time.Millisecond) // the writer blocks on the full socket

	// The pod leaves: GOAWAY to the hung peer, from the ZDS goroutine.
	dropped := make(chan struct{})
	go func() { pl.dropPod("a"); close(dropped) }()

	// Another pod's connection to a healthy peer.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				_ = hbone.Serve(c, hbone.Config{}, func(s *hbone.Stream, _ *hbone.Request) {
					if s.Respond(200) == nil {
						_, _ = io.Copy(s, s)
						_ = s.CloseWrite()
					}
				})
			}()
		}
	}()
	within(t, time.Second, "pool.get for another pod", func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		pc2, release2, err := pl.get(ctx, poolKey{pod: "b", addr: addrPortOf(l.Addr())}, dialTo(l.Addr().String()))
		if err != nil {
			t.Error(err)
			return
		}
		defer release2()
		s, status, err := pc2.cc.Connect(ctx, "10.0.0.1:80", nil)
		if err != nil || status != 200 {
			t.Errorf("connect: %d %v", status, err)
			return
		}
		s.Close()
	})
	within(t, time.Second, "dropPod (GOAWAY to the hung peer)", func() { <-dropped })
}

// Inbound HBONE connections are bounded per source address and per node:
// beyond, they are reset at once (before TLS) and counted.
func TestInboundConnectionLimits(t *testing.T) {
	ca := newTestCA(t, "cluster.local")
	p := newLoopbackProxy(t, ca, Config{MaxHBONEConnsPerPeer: 2, MaxHBONEConns: 3})
	addr := loopbackPod(t, p, "echo", endless(t))
	refused := func(reason string) float64 { return testutil.ToFloat64(p.m.refused.WithLabelValues("inbound", reason)) }

	dialFrom := func(src string) (*tls.Conn, error) {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 2 * time.Second}
		raw, err := d.Dial("tcp", addr)
		if err != nil {
			return nil, err
		}
		t.Cleanup(func() { raw.Close() })
		cert, _ := ca.Certificate(t.Context(), identity.Identity{TrustDomain: "cluster.local", Namespace: "app", ServiceAccount: "sleep"})
		tc := tls.Client(raw, &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"},
			Certificates: []tls.Certificate{cert.TLS}, InsecureSkipVerify: true})
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
		defer cancel()
		return tc, tc.HandshakeContext(ctx)
	}
	mustConnect := func(src string) {
		t.Helper()
		if _, err := dialFrom(src); err != nil {
			t.Fatalf("from %s: %v", src, err)
		}
	}
	mustRefuse := func(src, reason string) {
		t.Helper()
		before := refused(reason)
		_, err := dialFrom(src)
		if err == nil || !(errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF)) {
			t.Fatalf("from %s: %v, want a reset", src, err)
		}
		waitFor(t, func() bool { return refused(reason) == before+1 })
	}
	mustConnect("127.0.0.2")
	mustConnect("127.0.0.2")
	mustRefuse("127.0.0.2", reasonPeerConnLimit)
	mustConnect("127.0.0.3")
	mustRefuse("127.0.0.4", reasonNodeConnLimit)
}
