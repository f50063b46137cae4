package hbone

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Every peer holding a mesh certificate may be hostile. These tests play
// such a peer with x/net's Framer on a raw socket: it sends what it likes
// and reads (or does not read) what it likes.

// rawPeer is a hand-driven HTTP/2 client.
type rawPeer struct {
	t    testing.TB
	nc   net.Conn
	bw   *bufio.Writer
	fr   *http2.Framer
	wmu  sync.Mutex
	henc *hpack.Encoder
	hbuf bytes.Buffer
}

// serverFor runs an hbone server with cfg and handler on a loopback
// listener; every accepted connection is sent on the returned channel.
func serverFor(t testing.TB, cfg Config, handler func(*Stream, *Request)) (string, chan *Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	conns := make(chan *Conn, 16)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			tiny(c)
			sc := NewServer(c, cfg, handler)
			conns <- sc
			go func() { _ = sc.Serve() }()
		}
	}()
	return l.Addr().String(), conns
}

// dialRaw connects a raw peer and sends the client preface and settings.
func dialRaw(t testing.TB, addr string, settings ...http2.Setting) *rawPeer {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	tiny(nc)
	t.Cleanup(func() { nc.Close() })
	p := &rawPeer{t: t, nc: nc, bw: bufio.NewWriterSize(nc, 64<<10)}
	p.fr = http2.NewFramer(p.bw, nc)
	p.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	p.henc = hpack.NewEncoder(&p.hbuf)
	if _, err := p.bw.WriteString(http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	p.do(func() error { return p.fr.WriteSettings(settings...) })
	return p
}

// do runs one write on the framer and flushes; errors end the test unless
// the peer is expected to be gone (use try).
func (p *rawPeer) do(w func() error) {
	p.t.Helper()
	if err := p.try(w); err != nil {
		p.t.Fatal(err)
	}
}

func (p *rawPeer) try(w func() error) error {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	if err := w(); err != nil {
		return err
	}
	return p.bw.Flush()
}

// headersFrame writes a CONNECT request's HEADERS on stream id (no flush).
func (p *rawPeer) headersFrame(id uint32, authority string, end bool) error {
	p.hbuf.Reset()
	_ = p.henc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	_ = p.henc.WriteField(hpack.HeaderField{Name: ":authority", Value: authority})
	return p.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: p.hbuf.Bytes(), EndHeaders: true, EndStream: end})
}

// frames reads frames until fn returns true, the connection ends (the
// error is returned) or d passes.
func (p *rawPeer) frames(d time.Duration, fn func(http2.Frame) bool) error {
	_ = p.nc.SetReadDeadline(time.Now().Add(d))
	defer func() { _ = p.nc.SetReadDeadline(time.Time{}) }()
	for {
		f, err := p.fr.ReadFrame()
		if err != nil {
			return err
		}
		if fn(f) {
			return nil
		}
	}
}

// alive checks the server still answers on this connection: a PING is
// acknowledged.
func (p *rawPeer) alive(t *testing.T) {
	t.Helper()
	data := [8]byte{'a', 'l', 'i', 'v', 'e'}
	p.do(func() error { return p.fr.WritePing(false, data) })
	err := p.frames(5*time.Second, func(f http2.Frame) bool {
		if ga, ok := f.(*http2.GoAwayFrame); ok {
			t.Fatalf("GOAWAY %v: the connection was killed", ga.ErrCode)
		}
		pf, ok := f.(*http2.PingFrame)
		return ok && pf.IsAck() && pf.Data == data
	})
	if err != nil {
		t.Fatalf("connection not alive: %v", err)
	}
}

