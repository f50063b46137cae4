// Package hbone is the HTTP/2 of HBONE: CONNECT streams over one
// connection, and nothing else HTTP/2 can do. It exists because a node
// proxy spends its time here, and a general HTTP/2 implementation does not
// fit the job:
//
//   - Every stream is a byte pipe in both directions that must half-close
//     (END_STREAM one way while the other keeps flowing). net/http's server
//     cannot end a response while it still reads the request.
//   - Latency is goroutine hand-offs. Here a writer frames its bytes onto
//     the connection itself, under a lock, and flushes; the one reader per
//     connection hands DATA straight to the stream's reader. A
//     general server passes every frame through a serve loop and an
//     asynchronous frame writer: three hand-offs each way instead of one.
//
// Framing and HPACK are golang.org/x/net/http2's Framer and hpack; the
// protocol (preface, settings, flow control, stream states, GOAWAY) is
// RFC 9113's, restricted to what HBONE peers (ztunnel, Istio's Go hbone,
// Envoy waypoints) send.
package hbone

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Defaults of Config, as ztunnel's: windows large enough for bulk transfer
// over one stream, and DATA frames larger than HTTP/2's 16 KiB (fewer
// frames cost less per byte).
const (
	DefaultMaxStreams   = 100
	DefaultStreamWindow = 4 << 20
	DefaultConnWindow   = 16 << 20
	DefaultMaxFrame     = 1 << 20
)

// Config is one side's HTTP/2 settings. Zero fields take the defaults.
type Config struct {
	// MaxStreams is the concurrent streams a server allows per connection
	// (SETTINGS_MAX_CONCURRENT_STREAMS); default DefaultMaxStreams.
	MaxStreams uint32
	// StreamWindow and ConnWindow are the receive windows: how much a peer
	// may send ahead on one stream and on the whole connection; default
	// DefaultStreamWindow (4 MiB) and DefaultConnWindow (16 MiB).
	StreamWindow, ConnWindow uint32
	// MaxFrame is the largest frame accepted (SETTINGS_MAX_FRAME_SIZE);
	// default DefaultMaxFrame (1 MiB).
	MaxFrame uint32
}

// WithDefaults is c with its zero fields set to the defaults.
func (c Config) WithDefaults() Config {
	if c.MaxStreams == 0 {
		c.MaxStreams = DefaultMaxStreams
	}
	if c.StreamWindow == 0 {
		c.StreamWindow = DefaultStreamWindow
	}
	if c.ConnWindow == 0 {
		c.ConnWindow = DefaultConnWindow
	}
	if c.MaxFrame == 0 {
		c.MaxFrame = DefaultMaxFrame
	}
	return c
}

// Errors of streams and connections.
var (
	ErrClosed      = errors.New("hbone: connection closed")
	ErrStreamReset = errors.New("hbone: stream reset by peer")
	ErrGoAway      = errors.New("hbone: peer is going away")
	ErrRefused     = errors.New("hbone: no more streams on this connection")
)

const (
	defaultWindow   = 65535 // RFC 9113 initial windows
	defaultMaxFrame = 16384
	maxHeaderList   = 64 << 10
)

// Conn is one HTTP/2 connection carrying CONNECT streams.
type Conn struct {
	nc     net.Conn
	cfg    Config
	server bool

	// Writing: the framer writes into bw; whoever holds wmu writes frames
	// and flushes. HPACK encoding state is part of the write side. Lock
	// order: wmu before mu; never wmu while holding mu or a stream's mu.
	wmu  sync.Mutex
	bw   *bufio.Writer
	fr   *http2.Framer
	henc *hpack.Encoder
	hbuf bytes.Buffer

	// Control frames waiting for wmu (control.go).
	cmu         sync.Mutex
	ctrl        []ctrlFrame
	ctrlSpare   []ctrlFrame
	ctrlPending atomic.Bool
	kick        chan struct{}

	mu          sync.Mutex
	cond        *sync.Cond // send windows grew, a stream or the connection changed state
	streams     map[uint32]*Stream
	nextID      uint32 // client: next stream id
	lastPeerID  uint32 // server: highest stream id the peer opened
	sendWindow  int64  // connection-level send window
	peerWindow  int64  // peer's SETTINGS_INITIAL_WINDOW_SIZE for new streams
	peerMaxFr   uint32
	peerStreams uint32 // peer's SETTINGS_MAX_CONCURRENT_STREAMS
	recvUnacked int64  // connection-level bytes consumed and not yet returned by WINDOW_UPDATE
	goAway      bool
	prefaced    bool  // our SETTINGS are out: a GOAWAY may follow
	halfClosed  bool  // drained: our side of the transport is closed
	err         error // set when the connection is dead
	done        chan struct{}

	// server: called for every new stream, on a goroutine of its own.
	handler func(*Stream, *Request)
}

