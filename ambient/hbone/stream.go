package hbone

import (
	"errors"
	"io"
	"strconv"
	"sync"
	"syscall"

	"golang.org/x/net/http2"
)

// Stream is one CONNECT stream: a byte pipe in both directions, each of
// which ends on its own (END_STREAM), or both at once (RST_STREAM).
// One goroutine may Read while another Writes.
type Stream struct {
	c  *Conn
	id uint32

	mu   sync.Mutex
	cond *sync.Cond
	// Received payload not yet read: buf[off:].
	buf []byte
	off int
	// unacked: bytes consumed (or padding) not yet returned to the peer's
	// send window; recvWindow: what the peer may still send (more is a
	// stream error).
	unacked    int64
	recvWindow int64
	recvEnd    bool // the peer sent END_STREAM
	sentEnd    bool // we sent END_STREAM (or a final non-200 response)
	sendWindow int64
	err        error // reset, or the connection failed

	// client side: the response status, and respCh closed when it (or a
	// failure) arrived.
	status   int
	respCh   chan struct{}
	respOnce sync.Once
	// server side: Respond was called.
	responded bool

	// sink is the socket the stream's bytes go to (SetSink). The read loop
	// writes DATA straight into it, without blocking, when nothing is
	// queued and the reader is not busy writing what Read returned: that
	// saves a goroutine hand-off per frame, which is most of a small
	// exchange's cost. What does not fit goes through buf and Read.
	sink       syscall.RawConn
	readerBusy bool  // Read returned bytes its caller may still be writing
	delivered  int64 // bytes written to sink by the read loop
	// The sink write's argument and results, and the function handed to
	// sink.Write, made once in SetSink: a closure per write escaped to the
	// heap (five allocations per request through the tunnel).
	sinkData []byte
	sinkN    int
	sinkErr  error
	sinkFn   func(fd uintptr) bool
}

// SetSink names the socket that the stream's reader copies into, so the
// connection's read loop may write there itself when that keeps the
// order. The reader must still Read until EOF (for bytes that did not fit
// and for the end of the stream); Delivered tells how many bytes went
// directly.
func (s *Stream) SetSink(rc syscall.RawConn) {
	s.mu.Lock()
	s.sink = rc
	if s.sinkFn == nil {
		s.sinkFn = s.sinkWrite
	}
	s.mu.Unlock()
}

// sinkWrite is the body of a sink write: never wait, the read loop must
// not block. Called with s.mu held (by writeSinkLocked).
func (s *Stream) sinkWrite(fd uintptr) bool {
	s.sinkN, s.sinkErr = syscall.Write(int(fd), s.sinkData)
	return true
}

// Delivered is the number of bytes written to the sink directly.
func (s *Stream) Delivered() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.delivered
}

// writeSinkLocked writes d to the sink without blocking; it returns how
// much was written. A sink that fails is dropped: the reader's own write
// reports the error. Caller holds s.mu.
func (s *Stream) writeSinkLocked(d []byte) int {
	s.sinkData = d
	err := s.sink.Write(s.sinkFn)
	n, werr := s.sinkN, s.sinkErr
	s.sinkData, s.sinkErr = nil, nil
	if err != nil || (werr != nil && werr != syscall.EAGAIN) {
		s.sink = nil
		return 0
	}
	return max(n, 0)
}

// ID is the stream's HTTP/2 id.
func (s *Stream) ID() uint32 { return s.id }

func (s *Stream) abort(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
	s.respOnce.Do(func() { close(s.respCh) })
	s.cond.Broadcast()
}

// dropUnread discards received bytes nobody will read, returning them to
// the connection's receive window: kept, they would shrink it for every
// other stream on the connection, for good. Bytes of a direction that
// ended cleanly (END_STREAM) stay readable unless all is true (the reader
// closed the stream).
func (s *Stream) dropUnread(all bool) {
	s.mu.Lock()
	var left int64
	if all || !s.recvEnd {
		left = int64(len(s.buf) - s.off)
		s.buf, s.off = nil, 0
	}
	s.mu.Unlock()
	if left > 0 {
		s.c.consumed(left)
	}
}

