package tunnel

import (
	"io"
	"math/rand/v2"
	"net"
	"sync"

	"golang.org/x/net/http2"

	"kmesh.dev/kmesh/ambient/hbone"
)

// bufSize: one TLS record carries at most 16 KiB; 64 KiB lets one read
// from a busy socket fill several records and DATA frames at once.
const bufSize = 64 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, bufSize); return &b }}

// copyBuf copies src to dst with a pooled buffer. It returns the bytes
// copied and the first error that is not the source's EOF.
func copyBuf(dst io.Writer, src io.Reader) (int64, error) {
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
		}
		if rerr != nil {
			if rerr == io.EOF {
				return n, nil
			}
			return n, rerr
		}
	}
}

// armReset makes closing c reset the connection, until disarmReset: also
// the close the kernel does when the daemon dies (a crash, SIGKILL). An
// application whose connection the tunnel carried then reads ECONNRESET
// at once — not a clean end of stream it could take for a complete
// answer, and not a hang. Every accepted connection and every socket
// dialled to an application is armed while it relays; a graceful end
// disarms it before the close, so the peer gets its FIN.
func armReset(c *net.TCPConn) { _ = c.SetLinger(0) }

// disarmReset restores the ordinary close (FIN). On a connection already
// closed (a relay that failed resets and closes it) it does nothing.
func disarmReset(c *net.TCPConn) { _ = c.SetLinger(-1) }

// plainCopy copies between two TCP connections, then half-closes dst.
// Unless the kernel may splice the in-pod legs (sockmap, Config.Splice), it
// uses splice(2) (net.TCPConn.ReadFrom: no bytes through user space).
// With splicing on it reads with read(2): sk_msg queues redirected bytes
// where read(2) finds them and splice(2) does not — on Linux 6.18 a
// splice(2) read of such a socket sees the FIN and none of the bytes
// (TestPrivilegedSplice, "splice-read").
func plainCopy(dst, src *net.TCPConn, kernelSpliced bool) (int64, error) {
	var n int64
	var err error
	if kernelSpliced {
		n, err = copyBuf(dst, src)
	} else {
		n, err = dst.ReadFrom(src)
	}
	_ = dst.CloseWrite()
	return n, err
}

// splicePipe carries a plaintext connection between client and server,
// both ways, each direction half-closed on its own. It returns
// the bytes client→server and server→client.
func splicePipe(client, server *net.TCPConn, kernelSpliced bool) (up, down int64) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		down, _ = plainCopy(client, server, kernelSpliced)
	}()
	up, _ = plainCopy(server, client, kernelSpliced)
	<-done
	return up, down
}

// pipe carries a tunnelled connection: the application's socket one side,
// an HBONE stream the other. Each direction ends on its own (half-close:
// END_STREAM one way, shutdown(SHUT_WR) the other); a failure in either
// resets both. It returns the bytes from the application (received, in
// Istio's terms when the application is the client) and to it (sent).
func pipe(app *net.TCPConn, st *hbone.Stream) (fromApp, toApp int64, err error) {
	// The connection's read loop writes the stream's bytes to the
	// application itself when it can (no goroutine hand-off per message);
	// copyBuf below carries the rest and the end of the stream.
	if rc, rerr := app.SyscallConn(); rerr == nil {
		st.SetSink(rc)
	}
	defer func() { toApp += st.Delivered() }()
	var upErr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		fromApp, upErr = copyBuf(st, app)
		if upErr != nil {
			st.Reset(http2.ErrCodeCancel)
			_ = app.SetLinger(0)
			app.Close()
			return
		}
		_ = st.CloseWrite()
	}()
	toApp, err = copyBuf(app, st)
	if err != nil {
		// The stream broke (reset, or its connection died) or the
		// application did: either way the application must see a reset,
		// never a clean FIN on truncated data.
		st.Reset(http2.ErrCodeCancel)
		_ = app.SetLinger(0)
		app.Close() // unblocks the other direction
	} else {
		_ = app.CloseWrite()
	}
	<-done
	if err == nil {
		err = upErr
	}
	return fromApp, toApp, err
}

// pipeInbound is pipe seen from the server side: bytes to the application
// (received from the client) and from it (sent back).
func pipeInbound(app *net.TCPConn, st *hbone.Stream) (toApp, fromApp int64, err error) {
	fromApp, toApp, err = pipe(app, st)
	return toApp, fromApp, err
}

func fillRandom(b []byte) {
	for i := 0; i < len(b); i += 8 {
		v := rand.Uint64()
		for j := 0; j < 8 && i+j < len(b); j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
}
