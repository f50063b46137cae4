package hbone

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"golang.org/x/net/http2"
)

// readLoop is the connection's one reader: it reads frames and hands
// their effect to streams and waiting writers. It never waits for the
// write lock or the network's write side (control.go).
//
// Errors follow RFC 9113 section 5.4: what breaks the connection's state
// (HPACK, flow control of the whole connection, frames on streams that
// were never opened) ends it with GOAWAY; what concerns one stream (its
// window, frames after it ended or was reset) resets that stream only.
func (c *Conn) readLoop() {
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			if se, ok := err.(http2.StreamError); ok {
				c.count(ReasonProtocol)
				c.resetStream(se.StreamID, se.Code)
				if !c.peerStreamError() {
					return
				}
				continue
			}
			if ce, ok := err.(http2.ConnectionError); ok {
				c.protocolError(http2.ErrCode(ce), ReasonProtocol, "%v", c.fr.ErrorDetail())
				return
			}
			c.mu.Lock()
			handshook, drained := c.handshook, c.halfClosed
			c.mu.Unlock()
			if !handshook && !drained && errors.Is(err, os.ErrDeadlineExceeded) {
				c.count(ReasonHandshakeTimeout)
				err = fmt.Errorf("%w: no SETTINGS from the peer within %v", ErrHandshakeTimeout, c.cfg.HandshakeTimeout)
			}
			c.fail(err)
			return
		}
		c.framesRead.Add(1)
		if !c.handshook && !c.onFirstFrame(f) {
			return
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !c.onSettings(f) {
				return
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				c.sendControl(ctrlFrame{kind: ctrlPingAck, ping: f.Data})
			}
		case *http2.GoAwayFrame:
			c.onGoAway(f)
		case *http2.WindowUpdateFrame:
			if !c.onWindowUpdate(f) {
				return
			}
		case *http2.MetaHeadersFrame:
			if !c.onHeaders(f) {
				return
			}
		case *http2.DataFrame:
			if !c.onData(f) {
				return
			}
		case *http2.RSTStreamFrame:
			if !c.onReset(f) {
				return
			}
		case *http2.PushPromiseFrame:
			c.protocolError(http2.ErrCodeProtocol, ReasonProtocol, "PUSH_PROMISE (push is disabled)")
			return
		default:
			// PRIORITY, unknown extension frames: ignored (RFC 9113 5.5).
		}
	}
}

// onFirstFrame checks the peer's preface ends with SETTINGS (RFC 9113 3.4)
// and lifts the handshake deadline. Only the read loop writes handshook.
func (c *Conn) onFirstFrame(f http2.Frame) bool {
	if _, ok := f.(*http2.SettingsFrame); !ok {
		c.protocolError(http2.ErrCodeProtocol, ReasonProtocol, "first frame is %v, not SETTINGS", f.Header().Type)
		return false
	}
	c.mu.Lock()
	c.handshook = true
	if !c.halfClosed { // a drained connection keeps its linger deadline
		_ = c.nc.SetReadDeadline(time.Time{})
	}
	c.mu.Unlock()
	return true
}

func (c *Conn) onSettings(f *http2.SettingsFrame) bool {
	if f.IsAck() {
		return true
	}
	var perr error
	tableSize := int64(-1)
	window := int64(-1)
	c.mu.Lock()
	_ = f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			perr = err
			return err
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			window = int64(s.Val)
		case http2.SettingMaxFrameSize:
			c.peerMaxFr = s.Val
		case http2.SettingMaxConcurrentStreams:
			c.peerStreams = s.Val
		case http2.SettingMaxHeaderListSize:
			c.peerMaxHdr = s.Val
		case http2.SettingHeaderTableSize:
			tableSize = int64(s.Val) // applied with the ack, under wmu
		}
		return nil
	})
	if perr == nil && window >= 0 {
		// Applied once per frame, however many times it repeats the setting.
		delta := window - c.peerWindow
		c.peerWindow = window
		for _, st := range c.streams {
			st.mu.Lock()
			st.sendWindow += delta
			if st.sendWindow > maxWindow {
				perr = http2.ConnectionError(http2.ErrCodeFlowControl)
			}
			st.mu.Unlock()
		}
	}
	c.mu.Unlock()
	if perr != nil {
		code := http2.ErrCodeProtocol
		if ce, ok := perr.(http2.ConnectionError); ok {
			code = http2.ErrCode(ce)
		}
		c.protocolError(code, ReasonProtocol, "SETTINGS: %v", perr)
		return false
	}
	c.wakeWriters()
	c.sendControl(ctrlFrame{kind: ctrlSettingsAck, tableSize: tableSize})
	return true
}

