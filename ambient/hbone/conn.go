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
	"os"
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

// Defaults of the limits that keep a hostile or dead peer from holding
// more than its share (see Config).
const (
	// DefaultMaxHeaderListSize is ztunnel's server limit (64 KiB): a
	// CONNECT carries a handful of short fields.
	DefaultMaxHeaderListSize = 64 << 10
	// DefaultMaxControlFrames: x/net's server allows 10000; our control
	// frames are a few dozen bytes each and a well-behaved peer never has
	// more than about two per stream waiting, so 1000 is plenty.
	DefaultMaxControlFrames = 1000
	// DefaultMaxEarlyResets per DefaultResetWindow: four times the
	// streams a connection may have open, per 10 s.
	DefaultMaxEarlyResets = 4 * DefaultMaxStreams
	DefaultResetWindow    = 10 * time.Second
	// DefaultHandshakeTimeout bounds the preface and first SETTINGS.
	DefaultHandshakeTimeout = 10 * time.Second
	// DefaultWriteTimeout: a write that makes no progress for this long
	// means the peer stopped reading.
	DefaultWriteTimeout = 20 * time.Second
	// DefaultPingInterval and DefaultPingTimeout are ztunnel's keepalive.
	DefaultPingInterval = 10 * time.Second
	DefaultPingTimeout  = 20 * time.Second
	// DefaultIdleTimeout closes connections without streams.
	DefaultIdleTimeout = 10 * time.Minute
)

// Config is one side's HTTP/2 settings and limits. Zero fields take the
// defaults; a negative duration or count turns that limit off.
type Config struct {
	// MaxStreams is the concurrent streams a server allows per connection
	// (SETTINGS_MAX_CONCURRENT_STREAMS), and the handlers it runs at once:
	// a stream the peer resets keeps its handler's place until the
	// handler returns. Default DefaultMaxStreams.
	MaxStreams uint32
	// StreamWindow and ConnWindow are the receive windows: how much a peer
	// may send ahead on one stream and on the whole connection; default
	// DefaultStreamWindow (4 MiB) and DefaultConnWindow (16 MiB). A peer
	// that sends more is reset (stream) or disconnected (connection) with
	// FLOW_CONTROL_ERROR.
	StreamWindow, ConnWindow uint32
	// MaxFrame is the largest frame accepted (SETTINGS_MAX_FRAME_SIZE);
	// default DefaultMaxFrame (1 MiB).
	MaxFrame uint32
	// MaxHeaderListSize is the largest header list accepted
	// (SETTINGS_MAX_HEADER_LIST_SIZE); a server answers a larger request
	// with 431. Default DefaultMaxHeaderListSize.
	MaxHeaderListSize uint32
	// MaxControlFrames bounds the control frames (PING and SETTINGS acks,
	// RST_STREAM, WINDOW_UPDATE) waiting for the socket: a peer that makes
	// us queue more sends faster than it reads, and is disconnected.
	MaxControlFrames int
	// MaxEarlyResets bounds, per ResetWindow, the streams a server sees
	// reset before it answered them (by the peer, or for the peer's stream
	// errors), and the streams it queues for a handler; beyond it, GOAWAY
	// ENHANCE_YOUR_CALM. Defaults DefaultMaxEarlyResets per
	// DefaultResetWindow.
	MaxEarlyResets int
	ResetWindow    time.Duration
	// HandshakeTimeout bounds the wait for the peer's preface and
	// SETTINGS; default DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// WriteTimeout: a write that makes no progress for this long ends the
	// connection (the peer stopped reading); default DefaultWriteTimeout.
	WriteTimeout time.Duration
	// PingInterval: after this long without a frame from the peer, PING
	// it; PingTimeout: without a frame for this long after the PING, the
	// peer is gone and the connection is closed. Defaults
	// DefaultPingInterval and DefaultPingTimeout.
	PingInterval, PingTimeout time.Duration
	// IdleTimeout: a connection without streams for this long is closed (a
	// server's after GOAWAY); default DefaultIdleTimeout.
	IdleTimeout time.Duration
	// CountError, when set, is called with one of the Reason* constants
	// for every limit a peer hits and every protocol error it makes.
	CountError func(reason string)
}

