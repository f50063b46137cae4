package hbone

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The fuzzer plays one hostile peer holding one connection to a server:
// each input is a program of operations (opening streams, resetting them,
// DATA beyond the windows, WINDOW_UPDATE and SETTINGS abuse, PING floods,
// frames on closed streams, arbitrary raw frames, stopping to read). Along
// the way and at the end the server's resources must stay within its
// limits — handlers, queued streams, queued control frames, buffered
// bytes, goroutines — and once the peer leaves, everything is released.

// Operations of a fuzz program: one byte each, then its arguments.
const (
	opHeaders    = iota // kind, flags: a new stream (kind picks the handler)
	opReset             // stream, code
	opData              // stream, len16, flags (end, padded)
	opWindow            // stream, inc32
	opPing              // count: that many PINGs
	opSettings          // count, then count × (id16, val32)
	opRaw               // type, flags, stream32, len8, payload
	opReading           // toggle whether the peer reads
	opTrailers          // stream: HEADERS on an existing or closed stream
	opRapidReset        // count: HEADERS+RST_STREAM pairs
	opPause             // let the server and its timers run
	opGoAway            // the peer says goodbye
	opCount
)

// fuzzCfg makes every limit small enough for a short program to reach.
var fuzzCfg = Config{
	MaxStreams: 4, StreamWindow: 32 << 10, ConnWindow: 64 << 10, MaxFrame: 16 << 10,
	MaxHeaderListSize: 4 << 10, MaxControlFrames: 32, MaxEarlyResets: 16, ResetWindow: time.Second,
	HandshakeTimeout: 200 * time.Millisecond, WriteTimeout: 50 * time.Millisecond,
	PingInterval: 50 * time.Millisecond, PingTimeout: 100 * time.Millisecond, IdleTimeout: 200 * time.Millisecond,
}

// fuzzHandler picks a behaviour from the request's authority port.
func fuzzHandler(running *atomic.Int64) func(*Stream, *Request) {
	return func(s *Stream, r *Request) {
		running.Add(1)
		defer running.Add(-1)
		switch r.Authority {
		case "10.0.0.1:1": // echo
			if s.Respond(200) == nil {
				_, _ = io.Copy(s, s)
				_ = s.CloseWrite()
			}
		case "10.0.0.1:2": // a slow dial, then read and discard
			time.Sleep(2 * time.Millisecond)
			if s.Respond(200) == nil {
				_, _ = io.Copy(io.Discard, s)
			}
		case "10.0.0.1:3": // bulk to the peer
			if s.Respond(200) == nil {
				_, _ = s.Write(make([]byte, 64<<10))
				_ = s.CloseWrite()
			}
		case "10.0.0.1:4": // answer and never read
			_ = s.Respond(200)
			time.Sleep(50 * time.Millisecond)
		case "10.0.0.1:5":
			panic("handler panics")
		default:
			_ = s.Respond(400)
		}
	}
}

// program builds fuzz inputs (seeds).
type program []byte

func (p program) op(op byte, args ...byte) program { return append(append(p, op), args...) }

// prog reads a fuzz program's bytes.
type prog struct {
	b   []byte
	off int
}

func (p *prog) byte() byte {
	if p.off >= len(p.b) {
		return 0
	}
	p.off++
	return p.b[p.off-1]
}

func (p *prog) u16() uint16 { return uint16(p.byte())<<8 | uint16(p.byte()) }
func (p *prog) u32() uint32 { return uint32(p.u16())<<16 | uint32(p.u16()) }

func (p *prog) bytes(n int) []byte {
	n = min(n, len(p.b)-p.off)
	b := p.b[p.off : p.off+n]
	p.off += n
	return b
}

func FuzzHostilePeer(f *testing.F) {
	for _, seed := range hostileSeeds() {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 4096 {
			return
		}
		runHostileProgram(t, data)
	})
}