func (c *Conn) onGoAway(f *http2.GoAwayFrame) {
	c.mu.Lock()
	c.goAway = true
	var gone []*Stream
	if !c.server {
		for id, s := range c.streams {
			if id > f.LastStreamID {
				gone = append(gone, s)
			}
		}
	}
	c.mu.Unlock()
	for _, s := range gone {
		s.abort(ErrGoAway)
		c.removeIfDone(s)
	}
	c.cond.Broadcast()
}

func (c *Conn) onWindowUpdate(f *http2.WindowUpdateFrame) bool {
	c.mu.Lock()
	if f.StreamID == 0 {
		c.sendWindow += int64(f.Increment)
		over := c.sendWindow > maxWindow
		c.mu.Unlock()
		if over {
			c.protocolError(http2.ErrCodeFlowControl, ReasonProtocol, "connection send window above 2^31-1")
			return false
		}
		c.wakeWriters()
		return true
	}
	s := c.streams[f.StreamID]
	idle := s == nil && c.idleStreamLocked(f.StreamID)
	c.mu.Unlock()
	if idle {
		c.protocolError(http2.ErrCodeProtocol, ReasonProtocol, "WINDOW_UPDATE on idle stream %d", f.StreamID)
		return false
	}
	if s != nil {
		s.mu.Lock()
		s.sendWindow += int64(f.Increment)
		over := s.sendWindow > maxWindow
		s.mu.Unlock()
		if over {
			c.count(ReasonProtocol)
			c.resetStream(f.StreamID, http2.ErrCodeFlowControl)
			return c.peerStreamError()
		}
		s.cond.Broadcast()
	}
	return true
}

// idleStreamLocked reports whether id names a stream the peer could not
// have opened yet ("idle" in RFC 9113 5.1): frames other than HEADERS and
// PRIORITY on it are a connection error. Caller holds mu.
func (c *Conn) idleStreamLocked(id uint32) bool {
	if c.server {
		return id%2 == 0 || id > c.lastPeerID
	}
	return id%2 == 0 || id >= c.nextID // the server opens none (no push)
}

// wakeWriters wakes every stream waiting for send window.
func (c *Conn) wakeWriters() {
	c.mu.Lock()
	ss := make([]*Stream, 0, len(c.streams))
	for _, s := range c.streams {
		ss = append(ss, s)
	}
	c.mu.Unlock()
	for _, s := range ss {
		s.cond.Broadcast()
	}
	c.cond.Broadcast()
}

// onReset handles the peer's RST_STREAM. On a server, a stream reset
// before it was answered counts against the peer's budget of early resets
// (Rapid Reset, CVE-2023-44487).
func (c *Conn) onReset(f *http2.RSTStreamFrame) bool {
	c.mu.Lock()
	s := c.streams[f.StreamID]
	idle := s == nil && c.idleStreamLocked(f.StreamID)
	c.mu.Unlock()
	if idle {
		c.protocolError(http2.ErrCodeProtocol, ReasonProtocol, "RST_STREAM on idle stream %d", f.StreamID)
		return false
	}
	if s == nil {
		return true // over already; never answer a reset with a reset
	}
	s.mu.Lock()
	early := !s.responded
	s.mu.Unlock()
	s.abort(fmt.Errorf("%w (%v)", ErrStreamReset, f.ErrCode))
	s.dropUnread(false)
	c.removeIfDone(s)
	if c.server && early {
		return c.earlyReset()
	}
	return true
}