// Reasons passed to Config.CountError.
const (
	// ReasonRapidReset: too many streams reset before their answer, or
	// queued for a handler (GOAWAY ENHANCE_YOUR_CALM).
	ReasonRapidReset = "rapid_reset"
	// ReasonControlFlood: control frames queued beyond MaxControlFrames.
	ReasonControlFlood = "control_flood"
	// ReasonFlowControl: DATA beyond the connection window (GOAWAY
	// FLOW_CONTROL_ERROR); ReasonStreamFlowControl: beyond a stream's
	// window (RST_STREAM FLOW_CONTROL_ERROR).
	ReasonFlowControl       = "flow_control"
	ReasonStreamFlowControl = "stream_flow_control"
	// ReasonStreamClosed: frames on a stream the peer had ended or reset
	// (RST_STREAM STREAM_CLOSED).
	ReasonStreamClosed = "stream_closed"
	// ReasonStreamLimit: a stream beyond SETTINGS_MAX_CONCURRENT_STREAMS
	// or after GOAWAY (RST_STREAM REFUSED_STREAM).
	ReasonStreamLimit = "stream_limit"
	// ReasonHeaderListSize: a header list beyond MaxHeaderListSize.
	ReasonHeaderListSize = "header_list_too_large"
	// ReasonProtocol: any other connection error (GOAWAY with its code).
	ReasonProtocol = "protocol_error"
	// ReasonHandshakeTimeout, ReasonWriteTimeout, ReasonKeepaliveTimeout:
	// the peer did not complete the handshake, stopped reading, or stopped
	// answering.
	ReasonHandshakeTimeout = "handshake_timeout"
	ReasonWriteTimeout     = "write_timeout"
	ReasonKeepaliveTimeout = "keepalive_timeout"
)

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
	if c.MaxHeaderListSize == 0 {
		c.MaxHeaderListSize = DefaultMaxHeaderListSize
	}
	if c.MaxControlFrames == 0 {
		c.MaxControlFrames = DefaultMaxControlFrames
	}
	if c.MaxEarlyResets == 0 {
		c.MaxEarlyResets = 4 * int(c.MaxStreams)
	}
	orDefault := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	orDefault(&c.ResetWindow, DefaultResetWindow)
	orDefault(&c.HandshakeTimeout, DefaultHandshakeTimeout)
	orDefault(&c.WriteTimeout, DefaultWriteTimeout)
	orDefault(&c.PingInterval, DefaultPingInterval)
	orDefault(&c.PingTimeout, DefaultPingTimeout)
	orDefault(&c.IdleTimeout, DefaultIdleTimeout)
	return c
}

// Errors of streams and connections.
var (
	ErrClosed      = errors.New("hbone: connection closed")
	ErrStreamReset = errors.New("hbone: stream reset by peer")
	ErrGoAway      = errors.New("hbone: peer is going away")
	ErrRefused     = errors.New("hbone: no more streams on this connection")
	// ErrHeaderListTooLarge: a request larger than the peer accepts
	// (its SETTINGS_MAX_HEADER_LIST_SIZE) is not sent.
	ErrHeaderListTooLarge = errors.New("hbone: header list larger than the peer accepts")
	// ErrWriteTimeout: a write made no progress for Config.WriteTimeout.
	ErrWriteTimeout = errors.New("hbone: write timed out (the peer stopped reading)")
	// ErrHandshakeTimeout: no preface or SETTINGS within
	// Config.HandshakeTimeout.
	ErrHandshakeTimeout = errors.New("hbone: handshake timed out")
	// ErrKeepaliveTimeout: the peer did not answer a PING.
	ErrKeepaliveTimeout = errors.New("hbone: keepalive timed out (the peer is gone)")
	// ErrIdle: the connection had no streams for Config.IdleTimeout.
	ErrIdle = errors.New("hbone: idle connection closed")
)

const (
	defaultWindow   = 65535 // RFC 9113 initial windows
	defaultMaxFrame = 16384
	maxWindow       = 1<<31 - 1
	// writeChunk is how much one write to the socket carries (up to twice
	// that for the last piece of a larger one), so that a write making
	// progress on a slow link keeps renewing its deadline.
	writeChunk = 64 << 10
)

