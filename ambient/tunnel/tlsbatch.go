package tunnel

import (
	"crypto/tls"
	"net"
	"sync"
)

// TLS record gathering.
//
// crypto/tls writes every record (at most 16 KiB of payload, and at the
// start of a connection records of one TCP segment: dynamic record
// sizing) with a write system call of its own. An HBONE writer hands TLS
// up to 64 KiB at once (one read from the application), which made five
// to eleven write calls. batchedTLS corks the TCP connection under TLS for
// the length of one tls.Conn.Write: the records are gathered in a pooled
// buffer and leave in one write. A small message is one record either way.

// corkConn is the TCP connection under TLS; while corked, writes are
// gathered and leave as one when uncorked. Everything but Write is the
// *net.TCPConn's (CloseWrite, deadlines, Close: hbone half-closes and
// closes it through tls.Conn.NetConn).
type corkConn struct {
	*net.TCPConn

	mu     sync.Mutex // corked, buf, writes; held while a write is under way
	corked bool
	buf    *[]byte
	writes int // writes to the socket (tests check the gathering)
}

// Write writes p, or gathers it while corked. Writes that crypto/tls makes
// on its own (alerts, key updates) while a write is corked go out with it,
// in order.
func (c *corkConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.corked {
		*c.buf = append(*c.buf, p...)
		return len(p), nil
	}
	c.writes++
	return c.TCPConn.Write(p)
}

// batchBufs hold corked writes: hbone writes at most 128 KiB at once (a
// 64 KiB chunk, or a last piece up to twice that), plus record overhead.
var batchBufs = sync.Pool{New: func() any { b := make([]byte, 0, 132<<10); return &b }}

func (c *corkConn) cork() {
	c.mu.Lock()
	c.corked = true
	if c.buf == nil {
		c.buf = batchBufs.Get().(*[]byte)
	}
	c.mu.Unlock()
}

// uncork writes what was gathered, in one system call when the socket
// takes it all (the socket's write deadline applies as to any write).
func (c *corkConn) uncork() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.corked = false
	b := c.buf
	c.buf = nil
	if b == nil {
		return nil
	}
	var err error
	if len(*b) > 0 {
		c.writes++
		_, err = c.TCPConn.Write(*b)
	}
	if cap(*b) <= 1<<20 { // one grown by a rare huge write is dropped
		*b = (*b)[:0]
		batchBufs.Put(b)
	}
	return err
}

// batchedTLS is a TLS connection whose every Write leaves in one write to
// the socket.
type batchedTLS struct {
	*tls.Conn
	raw *corkConn
}

// oneRecord: a write this small is one TLS record even while crypto/tls
// sizes records to one TCP segment (about 1200 bytes of payload): there is
// nothing to gather, and it skips the pooled buffer (which a GC empties:
// a 132 KiB buffer made again for a 64-byte message cost more than it
// saved).
const oneRecord = 1 << 10

func (t batchedTLS) Write(p []byte) (int, error) {
	if len(p) <= oneRecord {
		return t.Conn.Write(p)
	}
	t.raw.cork()
	n, err := t.Conn.Write(p)
	if ferr := t.raw.uncork(); err == nil && ferr != nil {
		return n, ferr
	}
	return n, err
}

// tlsOver starts TLS on raw with its records gathered per write; tc is for
// the handshake, nc for the HTTP/2 connection on top.
func tlsOver(raw *net.TCPConn, cfg *tls.Config, server bool) (tc *tls.Conn, nc net.Conn) {
	cc := &corkConn{TCPConn: raw}
	if server {
		tc = tls.Server(cc, cfg)
	} else {
		tc = tls.Client(cc, cfg)
	}
	return tc, batchedTLS{Conn: tc, raw: cc}
}