// Rapid Reset (CVE-2023-44487): HEADERS then RST_STREAM, thousands of
// times, on one connection. A reset stream still holds its place among the
// concurrent streams until its handler returns, so no more than
// MaxStreams handlers ever run (each of which would dial the
// application); a peer that keeps resetting is told to calm down and
// disconnected; a stream reset before its answer gets no answer.
func TestRapidResetBoundsHandlers(t *testing.T) {
	var running, peak, started atomic.Int64
	var peakG atomic.Int64
	handler := func(s *Stream, r *Request) {
		started.Add(1)
		n := running.Add(1)
		defer running.Add(-1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		if g := int64(runtime.NumGoroutine()); g > peakG.Load() {
			peakG.Store(g)
		}
		time.Sleep(20 * time.Millisecond) // dialling the application
		_ = s.Respond(200)
	}
	base := runtime.NumGoroutine()
	addr, _ := serverFor(t, Config{}, handler)
	p := dialRaw(t, addr)

	const pairs = 5000
	var answered atomic.Int64 // HEADERS the server sent on reset streams
	var goAway atomic.Value
	readDone := make(chan error, 1)
	go func() {
		readDone <- p.frames(30*time.Second, func(f http2.Frame) bool {
			switch f := f.(type) {
			case *http2.MetaHeadersFrame:
				answered.Add(1)
			case *http2.GoAwayFrame:
				goAway.Store(f.ErrCode)
			}
			return false
		})
	}()
	var werr error
	for i := 0; i < pairs && werr == nil; i++ {
		id := uint32(2*i + 1)
		werr = p.try(func() error {
			if err := p.headersFrame(id, "10.0.0.1:80", false); err != nil {
				return err
			}
			return p.fr.WriteRSTStream(id, http2.ErrCodeCancel)
		})
	}
	select {
	case <-readDone:
	case <-time.After(10 * time.Second):
		t.Error("the connection survived 5000 rapid resets")
	}
	waitFor(t, func() bool { return running.Load() == 0 })
	t.Logf("%d handlers started for %d HEADERS+RST pairs (writer stopped: %v), peak %d concurrent, peak %d goroutines (base %d)",
		started.Load(), pairs, werr, peak.Load(), peakG.Load(), base)
	if peak.Load() > int64(DefaultMaxStreams) {
		t.Errorf("%d handlers ran at once, limit %d", peak.Load(), DefaultMaxStreams)
	}
	if g := peakG.Load(); g > int64(base+DefaultMaxStreams+50) {
		t.Errorf("%d goroutines during the attack (base %d): handlers are not bounded", g, base)
	}
	if s := started.Load(); s > 6*DefaultMaxStreams {
		t.Errorf("%d handlers (application dials) for one connection's resets", s)
	}
	if code, _ := goAway.Load().(http2.ErrCode); code != http2.ErrCodeEnhanceYourCalm {
		t.Errorf("GOAWAY %v, want ENHANCE_YOUR_CALM", code)
	}
	if n := answered.Load(); n > 0 {
		t.Errorf("%d responses written on streams the peer had reset", n)
	}
}

// A peer that floods PINGs and never reads: the answers cannot be written,
// and the queue of control frames waiting for the socket must not grow
// without bound. The connection is closed instead.
//
// The limit is lowered to 100 here: with the tiny socket buffers of these
// tests, a loaded machine can stall the flood in TCP itself (the peer's
// full receive queue drops what carries the ACKs of its own sends; seen
// with 300-600 frames queued), before the default 1000 is reached. The
// mechanism is the same for any limit.
func TestPingFloodWithoutReadingClosesConnection(t *testing.T) {
	const limit = 100
	addr, conns := serverFor(t, Config{MaxControlFrames: limit}, echo)
	p := dialRaw(t, addr)
	sc := <-conns
	stop := make(chan struct{})
	defer close(stop)
	var sent atomic.Uint64
	var floodErr atomic.Value
	go func() {
		for i := uint64(0); ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			// 64 PINGs per write: a flood, not a syscall per frame (one
			// each made the test depend on the machine's load).
			if p.try(func() error {
				for j := uint64(0); j < 64; j++ {
					var d [8]byte
					d[0], d[1], d[2], d[3] = byte(i), byte(i>>8), byte(i>>16), byte(j)
					if err := p.fr.WritePing(false, d); err != nil {
						return err
					}
				}
				return nil
			}) != nil {
				floodErr.Store(fmt.Sprint("stopped after ", i))
				return
			}
			sent.Store(i)
		}
	}()
	maxQueued := 0
	deadline := time.After(10 * time.Second)
	for {
		sc.cmu.Lock()
		maxQueued = max(maxQueued, len(sc.ctrl))
		sc.cmu.Unlock()
		select {
		case <-sc.Done():
			sc.cmu.Lock()
			maxQueued = max(maxQueued, len(sc.ctrl))
			sc.cmu.Unlock()
			t.Logf("closed (%v) with at most %d control frames queued", sc.Err(), maxQueued)
			if maxQueued > limit {
				t.Errorf("%d control frames queued, limit %d", maxQueued, limit)
			}
			return
		case <-deadline:
			t.Fatalf("the PING flood went on for 10s, %d control frames queued (the peer sent %d batches of 64, %v)", maxQueued, sent.Load(), floodErr.Load())
		case <-time.After(time.Millisecond):
		}
	}
}

