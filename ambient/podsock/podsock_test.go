package podsock

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/kerneltest"
)

// here runs fn on the calling thread: the test's own namespace, loopback only.
func here(fn func() error) error { return fn() }

type recorder struct {
	fds []uintptr
	err error
}

func (r *recorder) MarkProxySocket(fd uintptr) error {
	if r.err != nil {
		return r.err
	}
	r.fds = append(r.fds, fd)
	return nil
}

func mark(t *testing.T, f *os.File) int {
	t.Helper()
	m, err := unix.GetsockoptInt(int(f.Fd()), unix.SOL_SOCKET, unix.SO_MARK)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestPrivilegedSocket(t *testing.T) {
	kerneltest.RequireRoot(t)
	for _, typ := range []int{unix.SOCK_STREAM, unix.SOCK_DGRAM} {
		own := &recorder{}
		f, err := Socket(here, false, typ, own)
		if err != nil {
			t.Fatal(err)
		}
		if m := mark(t, f); m != bpf.ProxyMark {
			t.Errorf("type %d: mark %#x, want the proxy mark %#x", typ, m, bpf.ProxyMark)
		}
		if len(own.fds) != 1 || own.fds[0] != f.Fd() {
			t.Errorf("type %d: recorded %v, want [%d]", typ, own.fds, f.Fd())
		}
		f.Close()
	}

	// A socket that cannot be recorded is refused and closed: connected
	// unrecorded, the kernel would send it back to the proxy.
	before := openFds(t)
	if _, err := Socket(here, false, unix.SOCK_STREAM, &recorder{err: errors.New("map full")}); err == nil {
		t.Fatal("an unrecorded socket was handed out")
	}
	if after := openFds(t); after != before {
		t.Errorf("descriptors: %d before, %d after a refused socket (leak)", before, after)
	}
}

func openFds(t *testing.T) int {
	t.Helper()
	d, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(d)
}

func TestPrivilegedConnect(t *testing.T) {
	kerneltest.RequireRoot(t)
	dial := func(ctx context.Context, dst netip.AddrPort, timeout time.Duration) error {
		f, err := Socket(here, false, unix.SOCK_STREAM, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		return Connect(ctx, f, dst, timeout)
	}

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dst := l.Addr().(*net.TCPAddr).AddrPort()
	if err := dial(context.Background(), dst, time.Second); err != nil {
		t.Errorf("to a listener: %v", err)
	}
	l.Close()
	if err := dial(context.Background(), dst, time.Second); !errors.Is(err, unix.ECONNREFUSED) {
		t.Errorf("to a closed port: %v, want ECONNREFUSED", err)
	}

	// A listener whose accept queue is full drops SYNs: the connect stays in
	// progress until the timeout or the context ends it.
	full := fullListener(t)
	start := time.Now()
	err = dial(context.Background(), full, 200*time.Millisecond)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() || !errors.Is(err, ErrDialTimeout) {
		t.Errorf("to a full accept queue with a timeout: %v, want a timeout", err)
	}
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Errorf("timed out after %v, before the 200ms asked", d)
	}
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	if err := dial(ctx, full, time.Minute); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: %v, want context.Canceled", err)
	}
}

// fullListener is a loopback listener with backlog 0 that never accepts,
// its queue filled by connections the test holds.
func fullListener(t *testing.T) netip.AddrPort {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	dst := netip.AddrPortFrom(netip.AddrFrom4(sa.(*unix.SockaddrInet4).Addr), uint16(sa.(*unix.SockaddrInet4).Port))
	// Fill the queue: connects that complete (queued) until one does not.
	for i := 0; i < 8; i++ {
		c, err := net.DialTimeout("tcp", dst.String(), 100*time.Millisecond)
		if err != nil {
			return dst
		}
		t.Cleanup(func() { c.Close() })
	}
	t.Fatal("the accept queue never filled")
	return dst
}
