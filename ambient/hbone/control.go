package hbone

import (
	"golang.org/x/net/http2"
)

// Control frames (WINDOW_UPDATE, RST_STREAM, PING and its ack, SETTINGS
// acks, GOAWAY) never make their sender wait for the write lock. The read
// loop sends most of them, and it must keep reading while a writer holds
// wmu blocked in a flush: that writer waits for the peer to read, and the
// peer may be waiting for us to read (both sides writing bulk at once). A
// read loop that blocked on wmu there would deadlock the connection. So control
// frames go into a queue, written by whoever holds wmu next (a writer
// takes them along as it unlocks) or by the connection's control writer,
// which blocks on wmu and on the socket so the read loop never does.
//
// The queue is bounded (Config.MaxControlFrames): most control frames
// answer the peer's frames, and a peer that keeps sending PINGs or
// SETTINGS while it reads nothing would otherwise grow it for as long as
// it likes. Such a peer is disconnected, as x/net's server does.
type ctrlKind uint8

const (
	ctrlWindow ctrlKind = iota
	ctrlRST
	ctrlPingAck
	ctrlSettingsAck
	ctrlPing       // keepalive
	ctrlGoAway     // id: last stream id; val: error code
	ctrlCloseWrite // the connection is drained: close our sending side
)

type ctrlFrame struct {
	kind ctrlKind
	id   uint32
	val  uint32 // window increment, error code
	// settings ack: the peer's SETTINGS_HEADER_TABLE_SIZE, applied to our
	// encoder as the ack is written (-1: unchanged).
	tableSize int64
	ping      [8]byte
}

// sendControl queues f for the control writer; it never blocks. A queue
// that is full ends the connection. Callers hold none of the connection's
// locks.
func (c *Conn) sendControl(f ctrlFrame) {
	c.cmu.Lock()
	if max := c.cfg.MaxControlFrames; max > 0 && len(c.ctrl) >= max && f.kind < ctrlGoAway {
		n := len(c.ctrl)
		c.cmu.Unlock()
		c.protocolError(http2.ErrCodeEnhanceYourCalm, ReasonControlFlood,
			"%d control frames waiting for the peer to read (it sends faster than it reads)", n)
		return
	}
	c.ctrl = append(c.ctrl, f)
	c.ctrlPending.Store(true)
	c.cmu.Unlock()
	select {
	case c.kick <- struct{}{}:
	default: // already kicked
	}
}

// controlWriter writes queued control frames until the connection ends.
func (c *Conn) controlWriter() {
	for {
		select {
		case <-c.kick:
		case <-c.done:
			return
		}
		if c.ctrlPending.Load() {
			c.wmu.Lock()
			c.unlockW()
		}
	}
}

// unlockW releases wmu after writing queued control frames. A frame
// queued while we held wmu is written here; one queued after our last
// look is seen by the loop (its sender set ctrlPending before trying wmu,
// and failed only because we still held it).
func (c *Conn) unlockW() {
	for {
		c.writeControlLocked()
		c.wmu.Unlock()
		if !c.ctrlPending.Load() || !c.wmu.TryLock() {
			return
		}
	}
}

// writeControlLocked writes and flushes queued control frames. Caller
// holds wmu.
func (c *Conn) writeControlLocked() {
	if !c.ctrlPending.Load() {
		return
	}
	c.cmu.Lock()
	q := c.ctrl
	c.ctrl = c.ctrlSpare[:0]
	c.ctrlPending.Store(false)
	c.cmu.Unlock()
	var err error
	for i := range q {
		if err != nil {
			break
		}
		f := &q[i]
		switch f.kind {
		case ctrlWindow:
			err = c.fr.WriteWindowUpdate(f.id, f.val)
		case ctrlRST:
			err = c.fr.WriteRSTStream(f.id, http2.ErrCode(f.val))
		case ctrlPingAck:
			err = c.fr.WritePing(true, f.ping)
		case ctrlPing:
			err = c.fr.WritePing(false, f.ping)
		case ctrlGoAway:
			err = c.fr.WriteGoAway(f.id, http2.ErrCode(f.val), nil)
		case ctrlSettingsAck:
			if f.tableSize >= 0 {
				c.henc.SetMaxDynamicTableSizeLimit(uint32(f.tableSize))
			}
			err = c.fr.WriteSettingsAck()
		}
	}
	if err == nil {
		err = c.bw.Flush()
	}
	for i := range q {
		if err == nil && q[i].kind == ctrlCloseWrite {
			if cw, ok := c.nc.(interface{ CloseWrite() error }); ok {
				_ = cw.CloseWrite()
			} else {
				c.fail(ErrClosed)
			}
		}
	}
	c.cmu.Lock()
	c.ctrlSpare = q[:0]
	c.cmu.Unlock()
	if err != nil {
		c.fail(err)
	}
}