// Flow control is enforced on receive. A stream sending beyond its window
// is reset (FLOW_CONTROL_ERROR, a stream error: the connection lives on);
// streams that together send beyond the connection window end the
// connection (GOAWAY FLOW_CONTROL_ERROR).
func TestFlowControlViolations(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	cfg := Config{StreamWindow: 64 << 10, ConnWindow: 128 << 10, MaxFrame: 16 << 10}
	addr, _ := serverFor(t, cfg, func(s *Stream, r *Request) {
		if err := s.Respond(200); err != nil {
			return
		}
		<-release // never reads: the windows are not given back
	})
	chunk := make([]byte, 16<<10)

	t.Run("stream window", func(t *testing.T) {
		p := dialRaw(t, addr)
		p.do(func() error { return p.headersFrame(1, "10.0.0.1:80", false) })
		for i := 0; i < 5; i++ { // 80 KiB on a 64 KiB window
			if p.try(func() error { return p.fr.WriteData(1, false, chunk) }) != nil {
				break
			}
		}
		var code http2.ErrCode = 0xff
		err := p.frames(5*time.Second, func(f http2.Frame) bool {
			if rst, ok := f.(*http2.RSTStreamFrame); ok && rst.StreamID == 1 {
				code = rst.ErrCode
				return true
			}
			return false
		})
		if err != nil || code != http2.ErrCodeFlowControl {
			t.Fatalf("RST_STREAM %v (%v), want FLOW_CONTROL_ERROR", code, err)
		}
		p.alive(t)
	})

	t.Run("connection window", func(t *testing.T) {
		p := dialRaw(t, addr)
		// Three streams, each within its own window, 144 KiB together on
		// a 128 KiB connection window.
		for _, id := range []uint32{1, 3, 5} {
			p.do(func() error { return p.headersFrame(id, "10.0.0.1:80", false) })
			for i := 0; i < 3; i++ {
				_ = p.try(func() error { return p.fr.WriteData(id, false, chunk) })
			}
		}
		var code http2.ErrCode = 0xff
		err := p.frames(5*time.Second, func(f http2.Frame) bool {
			if ga, ok := f.(*http2.GoAwayFrame); ok {
				code = ga.ErrCode
				return true
			}
			return false
		})
		if code != http2.ErrCodeFlowControl {
			t.Fatalf("GOAWAY %v (%v), want FLOW_CONTROL_ERROR", code, err)
		}
	})
}