func (c *Conn) onHeaders(f *http2.MetaHeadersFrame) bool {
	id := f.StreamID
	c.mu.Lock()
	s := c.streams[id]
	if s == nil && c.server && id%2 == 1 && id > c.lastPeerID {
		c.mu.Unlock()
		return c.openStream(f)
	}
	idle := s == nil && c.idleStreamLocked(id)
	c.mu.Unlock()
	if idle {
		c.protocolError(http2.ErrCodeProtocol, ReasonProtocol, "HEADERS on stream %d", id)
		return false
	}
	if s == nil {
		// A stream that is over: reset by either side, or ended both ways.
		// A stream error (RFC 9113 5.1, "closed"); the header block was
		// decoded, so the connection's HPACK state is intact.
		if !c.server {
			return true // a response to a stream we gave up: nothing to deliver
		}
		c.count(ReasonStreamClosed)
		c.resetStream(id, http2.ErrCodeStreamClosed)
		return c.peerStreamError()
	}
	if !c.server {
		s.mu.Lock()
		if s.status == 0 {
			st, err := strconv.Atoi(f.PseudoValue("status"))
			if err != nil || st < 100 || st > 999 || f.Truncated {
				s.mu.Unlock()
				c.count(ReasonProtocol)
				c.resetStream(id, http2.ErrCodeProtocol)
				return true
			}
			if st >= 200 {
				s.status = st
			}
			final := s.status != 0
			s.mu.Unlock()
			if final {
				s.respOnce.Do(func() { close(s.respCh) })
			}
			if f.StreamEnded() {
				s.endRecv()
				c.removeIfDone(s)
			}
			return true
		}
		s.mu.Unlock()
	}
	// Anything else is trailers: they must end the stream, and only once.
	s.mu.Lock()
	ended := s.recvEnd
	s.mu.Unlock()
	if ended || !f.StreamEnded() {
		code := http2.ErrCodeStreamClosed
		reason := ReasonStreamClosed
		if !ended {
			code, reason = http2.ErrCodeProtocol, ReasonProtocol
		}
		c.count(reason)
		c.resetStream(id, code)
		return c.peerStreamError()
	}
	s.endRecv()
	c.removeIfDone(s)
	return true
}

// openStream starts a stream the peer opened with HEADERS (server).
func (c *Conn) openStream(f *http2.MetaHeadersFrame) bool {
	id := f.StreamID
	req := &Request{Header: map[string][]string{}, tooLarge: f.Truncated}
	for _, hf := range f.Fields {
		switch hf.Name {
		case ":method":
			req.Method = hf.Value
		case ":authority":
			req.Authority = hf.Value
		default:
			if hf.Name[0] != ':' {
				req.Header[hf.Name] = append(req.Header[hf.Name], hf.Value)
			}
		}
	}
	if req.tooLarge {
		c.count(ReasonHeaderListSize)
	}
	c.mu.Lock()
	c.lastPeerID = id
	if c.err != nil || c.goAway || len(c.streams) >= int(c.cfg.MaxStreams) {
		// Beyond the limit we announced, the peer is in the wrong (RFC
		// 9113 5.1.2) and pays for it like for a reset; after GOAWAY it
		// only raced with it.
		over := !c.goAway
		c.mu.Unlock()
		c.count(ReasonStreamLimit)
		c.resetStream(id, http2.ErrCodeRefusedStream)
		return !over || c.peerStreamError()
	}
	s := c.newStreamLocked(id)
	s.recvEnd = f.StreamEnded()
	c.streams[id] = s
	start, ok := c.scheduleLocked(s, req)
	c.mu.Unlock()
	if !ok {
		c.protocolError(http2.ErrCodeEnhanceYourCalm, ReasonRapidReset,
			"more than %d streams waiting for a handler (streams reset before their answer)", 4*c.cfg.MaxStreams)
		return false
	}
	if start {
		go c.runHandler(s, req)
	}
	return true
}