func (s *Stream) endRecv() {
	s.mu.Lock()
	s.recvEnd = true
	s.mu.Unlock()
	s.respOnce.Do(func() { close(s.respCh) })
	s.cond.Broadcast()
}

// Wait returns when Read would not block: bytes are queued, the peer
// ended its side, or the stream failed. A relay waits here before taking
// a copy buffer, so an idle stream's relay holds none. Like Read, it
// tells the read loop the caller is done with what Read returned before.
func (s *Stream) Wait() {
	s.mu.Lock()
	s.readerBusy = false
	for s.off == len(s.buf) && !s.recvEnd && s.err == nil {
		s.releaseIdleLocked()
		s.cond.Wait()
	}
	s.mu.Unlock()
}

// keepBuf is the largest receive buffer a stream keeps while it waits
// with nothing queued. The buffer grows to the stream window (4 MiB) when
// the sink cannot take the bytes; kept, every pooled connection that once
// had a burst for a slow reader would hold it for its whole idle life.
const keepBuf = 64 << 10

// releaseIdleLocked drops an empty receive buffer larger than keepBuf.
// Called with s.mu held, only when nothing is queued.
func (s *Stream) releaseIdleLocked() {
	if cap(s.buf) > keepBuf {
		s.buf, s.off = nil, 0
	}
}

// Read reads what the peer sent; io.EOF once it ended its side.
func (s *Stream) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.mu.Lock()
	s.readerBusy = false // the caller is done with what we returned before
	for s.off == len(s.buf) && !s.recvEnd && s.err == nil {
		s.releaseIdleLocked()
		s.cond.Wait()
	}
	if s.off < len(s.buf) {
		n := copy(p, s.buf[s.off:])
		s.off += n
		s.readerBusy = true
		s.unacked += int64(n)
		var upd int64
		// Return window in large steps: one WINDOW_UPDATE per half window.
		if s.unacked >= int64(s.c.cfg.StreamWindow)/2 && !s.recvEnd {
			upd, s.unacked = s.unacked, 0
			s.recvWindow += upd
		}
		s.mu.Unlock()
		if upd > 0 {
			s.c.writeWindowUpdate(s.id, upd)
		}
		s.c.consumed(int64(n))
		return n, nil
	}
	// A direction the peer ended cleanly reads as EOF even if the stream
	// was reset afterwards: everything it sent has been read.
	err := s.err
	if s.recvEnd {
		err = io.EOF
	}
	s.mu.Unlock()
	return 0, err
}

// consumed returns connection-level window as streams' readers take bytes.
func (c *Conn) consumed(n int64) {
	c.mu.Lock()
	c.recvUnacked += n
	var upd int64
	if c.recvUnacked >= int64(c.cfg.ConnWindow)/4 {
		upd, c.recvUnacked = c.recvUnacked, 0
		c.recvWindow += upd
	}
	dead := c.err != nil
	c.mu.Unlock()
	if upd > 0 && !dead {
		c.writeWindowUpdate(0, upd)
	}
}

// Write sends p as DATA frames, waiting for flow-control window.
func (s *Stream) Write(p []byte) (int, error) {
	c := s.c
	written := 0
	for len(p) > 0 {
		s.mu.Lock()
		for s.sendWindow <= 0 && s.err == nil && !s.sentEnd {
			s.cond.Wait()
		}
		if err := s.failedLocked(); err != nil {
			s.mu.Unlock()
			return written, err
		}
		sw := s.sendWindow
		s.mu.Unlock()

		c.mu.Lock()
		// Waiting for connection window ends also when this stream dies
		// (reset or closed): c.cond is broadcast then too.
		var serr error
		for c.sendWindow <= 0 && c.err == nil {
			if serr = s.failed(); serr != nil {
				break
			}
			c.cond.Wait()
		}
		if c.err != nil || serr != nil {
			err := c.err
			if err == nil {
				err = serr
			}
			c.mu.Unlock()
			return written, err
		}
		cw := c.sendWindow
		n := min(int64(len(p)), sw, cw, int64(c.peerMaxFr))
		c.sendWindow -= n
		c.mu.Unlock()
		s.mu.Lock()
		s.sendWindow -= n
		s.mu.Unlock()

		last := n == int64(len(p))
		c.wmu.Lock()
		err := c.fr.WriteData(s.id, false, p[:n])
		if err == nil && (last || n == sw || n == cw) {
			// One flush per Write: an exchange of small messages is one
			// TLS record each way, a bulk write fills records. Also before
			// waiting for window: the peer can only return window for
			// bytes it has received.
			err = c.bw.Flush()
		}
		c.unlockW()
		if err != nil {
			c.fail(err)
			return written, err
		}
		written += int(n)
		p = p[n:]
	}
	return written, nil
}

