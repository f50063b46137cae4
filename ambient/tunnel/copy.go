package tunnel

import (
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"syscall"

	"golang.org/x/net/http2"

	"kmesh.dev/kmesh/ambient/hbone"
)

// bufSize: one TLS record carries at most 16 KiB; 64 KiB lets one read
// from a busy socket fill several records and DATA frames at once.
const bufSize = 64 << 10

// bufPool's buffers are held only while bytes are on their way: relays
// take one when their source has something to read and give it back
// before they wait again, so an idle connection holds no copy buffer
// (TestTunnelIdleMemory: 279 KiB per idle tunnelled connection when each
// direction of each end kept its own 64 KiB for the connection's life).
var bufPool = sync.Pool{New: func() any { b := make([]byte, bufSize); return &b }}

// relayConn copies src to dst until src's EOF (nil) or the first error. It
// waits for src to be readable holding no buffer: it reads through the
// socket's RawConn and takes a pooled buffer only for a read that finds
// bytes. The write to dst happens outside the RawConn callback, so closing
// src never waits for a blocked dst (Close waits for a RawConn.Read in
// progress).
func relayConn(dst io.Writer, src *net.TCPConn) (int64, error) {
	rc, err := src.SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int64
	var bp *[]byte
	var k int
	var rerr error
	read := func(fd uintptr) bool {
		bp = bufPool.Get().(*[]byte)
		for {
			k, rerr = syscall.Read(int(fd), *bp)
			if rerr != syscall.EINTR {
				break
			}
		}
		if rerr == syscall.EAGAIN {
			bufPool.Put(bp)
			bp = nil
			return false // wait for readability, holding nothing
		}
		return true
	}
	for {
		// An error here: closed (by the other direction, or the proxy)
		// or a deadline; the bytes read before were written.
		err := rc.Read(read)
		if err == nil && rerr != nil {
			err = os.NewSyscallError("read", rerr)
		}
		var w int
		if err == nil && k > 0 {
			w, err = dst.Write((*bp)[:k])
		}
		if bp != nil {
			bufPool.Put(bp)
			bp = nil
		}
		n += int64(w)
		if err != nil || k == 0 { // k == 0: EOF
			return n, err
		}
	}
}

// relayStream copies what the peer sends on st to dst until the peer ends
// its side, taking a pooled buffer only when bytes are queued (st.Wait).
func relayStream(dst io.Writer, st *hbone.Stream) (int64, error) {
	var n int64
	for {
		st.Wait()
		bp := bufPool.Get().(*[]byte)
		k, rerr := st.Read(*bp)
		if k > 0 {
			w, werr := dst.Write((*bp)[:k])
			n += int64(w)
			if werr != nil {
				bufPool.Put(bp)
				return n, werr
			}
		}
		bufPool.Put(bp)
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
		n, err = relayConn(dst, src)
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
	// relayStream below carries the rest and the end of the stream.
	if rc, rerr := app.SyscallConn(); rerr == nil {
		st.SetSink(rc)
	}
	defer func() { toApp += st.Delivered() }()
	var upErr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		fromApp, upErr = relayConn(st, app)
		if upErr != nil {
			st.Reset(http2.ErrCodeCancel)
			_ = app.SetLinger(0)
			app.Close()
			return
		}
		_ = st.CloseWrite()
	}()
	toApp, err = relayStream(app, st)
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
