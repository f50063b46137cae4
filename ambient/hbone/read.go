package hbone

import (
	"fmt"
	"strconv"

	"golang.org/x/net/http2"
)

// readLoop is the connection's one reader: it reads frames and hands
// their effect to streams and waiting writers.
func (c *Conn) readLoop() {
	first := true
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			if se, ok := err.(http2.StreamError); ok {
				c.resetStream(se.StreamID, se.Code)
				continue
			}
			if ce, ok := err.(http2.ConnectionError); ok {
				c.protocolError(http2.ErrCode(ce), "%v", c.fr.ErrorDetail())
				return
			}
			c.fail(err)
			return
		}
		if first {
			// The peer's preface ends with SETTINGS (RFC 9113 3.4).
			if _, ok := f.(*http2.SettingsFrame); !ok {
				c.protocolError(http2.ErrCodeProtocol, "first frame is %v, not SETTINGS", f.Header().Type)
				return
			}
			first = false
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
			c.onWindowUpdate(f)
		case *http2.MetaHeadersFrame:
			if !c.onHeaders(f) {
				return
			}
		case *http2.DataFrame:
			if !c.onData(f) {
				return
			}
		case *http2.RSTStreamFrame:
			c.mu.Lock()
			s := c.streams[f.StreamID]
			c.mu.Unlock()
			if s != nil {
				s.abort(fmt.Errorf("%w (%v)", ErrStreamReset, f.ErrCode))
				s.dropUnread(false)
				c.removeIfDone(s)
			}
		case *http2.PushPromiseFrame:
			c.protocolError(http2.ErrCodeProtocol, "PUSH_PROMISE (push is disabled)")
			return
		default:
			// PRIORITY, unknown extension frames: ignored (RFC 9113 5.5).
		}
	}
}

func (c *Conn) onSettings(f *http2.SettingsFrame) bool {
	if f.IsAck() {
		return true
	}
	var perr error
	tableSize := int64(-1)
	_ = f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			perr = err
			return err
		}
		c.mu.Lock()
		switch s.ID {
		case http2.SettingInitialWindowSize:
			delta := int64(s.Val) - c.peerWindow
			c.peerWindow = int64(s.Val)
			for _, st := range c.streams {
				st.mu.Lock()
				st.sendWindow += delta
				st.mu.Unlock()
			}
		case http2.SettingMaxFrameSize:
			c.peerMaxFr = s.Val
		case http2.SettingMaxConcurrentStreams:
			c.peerStreams = s.Val
		case http2.SettingHeaderTableSize:
			tableSize = int64(s.Val) // applied with the ack, under wmu
		}
		c.mu.Unlock()
		return nil
	})
	if perr != nil {
		c.protocolError(http2.ErrCodeProtocol, "%v", perr)
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

func (c *Conn) onWindowUpdate(f *http2.WindowUpdateFrame) {
	c.mu.Lock()
	if f.StreamID == 0 {
		c.sendWindow += int64(f.Increment)
		c.mu.Unlock()
		c.wakeWriters()
		return
	}
	s := c.streams[f.StreamID]
	c.mu.Unlock()
	if s != nil {
		s.mu.Lock()
		s.sendWindow += int64(f.Increment)
		s.mu.Unlock()
		s.cond.Broadcast()
	}
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

func (c *Conn) onHeaders(f *http2.MetaHeadersFrame) bool {
	id := f.StreamID
	c.mu.Lock()
	s := c.streams[id]
	if s == nil && c.server {
		if id%2 == 0 || id <= c.lastPeerID {
			c.mu.Unlock()
			c.protocolError(http2.ErrCodeProtocol, "HEADERS on stream %d", id)
			return false
		}
		c.lastPeerID = id
		if c.goAway || len(c.streams) >= int(c.cfg.MaxStreams) {
			c.mu.Unlock()
			c.resetStream(id, http2.ErrCodeRefusedStream)
			return true
		}
		s = c.newStreamLocked(id)
		c.streams[id] = s
		c.mu.Unlock()
		req := &Request{Header: map[string][]string{}}
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
		if f.StreamEnded() {
			s.mu.Lock()
			s.recvEnd = true
			s.mu.Unlock()
		}
		go c.runHandler(s, req)
		return true
	}
	c.mu.Unlock()
	if s == nil {
		// A stream we already forgot (reset): nothing to deliver.
		return true
	}
	if !c.server {
		s.mu.Lock()
		if s.status == 0 {
			st, err := strconv.Atoi(f.PseudoValue("status"))
			if err != nil || st < 100 || st > 999 {
				s.mu.Unlock()
				c.resetStream(id, http2.ErrCodeProtocol)
				return true
			}
			if st >= 200 {
				s.status = st
			}
		}
		final := s.status != 0
		s.mu.Unlock()
		if final {
			s.respOnce.Do(func() { close(s.respCh) })
		}
	}
	// Anything else is trailers: they only end the stream.
	if f.StreamEnded() {
		s.endRecv()
		c.removeIfDone(s)
	}
	return true
}

func (c *Conn) onData(f *http2.DataFrame) bool {
	n := int64(f.Length) // padding counts for flow control too
	payload := int64(len(f.Data()))
	c.mu.Lock()
	s := c.streams[f.StreamID]
	c.mu.Unlock()
	if s == nil {
		// Closed meanwhile: the bytes only count for the connection.
		c.consumed(n)
		return true
	}
	s.mu.Lock()
	if s.recvEnd {
		s.mu.Unlock()
		c.consumed(n)
		c.resetStream(f.StreamID, http2.ErrCodeStreamClosed)
		return true
	}
	if s.err != nil {
		s.mu.Unlock()
		c.consumed(n) // nobody will read it
		return true
	}
	if int64(len(s.buf)-s.off)+payload > int64(c.cfg.StreamWindow) {
		s.mu.Unlock()
		c.consumed(n)
		c.resetStream(f.StreamID, http2.ErrCodeFlowControl)
		return true
	}
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

// runHandler runs the server's handler for one stream; a panic there
// resets the stream instead of taking the daemon down.
func (c *Conn) runHandler(s *Stream, req *Request) {
	defer func() {
		if r := recover(); r != nil {
			s.Reset(http2.ErrCodeInternal)
			return
		}
		// The handler is done with the stream: one it never answered gets
		// a 500, one it left open is reset.
		s.mu.Lock()
		responded := s.responded
		s.mu.Unlock()
		if !responded {
			_ = s.Respond(500)
		}
		s.Close()
	}()
	c.handler(s, req)
}