// failed returns why the stream can no longer send (nil while it can).
// Called with c.mu held (lock order: c.mu before s.mu).
func (s *Stream) failed() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.failedLocked()
}

var errWriteAfterClose = errors.New("hbone: write after CloseWrite")

func (s *Stream) failedLocked() error {
	if s.err != nil {
		return s.err
	}
	if s.sentEnd {
		return errWriteAfterClose
	}
	return nil
}

// CloseWrite ends our side of the stream (END_STREAM); reading goes on.
func (s *Stream) CloseWrite() error {
	s.mu.Lock()
	if s.sentEnd || s.err != nil {
		err := s.err
		s.mu.Unlock()
		return err
	}
	s.sentEnd = true
	s.mu.Unlock()
	s.cond.Broadcast()
	c := s.c
	c.wmu.Lock()
	c.forgetIfDone(s) // before the peer can read our END_STREAM
	err := c.fr.WriteData(s.id, true, nil)
	if err == nil {
		err = c.bw.Flush()
	}
	c.unlockW()
	if err != nil {
		c.fail(err)
		return err
	}
	c.removeIfDone(s)
	return nil
}

// Reset aborts the stream both ways (RST_STREAM with code). A stream that
// is already over (the peer reset it, or it ended both ways) is only
// released: a reset is never answered with a reset.
func (s *Stream) Reset(code http2.ErrCode) {
	c := s.c
	c.mu.Lock()
	known := c.streams[s.id] == s
	c.mu.Unlock()
	if known {
		c.resetStream(s.id, code)
		return
	}
	s.abort(errClosedLocally)
	s.dropUnread(true)
}

// Close releases the stream: a stream still open in either direction is
// reset (CANCEL); one that ended both ways is only forgotten.
func (s *Stream) Close() error {
	s.mu.Lock()
	open := s.err == nil && !(s.recvEnd && s.sentEnd)
	if s.err == nil {
		s.err = errClosedLocally
	}
	s.mu.Unlock()
	s.cond.Broadcast()
	s.dropUnread(true)
	if open {
		s.c.resetStream(s.id, http2.ErrCodeCancel)
		return nil
	}
	s.c.mu.Lock()
	if s.c.streams[s.id] == s {
		delete(s.c.streams, s.id)
	}
	s.c.mu.Unlock()
	s.c.cond.Broadcast()
	s.c.closeIfDrained()
	return nil
}

var errClosedLocally = errors.New("hbone: stream closed")

// Respond sends the response headers of a server stream. 200 opens the
// tunnel; any other status ends the stream (and tells the client to stop
// sending with RST_STREAM NO_ERROR, as RFC 9113 8.1 allows). A stream
// that was reset (or whose connection ended) gets no response: Respond
// returns why.
func (s *Stream) Respond(status int) error {
	c := s.c
	s.mu.Lock()
	if s.responded {
		s.mu.Unlock()
		return errors.New("hbone: already responded")
	}
	if s.err != nil {
		err := s.err
		s.mu.Unlock()
		return err
	}
	s.responded = true
	end := status != 200
	if end {
		s.sentEnd = true
	}
	recvEnd := s.recvEnd
	s.mu.Unlock()
	c.wmu.Lock()
	if end && recvEnd {
		c.forgetIfDone(s) // before the peer can read our END_STREAM
	}
	err := c.writeHeadersLocked(s.id, [][2]string{{":status", strconv.Itoa(status)}}, end)
	c.unlockW()
	if err != nil {
		c.fail(err)
		return err
	}
	if end && !recvEnd {
		c.resetStream(s.id, http2.ErrCodeNo)
	} else if end {
		c.removeIfDone(s)
	}
	return nil
}