// Conn is one HTTP/2 connection carrying CONNECT streams.
type Conn struct {
	nc     net.Conn
	cfg    Config
	server bool

	// Writing: the framer writes into bw; whoever holds wmu writes frames
	// and flushes. HPACK encoding state is part of the write side. Lock
	// order: wmu before mu; never wmu while holding mu or a stream's mu.
	// Nothing waits for wmu that must not wait for the network: writes
	// give up after WriteTimeout without progress, and Shutdown, Close
	// and the read loop never take it (they queue control frames).
	wmu  sync.Mutex
	bw   *bufio.Writer
	fr   *http2.Framer
	henc *hpack.Encoder
	hbuf bytes.Buffer
	// wdRenew: when the socket's write deadline must be pushed out again
	// (under wmu).
	wdRenew time.Time

	// Control frames waiting for wmu (control.go).
	cmu         sync.Mutex
	ctrl        []ctrlFrame
	ctrlSpare   []ctrlFrame
	ctrlPending atomic.Bool
	kick        chan struct{}

	mu         sync.Mutex
	cond       *sync.Cond // send windows grew, a stream or the connection changed state
	streams    map[uint32]*Stream
	nextID     uint32 // client: next stream id
	lastPeerID uint32 // server: highest stream id the peer opened
	// goAwaySent: a connection error's GOAWAY went out; the socket is
	// half-closed and drained for a moment before it is closed, so the
	// peer reads the error code instead of losing it to our RST.
	goAwaySent  atomic.Bool
	sendWindow  int64 // connection-level send window
	recvWindow  int64 // connection-level: what the peer may still send
	peerWindow  int64 // peer's SETTINGS_INITIAL_WINDOW_SIZE for new streams
	peerMaxFr   uint32
	peerStreams uint32 // peer's SETTINGS_MAX_CONCURRENT_STREAMS
	peerMaxHdr  uint32 // peer's SETTINGS_MAX_HEADER_LIST_SIZE (0: unlimited)
	recvUnacked int64  // connection-level bytes consumed and not yet returned by WINDOW_UPDATE
	goAway      bool
	prefaced    bool  // our SETTINGS are out: a GOAWAY may follow
	halfClosed  bool  // drained: our side of the transport is closed
	handshook   bool  // the peer's SETTINGS arrived
	err         error // set when the connection is dead
	done        chan struct{}

	// server: handlers running (at most cfg.MaxStreams) and streams
	// waiting for one of them to return (serve.go).
	handlers int
	pending  []pendingStream
	// server: streams reset before their answer in the current window.
	resetsSince time.Time
	resets      int

	// Keepalive and idle timer (serve.go): frames read so far, as last
	// seen by the timer and since when; an unanswered PING.
	framesRead atomic.Uint64
	timer      *time.Timer
	seen       uint64
	quietSince time.Time
	pingSentAt time.Time
	idleSince  time.Time

	// server: called for every new stream, on a goroutine of its own.
	handler func(*Stream, *Request)
}

func newConn(nc net.Conn, cfg Config, server bool) *Conn {
	cfg = cfg.WithDefaults()
	c := &Conn{nc: nc, cfg: cfg, server: server, streams: map[uint32]*Stream{}, nextID: 1,
		sendWindow: defaultWindow, recvWindow: int64(max(cfg.ConnWindow, defaultWindow)),
		peerWindow: defaultWindow, peerMaxFr: defaultMaxFrame, peerStreams: 100,
		done: make(chan struct{}), kick: make(chan struct{}, 1)}
	c.cond = sync.NewCond(&c.mu)
	c.bw = bufio.NewWriterSize(timedWriter{c}, 32<<10)
	c.fr = http2.NewFramer(c.bw, nc)
	c.fr.SetMaxReadFrameSize(cfg.MaxFrame)
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = cfg.MaxHeaderListSize
	c.fr.SetReuseFrames()
	c.henc = hpack.NewEncoder(&c.hbuf)
	return c
}

// timedWriter writes to the connection's socket with a deadline: a write
// that makes no progress for WriteTimeout fails (and ends the
// connection). Writes go in chunks, each renewing the deadline, so a slow
// but moving peer is not cut off. Called under wmu.
type timedWriter struct{ c *Conn }

func (w timedWriter) Write(p []byte) (int, error) {
	c := w.c
	timeout := c.cfg.WriteTimeout
	if timeout < 0 {
		return c.nc.Write(p)
	}
	n := 0
	for n < len(p) {
		// Renewing the deadline costs a timer update: do it when half of
		// it is used up, so each chunk has between timeout/2 and timeout.
		if now := time.Now(); now.After(c.wdRenew) {
			_ = c.nc.SetWriteDeadline(now.Add(timeout))
			c.wdRenew = now.Add(timeout / 2)
		}
		k := len(p) - n
		if k >= 2*writeChunk { // no short tail: a frame is one write
			k = writeChunk
		}
		k, err := c.nc.Write(p[n : n+k])
		n += k
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				err = fmt.Errorf("%w: no progress for %v", ErrWriteTimeout, timeout)
			}
			return n, err
		}
	}
	return n, nil
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
		{ID: http2.SettingMaxHeaderListSize, Val: c.cfg.MaxHeaderListSize},
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
	c.handshakeDeadline()
	if err := c.writePreface(); err != nil {
		nc.Close()
		return nil, err
	}
	c.startTimer()
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
	c.handshakeDeadline() // the preface and the SETTINGS after it
	if _, err := io.ReadFull(nc, preface); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			c.count(ReasonHandshakeTimeout)
			err = ErrHandshakeTimeout
		}
		err = fmt.Errorf("hbone: reading the client preface: %w", err)
		c.fail(err)
		return err
	}
	if string(preface) != http2.ClientPreface {
		err := errors.New("hbone: not an HTTP/2 client (bad preface)")
		c.count(ReasonProtocol)
		c.fail(err)
		return err
	}
	if err := c.writePreface(); err != nil {
		c.fail(err)
		return err
	}
	c.closeIfDrained() // Shutdown before we started: its GOAWAY went out with our SETTINGS
	c.startTimer()
	go c.controlWriter()
	c.readLoop()
	return c.Err()
}