func newConn(nc net.Conn, cfg Config, server bool) *Conn {
	cfg = cfg.WithDefaults()
	c := &Conn{nc: nc, cfg: cfg, server: server, streams: map[uint32]*Stream{}, nextID: 1,
		sendWindow: defaultWindow, peerWindow: defaultWindow, peerMaxFr: defaultMaxFrame, peerStreams: 100,
		done: make(chan struct{}), kick: make(chan struct{}, 1)}
	c.cond = sync.NewCond(&c.mu)
	c.bw = bufio.NewWriterSize(nc, 32<<10)
	c.fr = http2.NewFramer(c.bw, nc)
	c.fr.SetMaxReadFrameSize(cfg.MaxFrame)
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = maxHeaderList
	c.fr.SetReuseFrames()
	c.henc = hpack.NewEncoder(&c.hbuf)
	return c
}

// settings are what this side announces (and the connection window).
func (c *Conn) writePreface() error {
	c.wmu.Lock()
	defer c.unlockW()
	if !c.server {
		if _, err := c.bw.WriteString(http2.ClientPreface); err != nil {
			return err
		}
	}
	s := []http2.Setting{
		{ID: http2.SettingInitialWindowSize, Val: c.cfg.StreamWindow},
		{ID: http2.SettingMaxFrameSize, Val: c.cfg.MaxFrame},
		{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderList},
	}
	if c.server {
		s = append(s, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: c.cfg.MaxStreams})
	} else {
		s = append(s, http2.Setting{ID: http2.SettingEnablePush, Val: 0})
	}
	if err := c.fr.WriteSettings(s...); err != nil {
		return err
	}
	c.mu.Lock()
	c.prefaced = true
	c.mu.Unlock()
	if c.cfg.ConnWindow > defaultWindow {
		if err := c.fr.WriteWindowUpdate(0, c.cfg.ConnWindow-defaultWindow); err != nil {
			return err
		}
	}
	return c.bw.Flush()
}

// Client starts an HTTP/2 client on an established (TLS) connection.
func Client(nc net.Conn, cfg Config) (*Conn, error) {
	c := newConn(nc, cfg, false)
	if err := c.writePreface(); err != nil {
		nc.Close()
		return nil, err
	}
	go c.controlWriter()
	go c.readLoop()
	return c, nil
}

// Serve runs an HTTP/2 server on an established (TLS) connection until it
// ends, calling handler for every stream the peer opens (on a goroutine of
// its own). The handler answers with Stream.Respond.
func Serve(nc net.Conn, cfg Config, handler func(*Stream, *Request)) error {
	return NewServer(nc, cfg, handler).Serve()
}

// NewServer prepares a server connection; Serve runs it. The caller may
// keep the Conn to Shutdown it (GOAWAY) while it serves.
func NewServer(nc net.Conn, cfg Config, handler func(*Stream, *Request)) *Conn {
	c := newConn(nc, cfg, true)
	c.handler = handler
	return c
}

// Serve runs a server connection made by NewServer until it ends.
func (c *Conn) Serve() error {
	nc := c.nc
	preface := make([]byte, len(http2.ClientPreface))
	_ = nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(nc, preface); err != nil {
		err = fmt.Errorf("hbone: reading the client preface: %w", err)
		c.fail(err)
		return err
	}
	_ = nc.SetReadDeadline(time.Time{})
	if string(preface) != http2.ClientPreface {
		err := errors.New("hbone: not an HTTP/2 client (bad preface)")
		c.fail(err)
		return err
	}
	if err := c.writePreface(); err != nil {
		c.fail(err)
		return err
	}
	c.mu.Lock()
	early := c.goAway // Shutdown before we started: say it now
	c.mu.Unlock()
	if early {
		c.writeGoAway()
	}
	go c.controlWriter()
	c.readLoop()
	return c.Err()
}

