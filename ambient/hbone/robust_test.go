package hbone

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// pipePair connects a client and a server over loopback TCP with
// small socket buffers (far below the flow-control windows): a write blocks once
// tens of KiB wait for the other side's read loop. Whatever can deadlock
// between two read loops and two writers does here.
func pipePair(t *testing.T, cfg Config, handler func(*Stream, *Request)) (*Conn, chan *Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	servers := make(chan *Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		tiny(c)
		sc := NewServer(c, cfg, handler)
		servers <- sc
		_ = sc.Serve()
	}()
	a, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	tiny(a)
	cc, err := Client(a, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc, servers
}

func tiny(c net.Conn) {
	tc := c.(*net.TCPConn)
	_ = tc.SetReadBuffer(32 << 10)
	_ = tc.SetWriteBuffer(32 << 10)
}

func connect(t *testing.T, cc *Conn) *Stream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, status, err := cc.Connect(ctx, "10.0.0.1:80", nil)
	if err != nil || status != 200 {
		t.Fatalf("connect: %d %v", status, err)
	}
	return s
}

// Both directions in bulk at once on one connection, on several streams,
// with socket buffers far below the windows: everything arrives intact.
func TestBidirectionalBulkNoDeadlock(t *testing.T) {
	cfg := Config{StreamWindow: 256 << 10, ConnWindow: 512 << 10}
	cc, _ := pipePair(t, cfg, echo)
	const streams, size = 4, 8 << 20
	done := make(chan error, streams)
	for i := 0; i < streams; i++ {
		s := connect(t, cc)
		go func() {
			data := bytes.Repeat([]byte{byte(i)}, size)
			want := sha256.Sum256(data)
			werr := writeAndClose(s, data)
			h := sha256.New()
			n, err := io.Copy(h, s)
			if err == nil {
				err = <-werr
			}
			if err == nil && (n != size || !bytes.Equal(h.Sum(nil), want[:])) {
				err = errors.New("echo differs")
			}
			done <- err
		}()
	}
	timeout := time.After(60 * time.Second)
	for i := 0; i < streams; i++ {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-timeout:
			t.Fatal("bidirectional bulk transfer stalled (deadlock between the two ends)")
		}
	}
}

// Streams closed with unread data must give their bytes back to the
// connection window: after more than a connection window's worth was
// dropped that way, a new stream still carries data.
func TestDroppedStreamsReturnConnectionWindow(t *testing.T) {
	cfg := Config{StreamWindow: 1 << 20, ConnWindow: 2 << 20}
	blast := func(s *Stream, r *Request) {
		if r.Authority == "10.0.0.1:80" {
			if err := s.Respond(200); err != nil {
				return
			}
			_, _ = s.Write(make([]byte, 1<<20)) // a full stream window
			_ = s.CloseWrite()
			return
		}
		echo(s, r)
	}
	cc, _ := pipePair(t, cfg, blast)
	for i := 0; i < 6; i++ { // 6 MiB dropped, three connection windows
		s := connect(t, cc)
		waitFor(t, func() bool {
			s.mu.Lock()
			defer s.mu.Unlock()
			return len(s.buf)-s.off == 1<<20
		})
		s.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, status, err := cc.Connect(ctx, "10.0.0.2:80", nil)
	if err != nil || status != 200 {
		t.Fatalf("connect: %d %v", status, err)
	}
	exchangeWithin(t, s, "still flowing", "connection window leaked: a new stream is starved")
}

// A reader that lags behind keeps a bounded buffer: what it already read
// is not kept.
func TestSlowReaderBufferBounded(t *testing.T) {
	cfg := Config{StreamWindow: 256 << 10, ConnWindow: 1 << 20}
	const size = 16 << 20
	cc, _ := pipePair(t, cfg, func(s *Stream, r *Request) {
		if err := s.Respond(200); err != nil {
			return
		}
		_, _ = s.Write(make([]byte, size))
		_ = s.CloseWrite()
	})
	s := connect(t, cc)
	buf := make([]byte, 7000) // never a whole frame
	var n, maxCap int
	for {
		// A reader a little slower than the network: frames keep arriving
		// while unread bytes wait, so the buffer is never empty then.
		time.Sleep(20 * time.Microsecond)
		k, err := s.Read(buf)
		n += k
		s.mu.Lock()
		maxCap = max(maxCap, cap(s.buf))
		s.mu.Unlock()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if n != size {
		t.Fatalf("read %d of %d bytes", n, size)
	}
	if limit := 4 * int(cfg.StreamWindow); maxCap > limit {
		t.Fatalf("receive buffer grew to %d bytes (stream window %d): read bytes are kept", maxCap, cfg.StreamWindow)
	}
}

// A connection that drops (no GOAWAY, no END_STREAM) is a truncation: the
// stream's reader gets an error, never a clean EOF.
func TestBrokenConnectionIsNotEOF(t *testing.T) {
	var sc *Conn
	cc, servers := pipePair(t, Config{}, func(s *Stream, r *Request) {
		_ = s.Respond(200)
		_, _ = s.Write([]byte("partial"))
		sc.nc.Close() // the peer's TCP goes away mid-stream
	})
	sc = <-servers
	s := connect(t, cc)
	got, err := io.ReadAll(s)
	if err == nil {
		t.Fatalf("read %q and a clean EOF from a broken connection", got)
	}
}

// Shutdown (GOAWAY) lets the open stream finish, refuses new ones, and
// closes the server connection after its last stream.
func TestServerShutdownDrains(t *testing.T) {
	release := make(chan struct{})
	cc, servers := pipePair(t, Config{}, func(s *Stream, r *Request) {
		if err := s.Respond(200); err != nil {
			return
		}
		<-release
		_, _ = io.Copy(s, s)
		_ = s.CloseWrite()
	})
	s := connect(t, cc)
	sc := <-servers
	sc.Shutdown()
	waitFor(t, cc.GoingAway)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, _, err := cc.Connect(ctx, "10.0.0.1:80", nil); !errors.Is(err, ErrGoAway) {
		t.Fatalf("new stream after GOAWAY: %v", err)
	}
	close(release)
	exchangeWithin(t, s, "in flight", "the stream in flight did not finish after GOAWAY")
	s.Close()
	select {
	case <-sc.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the server connection stayed open after its last stream")
	}
}

// exchangeWithin echoes msg through s, failing with stalled if it takes
// more than 10 s (a stall must fail the test, not hang it).
func exchangeWithin(t *testing.T, s *Stream, msg, stalled string) {
	t.Helper()
	got := make(chan string, 1)
	go func() { b, err := exchangeErr(s, []byte(msg)); got <- fmt.Sprintf("%s %v", b, err) }()
	select {
	case b := <-got:
		if b != msg+" <nil>" {
			t.Fatalf("got %q", b)
		}
	case <-time.After(10 * time.Second):
		t.Fatal(stalled)
	}
}

// exchangeErr writes data, half-closes and reads everything back.
func exchangeErr(s *Stream, data []byte) ([]byte, error) {
	werr := writeAndClose(s, data)
	got, err := io.ReadAll(s)
	if err == nil {
		err = <-werr
	}
	return got, err
}

// The read loop never waits for the write lock: with a writer holding it
// (as one blocked on a full socket does), frames that need an answer
// (PING, SETTINGS) and those that do not (GOAWAY) are still read. A read
// loop that stopped there would stop the peer too when it waits for us to
// read (both ends writing bulk at once).
func TestReadLoopDoesNotWaitForWriters(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	peer := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			peer <- c
		}
	}()
	cc, _ := dialClient(t, l.Addr().String())
	defer cc.Close()
	raw := <-peer
	defer raw.Close()
	if _, err := io.ReadFull(raw, make([]byte, len(http2.ClientPreface))); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(raw, raw)
	cc.wmu.Lock() // a writer stuck in a flush
	locked := true
	defer func() {
		if locked {
			cc.wmu.Unlock()
		}
	}()
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := fr.WritePing(false, [8]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := fr.WriteGoAway(0, http2.ErrCodeNo, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, cc.GoingAway)
	// The answers go out once the writer lets go.
	cc.wmu.Unlock()
	locked = false
	pings := 0
	_ = raw.SetReadDeadline(time.Now().Add(5 * time.Second))
	for pings < 3 {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("after %d PING acks: %v", pings, err)
		}
		if p, ok := f.(*http2.PingFrame); ok && p.IsAck() {
			pings++
		}
	}
}

