package hbone

import (
	"crypto/rand"
	"fmt"
	"time"

	"golang.org/x/net/http2"
)

// What a peer may cost us. A server runs at most MaxStreams handlers per
// connection (each of which may dial an application): a stream the peer
// resets keeps its handler's place until the handler returns, and streams
// opened meanwhile wait for a place, as in x/net's server after
// CVE-2023-44487. A peer that keeps resetting streams before they are
// answered (or making us reset them for its errors), or queues more than
// 4 × MaxStreams streams for a handler, is told ENHANCE_YOUR_CALM and
// disconnected. Both ends PING a silent peer and give up on it when it
// stays silent, and close connections that carry no stream for
// IdleTimeout.

// pendingStream is a stream waiting for a handler.
type pendingStream struct {
	s   *Stream
	req *Request
}

// scheduleLocked decides whether a new stream's handler starts now (start)
// or waits; ok is false when too many streams wait (the connection must
// end). Caller holds mu.
func (c *Conn) scheduleLocked(s *Stream, req *Request) (start, ok bool) {
	if c.handlers < int(c.cfg.MaxStreams) {
		c.handlers++
		return true, true
	}
	if len(c.pending) >= 4*int(c.cfg.MaxStreams) {
		return false, false
	}
	c.pending = append(c.pending, pendingStream{s, req})
	return false, true
}

// runHandler serves a stream, then the streams waiting for a handler, one
// at a time, until none is left.
func (c *Conn) runHandler(s *Stream, req *Request) {
	for s != nil {
		c.serveStream(s, req)
		s, req = nil, nil
		c.mu.Lock()
		for len(c.pending) > 0 && c.err == nil {
			p := c.pending[0]
			c.pending[0] = pendingStream{}
			c.pending = c.pending[1:]
			if p.s.failed() == nil {
				s, req = p.s, p.req
				break
			}
			// Reset before its handler started: nothing to do.
		}
		if s == nil {
			c.handlers--
			if len(c.pending) == 0 {
				c.pending = nil // let the array go
			}
		}
		c.mu.Unlock()
	}
}

// serveStream runs the server's handler for one stream; a panic there
// resets the stream instead of taking the daemon down.
func (c *Conn) serveStream(s *Stream, req *Request) {
	s.mu.Lock()
	dead := s.err != nil
	s.mu.Unlock()
	if dead {
		return // reset while it waited: no handler, no answer
	}
	if req.tooLarge {
		_ = s.Respond(431) // Request Header Fields Too Large
		s.Close()
		return
	}
	defer func() {
		if r := recover(); r != nil {
			s.Reset(http2.ErrCodeInternal)
			return
		}
		// The handler is done with the stream: one it never answered gets
		// a 500 (unless it was reset), one it left open is reset.
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

// earlyReset counts a stream reset before the server answered it; false
// when the peer exceeded its budget and the connection is ending.
func (c *Conn) earlyReset() bool {
	max := c.cfg.MaxEarlyResets
	if !c.server || max < 0 {
		return true
	}
	now := time.Now()
	c.mu.Lock()
	if now.Sub(c.resetsSince) > c.cfg.ResetWindow {
		c.resetsSince, c.resets = now, 0
	}
	c.resets++
	over := c.resets > max
	c.mu.Unlock()
	if over {
		c.protocolError(http2.ErrCodeEnhanceYourCalm, ReasonRapidReset,
			"more than %d streams reset before their answer within %v", max, c.cfg.ResetWindow)
		return false
	}
	return true
}

// peerStreamError counts a stream the server reset for the peer's error
// like one the peer reset: answering costs us a frame each time.
func (c *Conn) peerStreamError() bool { return c.earlyReset() }

// tick is how often the keepalive and idle timer looks at the connection:
// half the shortest of its periods, so each fires at most 50% late.
func (c *Conn) tick() time.Duration {
	var d time.Duration
	for _, v := range []time.Duration{c.cfg.PingInterval, c.cfg.PingTimeout, c.cfg.IdleTimeout} {
		if v > 0 && (d == 0 || v < d) {
			d = v
		}
	}
	return d / 2
}

// startTimer starts the keepalive and idle timer.
func (c *Conn) startTimer() {
	d := c.tick()
	if d <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return
	}
	now := time.Now()
	c.quietSince, c.idleSince = now, now
	c.timer = time.AfterFunc(d, c.onTick)
}

// onTick PINGs a peer that has been silent for PingInterval, closes the
// connection when it stays silent for PingTimeout after that (a dead peer,
// or a network path that went away without a FIN), and closes a
// connection that had no stream for IdleTimeout (a server sends GOAWAY
// first). Any frame from the peer counts as a sign of life.
func (c *Conn) onTick() {
	now := time.Now()
	var ping, dead, idle bool
	var last uint32
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	if n := c.framesRead.Load(); n != c.seen {
		c.seen, c.quietSince, c.pingSentAt = n, now, time.Time{}
	}
	if c.cfg.PingInterval > 0 {
		switch {
		case !c.pingSentAt.IsZero():
			dead = c.cfg.PingTimeout > 0 && now.Sub(c.pingSentAt) >= c.cfg.PingTimeout
		case now.Sub(c.quietSince) >= c.cfg.PingInterval:
			ping, c.pingSentAt = true, now
		}
	}
	if c.cfg.IdleTimeout > 0 && !dead {
		if len(c.streams) > 0 || c.handlers > 0 {
			c.idleSince = now
		} else if now.Sub(c.idleSince) >= c.cfg.IdleTimeout {
			last, idle = c.goAwayLocked()
		}
	}
	if !dead && !idle {
		c.timer.Reset(c.tick())
	}
	c.mu.Unlock()
	switch {
	case dead:
		c.count(ReasonKeepaliveTimeout)
		c.fail(fmt.Errorf("%w: no frame for %v after a PING", ErrKeepaliveTimeout, c.cfg.PingTimeout))
	case idle && c.server:
		c.sendGoAway(last) // no stream: closes at once
	case idle:
		c.fail(ErrIdle)
	case ping:
		var data [8]byte
		_, _ = rand.Read(data[:])
		c.sendControl(ctrlFrame{kind: ctrlPing, ping: data})
	}
}