func hostileSeeds() []program {
	var seeds []program
	// Open streams of every kind, send a little, end them.
	var p program
	for k := byte(1); k <= 6; k++ {
		p = p.op(opHeaders, k, 0).op(opData, k-1, 0, 100, 1)
	}
	seeds = append(seeds, p.op(opPause))
	// Rapid Reset.
	seeds = append(seeds, program{}.op(opRapidReset, 255).op(opRapidReset, 255).op(opPause))
	// A PING flood while not reading.
	seeds = append(seeds, program{}.op(opReading).op(opPing, 255).op(opPing, 255).op(opPing, 255).op(opPause))
	// DATA beyond a stream's window, then beyond the connection's (three
	// streams within their windows, nobody reading).
	p = program{}.op(opHeaders, 4, 0)
	for range 3 {
		p = p.op(opData, 0, 0x40, 0x00, 0) // 16 KiB
	}
	seeds = append(seeds, p.op(opPause))
	p = program{}
	for i := range byte(3) {
		p = p.op(opHeaders, 4, 0).op(opData, i, 0x40, 0, 0).op(opData, i, 0x40, 0, 0)
	}
	seeds = append(seeds, p.op(opPause))
	// Window updates that overflow; settings that shrink and grow the windows.
	seeds = append(seeds, program{}.op(opHeaders, 3, 0).op(opWindow, 0, 0x7f, 0xff, 0xff, 0xff).
		op(opWindow, 0, 0x7f, 0xff, 0xff, 0xff).op(opSettings, 2, 0, 4, 0, 0, 0, 0, 0, 4, 0x7f, 0xff, 0xff, 0xff).op(opPause))
	// Frames on streams that are over.
	seeds = append(seeds, program{}.op(opHeaders, 1, 1).op(opReset, 0, 8).op(opTrailers, 0).op(opData, 0, 0, 10, 0).
		op(opTrailers, 0).op(opPause))
	// Raw frames: CONTINUATION out of the blue, DATA on stream 0, PUSH_PROMISE.
	seeds = append(seeds, program{}.op(opRaw, 9, 4, 0, 0, 0, 1, 3, 1, 2, 3).op(opRaw, 0, 0, 0, 0, 0, 0, 2, 0, 0).op(opPause),
		program{}.op(opRaw, 5, 4, 0, 0, 0, 1, 4, 0, 0, 0, 2).op(opPause))
	// A stuck reader under bulk: the write timeout.
	p = program{}.op(opHeaders, 3, 0).op(opWindow, 2, 0, 1, 0, 0).op(opReading)
	for range 20 {
		p = p.op(opPause)
	}
	seeds = append(seeds, p)
	return seeds
}

// runHostileProgram runs one program against a fresh server connection.
func runHostileProgram(t *testing.T, data []byte) {
	base := runtime.NumGoroutine()
	var running atomic.Int64
	server, client := net.Pipe()
	sc := NewServer(server, fuzzCfg, fuzzHandler(&running))
	served := make(chan struct{})
	go func() { defer close(served); _ = sc.Serve() }()

	// The peer: a framer over a buffer, flushed after each operation, and
	// a reader that can be told to stop.
	var reading atomic.Bool
	reading.Store(true)
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		buf := make([]byte, 32<<10)
		for {
			for !reading.Load() {
				select {
				case <-served:
					return
				case <-time.After(time.Millisecond):
				}
			}
			if _, err := client.Read(buf); err != nil {
				return
			}
		}
	}()
	bw := bufio.NewWriterSize(client, 64<<10)
	fr := http2.NewFramer(bw, nil)
	var hbuf bytes.Buffer
	henc := hpack.NewEncoder(&hbuf)
	headers := func(id uint32, authority string, end bool) error {
		hbuf.Reset()
		_ = henc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
		_ = henc.WriteField(hpack.HeaderField{Name: ":authority", Value: authority})
		return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hbuf.Bytes(), EndHeaders: true, EndStream: end})
	}
	_ = client.SetWriteDeadline(time.Now().Add(2 * time.Second))
	_, _ = bw.WriteString(http2.ClientPreface)
	_ = fr.WriteSettings()
	_ = bw.Flush()

	var next uint32 = 1
	stream := func(sel byte) uint32 { // one of the streams opened so far (or the next)
		return 2*(uint32(sel)%(next/2+1)) + 1
	}
	p := &prog{b: data}
	pauses := 0
	for p.off < len(p.b) {
		var err error
		switch p.byte() % opCount {
		case opHeaders:
			kind, flags := p.byte(), p.byte()
			err = headers(next, "10.0.0.1:"+string('0'+rune(kind%7)), flags&1 != 0)
			next += 2
		case opReset:
			err = fr.WriteRSTStream(stream(p.byte()), http2.ErrCode(p.byte()%14))
		case opData:
			id, n, flags := stream(p.byte()), int(p.u16()), p.byte()
			n = min(n, 16<<10)
			if flags&2 != 0 {
				err = fr.WriteDataPadded(id, flags&1 != 0, make([]byte, n/2), make([]byte, min(n/2, 255)))
			} else {
				err = fr.WriteData(id, flags&1 != 0, make([]byte, n))
			}
		case opWindow:
			sel, inc := p.byte(), p.u32()&(1<<31-1)
			id := uint32(0)
			if sel%3 != 0 {
				id = stream(sel)
			}
			if inc == 0 {
				inc = 1
			}
			err = fr.WriteWindowUpdate(id, inc)
		case opPing:
			for i := range int(p.byte()) {
				if err = fr.WritePing(false, [8]byte{byte(i)}); err != nil {
					break
				}
			}
		case opSettings:
			var ss []http2.Setting
			for range int(p.byte() % 8) {
				ss = append(ss, http2.Setting{ID: http2.SettingID(p.u16() % 10), Val: p.u32()})
			}
			err = fr.WriteSettings(ss...)
		case opRaw:
			typ, flags, id := p.byte(), p.byte(), p.u32()&(1<<31-1)
			err = fr.WriteRawFrame(http2.FrameType(typ%12), http2.Flags(flags), id, p.bytes(int(p.byte())))
		case opReading:
			reading.Store(!reading.Load())
		case opTrailers:
			hbuf.Reset()
			_ = henc.WriteField(hpack.HeaderField{Name: "x-trailer", Value: "1"})
			err = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: stream(p.byte()), BlockFragment: hbuf.Bytes(), EndHeaders: true, EndStream: true})
		case opRapidReset:
			for range int(p.byte()) {
				if err = headers(next, "10.0.0.1:2", false); err == nil {
					err = fr.WriteRSTStream(next, http2.ErrCodeCancel)
				}
				next += 2
				if err != nil {
					break
				}
			}
		case opPause:
			if pauses++; pauses <= 40 { // a program runs for 200 ms at most
				time.Sleep(5 * time.Millisecond)
			}
		case opGoAway:
			err = fr.WriteGoAway(0, http2.ErrCodeNo, nil)
		}
		if err == nil {
			err = bw.Flush()
		}
		checkBounded(t, sc, base, &running)
		if err != nil {
			break // the server hung up
		}
	}
	checkBounded(t, sc, base, &running)

	// The peer leaves: everything the connection held is released.
	client.Close()
	select {
	case <-served:
	case <-time.After(5 * time.Second):
		t.Fatal("the server did not return after the peer left")
	}
	<-readerDone
	deadline := time.Now().Add(5 * time.Second)
	for running.Load() > 0 || runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d handlers, %d goroutines (base %d) after the connection ended:\n%s",
				running.Load(), runtime.NumGoroutine(), base, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(time.Millisecond)
	}
}