// Frames on a stream that is over (reset by the peer, or ended by it) are
// a stream error: that stream is answered with RST_STREAM STREAM_CLOSED,
// the connection and its other streams carry on.
func TestFramesOnClosedStreamsAreStreamErrors(t *testing.T) {
	addr, _ := serverFor(t, Config{}, echo)
	p := dialRaw(t, addr)
	// Stream 1: opened and reset by the peer, then HEADERS and DATA again.
	p.do(func() error { return p.headersFrame(1, "10.0.0.1:80", false) })
	p.do(func() error { return p.fr.WriteRSTStream(1, http2.ErrCodeCancel) })
	p.do(func() error { return p.headersFrame(1, "10.0.0.1:80", true) })
	p.do(func() error { return p.fr.WriteData(1, false, []byte("late")) })
	// Stream 3: the peer ends its side, then sends DATA anyway.
	p.do(func() error { return p.headersFrame(3, "10.0.0.1:80", true) })
	p.do(func() error { return p.fr.WriteData(3, false, []byte("after the end")) })
	p.alive(t)
	// A new stream still works.
	p.do(func() error { return p.headersFrame(5, "10.0.0.1:80", false) })
	p.do(func() error { return p.fr.WriteData(5, true, []byte("hi")) })
	var got []byte
	err := p.frames(5*time.Second, func(f http2.Frame) bool {
		if d, ok := f.(*http2.DataFrame); ok && d.StreamID == 5 {
			got = append(got, d.Data()...)
			return d.StreamEnded()
		}
		return false
	})
	if err != nil || string(got) != "hi" {
		t.Fatalf("stream 5 after the stream errors: %q %v", got, err)
	}
}

// A peer that stops reading while the server sends: the writer blocks on a
// full socket. Shutdown (GOAWAY) must not wait for it: pod removal and
// daemon shutdown call it, and a pod's removal runs on the goroutine that
// enrols every pod of the node.
func TestShutdownDoesNotWaitForAStuckPeer(t *testing.T) {
	writing := make(chan struct{}, 1)
	addr, conns := serverFor(t, Config{}, func(s *Stream, r *Request) {
		if err := s.Respond(200); err != nil {
			return
		}
		writing <- struct{}{}
		buf := make([]byte, 64<<10)
		for {
			if _, err := s.Write(buf); err != nil {
				return
			}
		}
	})
	p := dialRaw(t, addr, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1})
	sc := <-conns
	p.do(func() error { return p.fr.WriteWindowUpdate(0, 1<<31-1-65535) })
	p.do(func() error { return p.headersFrame(1, "10.0.0.1:80", false) })
	<-writing
	// The peer reads nothing from now on; wait until the writer is stuck.
	waitFor(t, func() bool {
		if sc.wmu.TryLock() {
			sc.wmu.Unlock()
			return false
		}
		time.Sleep(100 * time.Millisecond)
		return !sc.wmu.TryLock()
	})
	done := make(chan struct{})
	go func() { sc.Shutdown(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("Shutdown blocked behind a writer stuck on a peer that stopped reading")
	}
}

var _ = errors.Is
var _ = io.EOF

// counts collects Config.CountError reasons.
type counts struct {
	mu sync.Mutex
	m  map[string]int
}

func (c *counts) add(reason string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[string]int{}
	}
	c.m[reason]++
}

func (c *counts) get(reason string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m[reason]
}

// A stream the peer resets keeps its handler's place among the MaxStreams
// until the handler returns: a new stream waits for it (it is not
// refused: the peer counts the reset stream as gone).
func TestResetStreamsHoldHandlerPlaces(t *testing.T) {
	release := make(chan struct{})
	var started atomic.Int64
	addr, _ := serverFor(t, Config{MaxStreams: 2}, func(s *Stream, r *Request) {
		started.Add(1)
		<-release // a slow dial
		_ = s.Respond(200)
	})
	p := dialRaw(t, addr)
	for _, id := range []uint32{1, 3} {
		p.do(func() error { return p.headersFrame(id, "10.0.0.1:80", false) })
	}
	waitFor(t, func() bool { return started.Load() == 2 })
	for _, id := range []uint32{1, 3} {
		p.do(func() error { return p.fr.WriteRSTStream(id, http2.ErrCodeCancel) })
	}
	p.do(func() error { return p.headersFrame(5, "10.0.0.1:80", true) })
	p.alive(t) // stream 5 has been read
	time.Sleep(50 * time.Millisecond)
	if n := started.Load(); n != 2 {
		t.Fatalf("%d handlers started while 2 (reset) were still running, limit 2", n)
	}
	close(release)
	var status string
	err := p.frames(5*time.Second, func(f http2.Frame) bool {
		if h, ok := f.(*http2.MetaHeadersFrame); ok {
			if h.StreamID != 5 {
				t.Errorf("answer on stream %d, which the peer reset", h.StreamID)
			}
			status = h.PseudoValue("status")
			return true
		}
		return false
	})
	if err != nil || status != "200" || started.Load() != 3 {
		t.Fatalf("stream 5 after the reset ones ended: %q %v (%d handlers)", status, err, started.Load())
	}
}