// Err is why the connection ended (nil while it is up).
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if errors.Is(c.err, io.EOF) {
		return nil
	}
	return c.err
}

// Done is closed when the connection ends.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Available reports whether a new stream can be opened now.
func (c *Conn) Available(limit int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := min(int(c.peerStreams), limit)
	return c.err == nil && !c.goAway && len(c.streams) < n && c.nextID < 1<<31-1
}

// GoingAway reports whether the connection takes no new streams any more
// (the peer sent GOAWAY, or it ended).
func (c *Conn) GoingAway() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.goAway || c.err != nil
}

// Active is the number of open streams.
func (c *Conn) Active() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.streams)
}

// Close ends the connection and every stream on it.
func (c *Conn) Close() error {
	c.fail(ErrClosed)
	return nil
}

// Shutdown tells the peer no more streams will be accepted (GOAWAY) and
// lets open streams finish; a server connection then closes itself once
// its last stream is over (a client's is closed by its pool).
func (c *Conn) Shutdown() {
	c.mu.Lock()
	if c.goAway || c.err != nil {
		c.mu.Unlock()
		return
	}
	c.goAway = true
	if !c.prefaced {
		c.mu.Unlock()
		return // Serve sends it after our SETTINGS
	}
	c.mu.Unlock()
	c.writeGoAway()
}

// writeGoAway sends GOAWAY (goAway is already set) and closes the
// connection if no stream is left.
func (c *Conn) writeGoAway() {
	c.mu.Lock()
	last := c.lastPeerID
	c.mu.Unlock()
	c.wmu.Lock()
	_ = c.fr.WriteGoAway(last, http2.ErrCodeNo, nil)
	_ = c.bw.Flush()
	c.unlockW()
	c.cond.Broadcast()
	c.closeIfDrained()
}

// closeIfDrained ends a server connection that sent GOAWAY and has no
// stream left. It half-closes (the control writer sends what is queued,
// then TLS close_notify and FIN) and keeps reading until the peer closes
// too, for at most drainLinger: closing outright with the peer's frames
// unread would make the kernel answer with RST, and an RST makes the
// peer's kernel discard what it had not read yet, such as the end of the
// last stream.
func (c *Conn) closeIfDrained() {
	c.mu.Lock()
	drained := c.server && c.prefaced && c.goAway && !c.halfClosed && c.err == nil && len(c.streams) == 0
	if drained {
		c.halfClosed = true
	}
	c.mu.Unlock()
	if drained {
		c.sendControl(ctrlFrame{kind: ctrlCloseWrite})
		_ = c.nc.SetReadDeadline(time.Now().Add(drainLinger))
	}
}

// drainLinger bounds how long a drained connection waits for its peer to
// close.
const drainLinger = 5 * time.Second

// fail ends the connection with err (the first error wins).
func (c *Conn) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = err
	streams := c.streams
	c.streams = map[uint32]*Stream{}
	close(c.done)
	c.mu.Unlock()
	c.cond.Broadcast()
	// A connection that ended without GOAWAY (io.EOF: the peer's TCP
	// closed) truncates every stream still open: their readers must not
	// mistake it for the peer's END_STREAM.
	serr := err
	if errors.Is(err, io.EOF) {
		serr = io.ErrUnexpectedEOF
	}
	for _, s := range streams {
		s.abort(serr)
	}
	c.nc.Close()
}

// protocolError ends the connection with GOAWAY.
func (c *Conn) protocolError(code http2.ErrCode, format string, args ...any) {
	err := fmt.Errorf("hbone: protocol error: "+format, args...)
	c.mu.Lock()
	last := c.lastPeerID
	c.mu.Unlock()
	// Best effort: a writer blocked on a full socket holds wmu, and the
	// connection is closed either way.
	if c.wmu.TryLock() {
		_ = c.fr.WriteGoAway(last, code, []byte(truncate(err.Error())))
		_ = c.bw.Flush()
		c.wmu.Unlock()
	}
	c.fail(err)
}

func truncate(s string) string {
	if len(s) > 128 {
		return s[:128]
	}
	return s
}