// handshakeDeadline bounds the wait for the peer's preface and SETTINGS;
// the read loop lifts it when they arrived.
func (c *Conn) handshakeDeadline() {
	if c.cfg.HandshakeTimeout > 0 {
		_ = c.nc.SetReadDeadline(time.Now().Add(c.cfg.HandshakeTimeout))
	}
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

// Close ends the connection and every stream on it. It does not wait for
// the network.
func (c *Conn) Close() error {
	c.fail(ErrClosed)
	return nil
}

// Shutdown tells the peer no more streams will be accepted (GOAWAY) and
// lets open streams finish; a server connection then closes itself once
// its last stream is over (a client's is closed by its pool). It does not
// wait for the network: the GOAWAY is queued like any control frame, and
// a peer that stopped reading is cut off by the write timeout.
func (c *Conn) Shutdown() {
	c.mu.Lock()
	last, ok := c.goAwayLocked()
	c.mu.Unlock()
	if ok {
		c.sendGoAway(last)
	}
}

// goAwayLocked marks the connection as going away; false if it already
// was (or is dead). It returns the last stream id the GOAWAY announces.
// Caller holds mu.
func (c *Conn) goAwayLocked() (uint32, bool) {
	if c.goAway || c.err != nil {
		return 0, false
	}
	c.goAway = true
	return c.lastPeerID, true
}

// sendGoAway queues GOAWAY (written after our SETTINGS if they are not
// out yet) and closes the connection if no stream is left.
func (c *Conn) sendGoAway(last uint32) {
	c.cond.Broadcast()
	c.sendControl(ctrlFrame{kind: ctrlGoAway, id: last, val: uint32(http2.ErrCodeNo)})
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
	c.pending = nil
	if c.timer != nil {
		c.timer.Stop()
	}
	close(c.done)
	c.mu.Unlock()
	c.cond.Broadcast()
	if errors.Is(err, ErrWriteTimeout) {
		c.count(ReasonWriteTimeout)
	}
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
	if c.goAwaySent.Load() {
		c.lingerClose()
		return
	}
	c.closeTransport(errors.Is(err, ErrClosed) || errors.Is(err, io.EOF) || errors.Is(err, ErrIdle))
}

// lingerClose ends a connection whose GOAWAY (a connection error) was just
// written. Closing at once while the peer still sends makes our kernel
// answer with RST, and a RST makes the peer's kernel drop what it had not
// read yet: the GOAWAY, and the error code with it. So the sending side is
// closed (FIN after the GOAWAY), what the peer still sends is read and
// discarded for up to goAwayTimeout (at most lingerBytes), then the socket
// closes, as x/net's server does. A goroutine and a socket for one second
// at most, per connection a peer got itself cut off on.
func (c *Conn) lingerClose() {
	raw := c.nc
	if tc, ok := c.nc.(interface{ NetConn() net.Conn }); ok {
		raw = tc.NetConn()
	}
	if cw, ok := raw.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	go func() {
		_ = raw.SetReadDeadline(time.Now().Add(goAwayTimeout))
		_, _ = io.CopyN(io.Discard, raw, lingerBytes)
		raw.Close()
		if raw != c.nc {
			c.nc.Close() // returns at once: the socket is closed
		}
	}()
}

// lingerBytes bounds what a peer can make us read after a connection
// error's GOAWAY.
const lingerBytes = 1 << 20

// closeTransport closes the socket without waiting for the network. TLS
// says goodbye (close_notify) when the connection ends cleanly; crypto/tls
// may wait up to 5 s for that write when the peer does not read, so it is
// sent from a goroutine of its own. A connection that failed is cut at
// once, underneath TLS.
func (c *Conn) closeTransport(clean bool) {
	tc, isTLS := c.nc.(interface{ NetConn() net.Conn })
	switch {
	case !isTLS:
		c.nc.Close()
	case clean:
		go c.nc.Close()
	default:
		tc.NetConn().Close()
		c.nc.Close() // returns at once: the socket is closed
	}
}

// count reports a limit hit or a protocol error (Config.CountError).
func (c *Conn) count(reason string) {
	if f := c.cfg.CountError; f != nil {
		f(reason)
	}
}

// protocolError ends the connection with GOAWAY, counted under reason.
func (c *Conn) protocolError(code http2.ErrCode, reason, format string, args ...any) {
	err := fmt.Errorf("hbone: protocol error: "+format, args...)
	c.count(reason)
	c.mu.Lock()
	last := c.lastPeerID
	c.mu.Unlock()
	// Best effort: a writer blocked on a full socket holds wmu, and the
	// connection is closed either way. The read loop calls this: it waits
	// for the socket for a moment at most.
	if c.tryLockW(goAwayLockWait) {
		deadline := time.Now().Add(goAwayTimeout)
		_ = c.nc.SetWriteDeadline(deadline)
		c.wdRenew = deadline
		_ = c.fr.WriteGoAway(last, code, []byte(truncate(err.Error())))
		if c.bw.Flush() == nil {
			c.goAwaySent.Store(true)
		}
		c.wmu.Unlock()
	}
	c.fail(err)
}

// goAwayTimeout bounds writing the GOAWAY of a connection error.
const goAwayTimeout = time.Second

// goAwayLockWait bounds the wait for the write lock before a connection
// error's GOAWAY: another writer usually holds it for a moment (a control
// frame flush); one blocked on a full socket is given up on.
const goAwayLockWait = 250 * time.Millisecond

// tryLockW takes wmu if it comes free within d, polling: the read loop,
// which calls this as the connection ends, never blocks on a stuck writer.
func (c *Conn) tryLockW(d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		if c.wmu.TryLock() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(time.Millisecond)
	}
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
	// tooLarge: the header list exceeded MaxHeaderListSize and was cut;
	// the stream is answered 431 without calling the handler.
	tooLarge bool
}