func (c *Conn) onData(f *http2.DataFrame) bool {
	n := int64(f.Length) // padding counts for flow control too
	payload := int64(len(f.Data()))
	c.mu.Lock()
	if n > c.recvWindow {
		w := c.recvWindow
		c.mu.Unlock()
		c.protocolError(http2.ErrCodeFlowControl, ReasonFlowControl,
			"DATA of %d bytes on stream %d, %d left in the connection window", n, f.StreamID, w)
		return false
	}
	c.recvWindow -= n
	s := c.streams[f.StreamID]
	idle := s == nil && c.idleStreamLocked(f.StreamID)
	c.mu.Unlock()
	if idle {
		c.protocolError(http2.ErrCodeProtocol, ReasonProtocol, "DATA on idle stream %d", f.StreamID)
		return false
	}
	if s == nil {
		// Closed meanwhile (we may have reset it while the peer was still
		// sending): the bytes only count for the connection.
		c.consumed(n)
		return true
	}
	s.mu.Lock()
	if s.recvEnd {
		s.mu.Unlock()
		c.consumed(n)
		c.count(ReasonStreamClosed)
		c.resetStream(f.StreamID, http2.ErrCodeStreamClosed)
		return c.peerStreamError()
	}
	if s.err != nil {
		s.mu.Unlock()
		c.consumed(n) // nobody will read it
		return true
	}
	if n > s.recvWindow {
		s.mu.Unlock()
		c.consumed(n)
		c.count(ReasonStreamFlowControl)
		c.resetStream(f.StreamID, http2.ErrCodeFlowControl)
		return c.peerStreamError()
	}
	s.recvWindow -= n
	d := f.Data()
	var direct int64
	if s.sink != nil && len(d) > 0 && s.off == len(s.buf) && !s.readerBusy {
		k := s.writeSinkLocked(d)
		d = d[k:]
		direct = int64(k)
		s.delivered += direct
	}
	if len(d) > 0 {
		switch {
		case s.off == len(s.buf):
			s.buf, s.off = s.buf[:0], 0
		case s.off > 0 && len(s.buf)+len(d) > cap(s.buf):
			// Compact rather than grow: the buffer stays within about
			// twice the stream window however long a slow reader lags.
			k := copy(s.buf, s.buf[s.off:])
			s.buf, s.off = s.buf[:k], 0
		}
		s.buf = append(s.buf, d...)
	}
	pad := n - payload
	s.unacked += pad + direct // padding and delivered bytes are consumed now
	var upd int64
	if direct > 0 && s.unacked >= int64(c.cfg.StreamWindow)/2 && !f.StreamEnded() {
		upd, s.unacked = s.unacked, 0
		s.recvWindow += upd
	}
	s.mu.Unlock()
	if len(d) > 0 {
		s.cond.Broadcast()
	}
	if upd > 0 {
		c.writeWindowUpdate(s.id, upd)
	}
	if pad+direct > 0 {
		c.consumed(pad + direct)
	}
	if f.StreamEnded() {
		s.endRecv()
		c.removeIfDone(s)
	}
	return true
}

func (c *Conn) writeWindowUpdate(id uint32, n int64) {
	c.sendControl(ctrlFrame{kind: ctrlWindow, id: id, val: uint32(n)})
}

// resetStream sends RST_STREAM and forgets the stream. The RST is queued
// before the stream leaves the map: a CONNECT that takes its place among
// the peer's allowed streams is written after it (Connect writes the
// queue first).
func (c *Conn) resetStream(id uint32, code http2.ErrCode) {
	c.sendControl(ctrlFrame{kind: ctrlRST, id: id, val: uint32(code)})
	c.mu.Lock()
	s := c.streams[id]
	delete(c.streams, id)
	c.mu.Unlock()
	if s != nil {
		s.abort(fmt.Errorf("hbone: stream reset (%v)", code))
		s.dropUnread(false)
	}
	c.cond.Broadcast()
	c.closeIfDrained()
}