// Request is what a peer asks for in a stream's HEADERS.
type Request struct {
	Method    string
	Authority string
	// Header holds the regular fields, names in lower case (HTTP/2's).
	Header map[string][]string
}

// Get returns a header's first value.
func (r *Request) Get(name string) string {
	if v := r.Header[strings.ToLower(name)]; len(v) > 0 {
		return v[0]
	}
	return ""
}

// Connect opens a CONNECT stream to authority (ip:port) with the given
// extra header fields, and waits for the response status. A status other
// than 200 comes back with the stream already finished.
func (c *Conn) Connect(ctx context.Context, authority string, header [][2]string) (*Stream, int, error) {
	if c.server {
		return nil, 0, errors.New("hbone: Connect on a server connection")
	}
	fields := append([][2]string{{":method", "CONNECT"}, {":authority", authority}}, header...)
	// Ids must reach the wire in increasing order: allocate under wmu. The
	// stream is checked, created and registered in one critical section,
	// so no SETTINGS (window size) or GOAWAY can fall in between.
	c.wmu.Lock()
	c.mu.Lock()
	var refuse error
	switch {
	case c.err != nil:
		refuse = c.err
	case c.goAway:
		refuse = ErrGoAway
	case len(c.streams) >= int(c.peerStreams) || c.nextID >= 1<<31-1:
		refuse = ErrRefused
	}
	if refuse != nil {
		c.mu.Unlock()
		c.unlockW()
		return nil, 0, refuse
	}
	s := c.newStreamLocked(c.nextID)
	c.nextID += 2
	c.streams[s.id] = s
	c.mu.Unlock()
	// Resets queued before this stream was counted go out first: the
	// peer must not see more open streams than we do.
	c.writeControlLocked()
	err := c.writeHeadersLocked(s.id, fields, false)
	c.unlockW()
	if err != nil {
		c.fail(err)
		return nil, 0, err
	}
	select {
	case <-s.respCh:
	case <-ctx.Done():
		s.Reset(http2.ErrCodeCancel)
		return nil, 0, ctx.Err()
	}
	s.mu.Lock()
	status, rerr := s.status, s.err
	s.mu.Unlock()
	if status == 0 {
		if rerr == nil {
			rerr = ErrClosed
		}
		return nil, 0, rerr
	}
	if status != 200 {
		s.Close()
	}
	return s, status, nil
}

// writeHeadersLocked encodes and writes a header block (with CONTINUATION
// frames when it exceeds the peer's frame size). Caller holds wmu.
func (c *Conn) writeHeadersLocked(id uint32, fields [][2]string, endStream bool) error {
	c.hbuf.Reset()
	for _, f := range fields {
		if err := c.henc.WriteField(hpack.HeaderField{Name: strings.ToLower(f[0]), Value: f[1]}); err != nil {
			return err
		}
	}
	block := c.hbuf.Bytes()
	c.mu.Lock()
	max := int(c.peerMaxFr)
	c.mu.Unlock()
	first := block
	if len(first) > max {
		first = block[:max]
	}
	if err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: first,
		EndStream: endStream, EndHeaders: len(first) == len(block)}); err != nil {
		return err
	}
	for rest := block[len(first):]; len(rest) > 0; {
		n := min(len(rest), max)
		if err := c.fr.WriteContinuation(id, n == len(rest), rest[:n]); err != nil {
			return err
		}
		rest = rest[n:]
	}
	return c.bw.Flush()
}

func (c *Conn) newStreamLocked(id uint32) *Stream {
	s := &Stream{c: c, id: id, sendWindow: c.peerWindow, respCh: make(chan struct{})}
	s.cond = sync.NewCond(&s.mu)
	return s
}

// removeIfDone forgets a stream once both directions are over.
func (c *Conn) removeIfDone(s *Stream) {
	s.mu.Lock()
	done := (s.recvEnd || s.err != nil) && (s.sentEnd || s.err != nil)
	s.mu.Unlock()
	if !done {
		return
	}
	c.mu.Lock()
	if c.streams[s.id] == s {
		delete(c.streams, s.id)
	}
	c.mu.Unlock()
	c.cond.Broadcast()
	c.closeIfDrained()
}