// writeAndClose writes data and half-closes, on a goroutine of its own.
func writeAndClose(s *Stream, data []byte) <-chan error {
	werr := make(chan error, 1)
	go func() {
		_, err := s.Write(data)
		if err == nil {
			err = s.CloseWrite()
		}
		werr <- err
	}()
	return werr
}

// dialClient opens a client connection to addr.
func dialClient(t *testing.T, addr string) (*Conn, net.Conn) {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := Client(nc, Config{})
	if err != nil {
		t.Fatal(err)
	}
	return cc, nc
}

// With a sink, the read loop writes what it can straight to the
// application socket and Read carries the rest: the application sees
// every byte once, in order, whichever way each frame went.
func TestSinkKeepsOrder(t *testing.T) {
	const msgs = 5000
	cc, _ := pipePair(t, Config{}, func(s *Stream, r *Request) {
		if err := s.Respond(200); err != nil {
			return
		}
		for i := 0; i < msgs; i++ {
			// Sizes from 1 byte to a few frames, numbered in order.
			b := bytes.Repeat([]byte{byte(i)}, 1+(i*7919)%40000)
			if _, err := s.Write(b); err != nil {
				return
			}
		}
		_ = s.CloseWrite()
	})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	appEnd, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer appEnd.Close()
	proxyEnd, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer proxyEnd.Close()
	s := connect(t, cc)
	rc, err := proxyEnd.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	s.SetSink(rc)
	copied := make(chan int64, 1)
	go func() {
		n, _ := io.Copy(struct{ io.Writer }{proxyEnd}, s) // the reader's share
		_ = proxyEnd.(*net.TCPConn).CloseWrite()
		copied <- n
	}()
	want := sha256.New()
	var total int64
	for i := 0; i < msgs; i++ {
		k := 1 + (i*7919)%40000
		want.Write(bytes.Repeat([]byte{byte(i)}, k))
		total += int64(k)
	}
	got := sha256.New()
	n, err := io.Copy(got, appEnd)
	if err != nil {
		t.Fatal(err)
	}
	byReader := <-copied
	if n != total || !bytes.Equal(got.Sum(nil), want.Sum(nil)) {
		t.Fatalf("the application got %d bytes (of %d) or out of order", n, total)
	}
	if d := s.Delivered(); d == 0 || d+byReader != total {
		t.Fatalf("delivered directly %d + by the reader %d != %d (or nothing went directly)", d, byReader, total)
	}
	t.Logf("%d of %d bytes written by the read loop directly", s.Delivered(), total)
}