// Get returns a header's first value.
func (r *Request) Get(name string) string {
	if v := r.Header[strings.ToLower(name)]; len(v) > 0 {
		return v[0]
	}
	return ""
}

// headerListSize is RFC 9113's size of a header list (6.5.2): name and
// value lengths plus 32 per field.
func headerListSize(fields [][2]string) uint32 {
	var n uint64
	for _, f := range fields {
		n += uint64(len(f[0]) + len(f[1]) + 32)
	}
	return uint32(min(n, 1<<32-1))
}

// Connect opens a CONNECT stream to authority (ip:port) with the given
// extra header fields, and waits for the response status. A status other
// than 200 comes back with the stream already finished.
func (c *Conn) Connect(ctx context.Context, authority string, header [][2]string) (*Stream, int, error) {
	if c.server {
		return nil, 0, errors.New("hbone: Connect on a server connection")
	}
	fields := append([][2]string{{":method", "CONNECT"}, {":authority", authority}}, header...)
	size := headerListSize(fields)
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
	case c.peerMaxHdr > 0 && size > c.peerMaxHdr:
		refuse = fmt.Errorf("%w (%d bytes, the peer takes %d)", ErrHeaderListTooLarge, size, c.peerMaxHdr)
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
	s := &Stream{c: c, id: id, sendWindow: c.peerWindow, recvWindow: int64(c.cfg.StreamWindow), respCh: make(chan struct{})}
	s.cond = sync.NewCond(&s.mu)
	return s
}

// removeIfDone forgets a stream once both directions are over.
func (c *Conn) removeIfDone(s *Stream) {
	if c.forgetIfDone(s) {
		c.cond.Broadcast()
		c.closeIfDrained()
	}
}

// forgetIfDone takes a stream that is over both ways out of the streams
// open (and so out of the count the stream limit checks), without closing
// a drained connection. A stream whose last frame we are about to send is
// forgotten before the frame is written: the peer counts the stream closed
// as soon as it reads that frame and may open the next one at once, which
// must not find the stream still counted here (a refused stream, with
// MaxStreams streams in use).
func (c *Conn) forgetIfDone(s *Stream) bool {
	s.mu.Lock()
	done := (s.recvEnd || s.err != nil) && (s.sentEnd || s.err != nil)
	s.mu.Unlock()
	if !done {
		return false
	}
	c.mu.Lock()
	if c.streams[s.id] == s {
		delete(c.streams, s.id)
	}
	c.mu.Unlock()
	return true
}