// A writer stuck on a peer that stopped reading gives up after
// WriteTimeout and takes the connection down with it (so do the writers
// queued behind it): the connection ends even though nobody closed it.
func TestWriteTimeoutCutsOffStuckPeer(t *testing.T) {
	var cnt counts
	cfg := Config{WriteTimeout: 300 * time.Millisecond, CountError: cnt.add}
	writers := make(chan error, 4)
	addr, conns := serverFor(t, cfg, func(s *Stream, r *Request) {
		err := s.Respond(200) // may wait behind the stuck writer
		buf := make([]byte, 64<<10)
		for err == nil {
			_, err = s.Write(buf)
		}
		writers <- err
	})
	p := dialRaw(t, addr, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1})
	sc := <-conns
	p.do(func() error { return p.fr.WriteWindowUpdate(0, 1<<31-1-65535) })
	for _, id := range []uint32{1, 3, 5} {
		p.do(func() error { return p.headersFrame(id, "10.0.0.1:80", false) })
	}
	start := time.Now()
	select {
	case <-sc.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("a peer that reads nothing kept the connection for 5s")
	}
	if !errors.Is(sc.Err(), ErrWriteTimeout) || cnt.get(ReasonWriteTimeout) != 1 {
		t.Fatalf("ended with %v after %v (counted %v)", sc.Err(), time.Since(start), cnt.m)
	}
	for range 3 {
		select {
		case <-writers:
		case <-time.After(2 * time.Second):
			t.Fatal("a handler is still blocked after the connection ended")
		}
	}
}

// silentServer accepts one connection, sends the server preface
// (SETTINGS) and then neither reads nor writes: a peer that vanished
// without a FIN.
func silentServer(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		t.Cleanup(func() { c.Close() })
		_ = http2.NewFramer(c, nil).WriteSettings()
	}()
	return l.Addr().String()
}

