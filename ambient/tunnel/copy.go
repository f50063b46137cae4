package tunnel

import (
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"syscall"
)

// bufSize: one TLS record carries at most 16 KiB; 64 KiB lets one read
// from a busy socket fill several records and DATA frames at once.
const bufSize = 64 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, bufSize); return &b }}

// copyFlush copies src to dst with a pooled buffer, calling flush after
// every write (an HTTP/2 response writer buffers otherwise, adding latency
// to every exchange). It returns the bytes copied and the first error that
// is not the source's EOF.
func copyFlush(dst io.Writer, src io.Reader, flush func()) (int64, error) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	var n int64
	for {
		k, rerr := src.Read(buf)
		if k > 0 {
			w, werr := dst.Write(buf[:k])
			n += int64(w)
			if werr != nil {
				return n, werr
			}
			if flush != nil {
				flush()
			}
		}
		if rerr != nil {
			if rerr == io.EOF {
				return n, nil
			}
			return n, rerr
		}
	}
}

// spliceCopy copies between two TCP connections: net.TCPConn.ReadFrom
// splices in the kernel (no bytes through user space) for the plaintext
// legs, then half-closes dst.
func spliceCopy(dst, src *net.TCPConn) (int64, error) {
	n, err := dst.ReadFrom(src)
	_ = dst.CloseWrite()
	return n, err
}

// resetOnError closes c with RST (SO_LINGER 0) when the other side failed:
// the application must learn the connection broke, not see a clean EOF.
func resetOnError(c *net.TCPConn, err error) {
	if err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, syscall.EPIPE) {
		_ = c.SetLinger(0)
	}
}

// appBody is the application's socket as the body of an outbound CONNECT:
// the HTTP/2 transport reads it directly into DATA frames (no pipe, no
// extra copy) and its EOF becomes END_STREAM. Close, which the transport
// calls when the request ends, only signals: the socket still carries the
// response.
type appBody struct {
	c    *net.TCPConn
	n    int64
	once sync.Once
	done chan struct{}
}

func newAppBody(c *net.TCPConn) *appBody { return &appBody{c: c, done: make(chan struct{})} }

func (b *appBody) Read(p []byte) (int, error) {
	k, err := b.c.Read(p)
	b.n += int64(k)
	return k, err
}

func (b *appBody) Close() error {
	b.once.Do(func() { close(b.done) })
	return nil
}

func fillRandom(b []byte) {
	for i := 0; i < len(b); i += 8 {
		v := rand.Uint64()
		for j := 0; j < 8 && i+j < len(b); j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
}