// checkBounded asserts the server connection is within its limits.
func checkBounded(t *testing.T, c *Conn, base int, running *atomic.Int64) {
	t.Helper()
	cfg := c.cfg
	c.mu.Lock()
	streams, handlers, pending := len(c.streams), c.handlers, len(c.pending)
	var buffered, bufCap int
	for _, s := range c.streams {
		s.mu.Lock()
		buffered += len(s.buf) - s.off
		bufCap = max(bufCap, cap(s.buf))
		s.mu.Unlock()
	}
	c.mu.Unlock()
	c.cmu.Lock()
	queued := len(c.ctrl)
	c.cmu.Unlock()
	maxStreams := int(cfg.MaxStreams)
	switch {
	case streams > maxStreams:
		t.Fatalf("%d open streams, limit %d", streams, maxStreams)
	case handlers > maxStreams || running.Load() > int64(maxStreams):
		t.Fatalf("%d handlers (%d running), limit %d", handlers, running.Load(), maxStreams)
	case pending > 4*maxStreams:
		t.Fatalf("%d streams waiting for a handler", pending)
	case queued > cfg.MaxControlFrames+2: // + GOAWAY and close
		t.Fatalf("%d control frames queued, limit %d", queued, cfg.MaxControlFrames)
	case buffered > int(max(cfg.ConnWindow, defaultWindow)):
		t.Fatalf("%d bytes buffered, connection window %d", buffered, cfg.ConnWindow)
	case bufCap > 4*int(cfg.StreamWindow):
		t.Fatalf("a stream buffer of %d bytes, stream window %d", bufCap, cfg.StreamWindow)
	}
	// Handlers, the read loop, the control writer, the peer's reader, the
	// serving goroutine, a keepalive callback. A handler goroutine that
	// gave its place back may not have exited yet (it only has to be
	// scheduled once more): the count must settle within the bound, not
	// hold at every instant.
	limit := base + maxStreams + 8
	for range 100 {
		if runtime.NumGoroutine() <= limit {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	if g := runtime.NumGoroutine(); g > limit {
		buf := make([]byte, 1<<20)
		t.Fatalf("%d goroutines (base %d):\n%s", g, base, buf[:runtime.Stack(buf, true)])
	}
}