// Keepalive: both ends PING a silent peer and give up on it after
// PingTimeout; a peer that answers keeps an idle connection up.
func TestKeepalive(t *testing.T) {
	fast := Config{PingInterval: 100 * time.Millisecond, PingTimeout: 200 * time.Millisecond, IdleTimeout: -1}

	t.Run("client, silent server", func(t *testing.T) {
		var cnt counts
		cfg := fast
		cfg.CountError = cnt.add
		nc, err := net.Dial("tcp", silentServer(t))
		if err != nil {
			t.Fatal(err)
		}
		cc, err := Client(nc, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		select {
		case <-cc.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("the client kept a silent peer's connection for 5s")
		}
		if !errors.Is(cc.Err(), ErrKeepaliveTimeout) || cnt.get(ReasonKeepaliveTimeout) != 1 {
			t.Fatalf("ended with %v (counted %v)", cc.Err(), cnt.m)
		}
	})

	t.Run("server, silent client", func(t *testing.T) {
		addr, conns := serverFor(t, fast, echo)
		_ = dialRaw(t, addr) // preface and SETTINGS, then nothing
		sc := <-conns
		select {
		case <-sc.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("the server kept a silent peer's connection for 5s")
		}
		if !errors.Is(sc.Err(), ErrKeepaliveTimeout) {
			t.Fatalf("ended with %v", sc.Err())
		}
	})

	t.Run("answered PINGs keep an idle connection", func(t *testing.T) {
		cc := pair(t, fast, echo)
		time.Sleep(time.Second) // ten PING intervals without a stream
		s, status, err := cc.Connect(t.Context(), "10.0.0.1:80", nil)
		if err != nil || status != 200 {
			t.Fatalf("after a second of keepalive: %d %v", status, err)
		}
		exchangeWithin(t, s, "still here", "the stream after the keepalive stalled")
	})
}

// The handshake is bounded: a peer that connects and sends nothing, or
// only the preface, is disconnected after HandshakeTimeout.
func TestHandshakeTimeout(t *testing.T) {
	for _, preface := range []bool{false, true} {
		var cnt counts
		addr, conns := serverFor(t, Config{HandshakeTimeout: 200 * time.Millisecond, CountError: cnt.add}, echo)
		nc, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		if preface {
			_, _ = io.WriteString(nc, http2.ClientPreface) // and no SETTINGS
		}
		sc := <-conns
		select {
		case <-sc.Done():
		case <-time.After(5 * time.Second):
			t.Fatalf("preface=%v: the handshake went on for 5s", preface)
		}
		if !errors.Is(sc.Err(), ErrHandshakeTimeout) || cnt.get(ReasonHandshakeTimeout) != 1 {
			t.Fatalf("preface=%v: ended with %v (counted %v)", preface, sc.Err(), cnt.m)
		}
	}
}

// A server closes a connection that carried no stream for IdleTimeout,
// with GOAWAY first.
func TestIdleTimeout(t *testing.T) {
	cc := pair(t, Config{IdleTimeout: 200 * time.Millisecond}, echo)
	s, _, err := cc.Connect(t.Context(), "10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	exchangeWithin(t, s, "one", "the stream stalled")
	s.Close()
	select {
	case <-cc.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("an idle connection stayed open for 5s")
	}
	if !cc.GoingAway() {
		t.Fatal("closed without GOAWAY")
	}
}

// SETTINGS_MAX_HEADER_LIST_SIZE both ways: our client does not send a
// request larger than the server takes (and the connection stays
// usable); our server answers a larger one 431 and carries on.
func TestHeaderListLimits(t *testing.T) {
	var cnt counts
	cfg := Config{MaxHeaderListSize: 1024, CountError: cnt.add}
	big := [][2]string{{"baggage", string(bytes.Repeat([]byte("x"), 1500))}}

	cc := pair(t, cfg, echo)
	ctx := t.Context()
	waitFor(t, func() bool { // the server's SETTINGS arrived
		cc.mu.Lock()
		defer cc.mu.Unlock()
		return cc.peerMaxHdr == 1024
	})
	if _, _, err := cc.Connect(ctx, "10.0.0.1:80", big); !errors.Is(err, ErrHeaderListTooLarge) {
		t.Fatalf("oversized request: %v", err)
	}
	s, status, err := cc.Connect(ctx, "10.0.0.1:80", nil)
	if err != nil || status != 200 {
		t.Fatalf("after the refused request: %d %v", status, err)
	}
	exchangeWithin(t, s, "fits", "the stream after the refused request stalled")

	addr, _ := serverFor(t, cfg, echo)
	p := dialRaw(t, addr)
	p.do(func() error {
		p.hbuf.Reset()
		// Fields each within the limit (a longer one is an HPACK error in
		// x/net's decoder), too many together.
		field := string(bytes.Repeat([]byte("y"), 400))
		for _, f := range [][2]string{{":method", "CONNECT"}, {":authority", "10.0.0.1:80"}, {"a", field}, {"b", field}, {"c", field}} {
			_ = p.henc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
		}
		return p.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: p.hbuf.Bytes(), EndHeaders: true})
	})
	var got string
	err = p.frames(5*time.Second, func(f http2.Frame) bool {
		if h, ok := f.(*http2.MetaHeadersFrame); ok && h.StreamID == 1 {
			got = h.PseudoValue("status")
			return true
		}
		return false
	})
	if err != nil || got != "431" {
		t.Fatalf("oversized request: status %q, %v", got, err)
	}
	p.alive(t)
	if cnt.get(ReasonHeaderListSize) != 1 {
		t.Fatalf("counted %v", cnt.m)
	}
}
