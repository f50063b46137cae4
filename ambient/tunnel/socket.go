package tunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/kernel"
)

// podNetns creates sockets inside one pod's network namespace. Every socket
// carries the proxy mark, which istio-cni's rules (when they coexist) know;
// sockets that connect are also recorded in the kernel's own-socket storage
// (own), which is what the kernel path trusts: a pod can set a mark, it
// cannot write that storage.
type podNetns struct {
	fd  int
	own OwnSockets
}

// markControl sets the proxy mark and, for listeners, SO_REUSEPORT: a
// second daemon (an upgrade) binds the same ports beside us and the kernel
// spreads new connections over both until we close.
func markControl(reuse bool) func(string, string, syscall.RawConn) error {
	return func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, bpf.ProxyMark); serr != nil {
				serr = fmt.Errorf("SO_MARK: %w", serr)
				return
			}
			if reuse {
				if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); serr != nil {
					serr = fmt.Errorf("SO_REUSEPORT: %w", serr)
				}
			}
		})
		if err != nil {
			return err
		}
		return serr
	}
}

func (n podNetns) listen(addr string) (*net.TCPListener, error) {
	var l net.Listener
	err := kernel.InNetns(n.fd, func() (err error) {
		lc := net.ListenConfig{Control: markControl(true)}
		// Plain TCP, not Go's default MPTCP for listeners: the kernel's
		// inbound enforcement holds the 15006 listener in a sockhash,
		// which takes TCP sockets only (MPTCP ones fail with EOPNOTSUPP),
		// and iptables REDIRECT/SO_ORIGINAL_DST are TCP's.
		lc.SetMultipathTCP(false)
		l, err = lc.Listen(context.Background(), "tcp", addr)
		return err
	})
	if err != nil {
		return nil, err
	}
	return l.(*net.TCPListener), nil
}

// dial connects from inside the pod without holding an OS thread while the
// connection is being made. A socket belongs to the network namespace it was
// created in for its whole life, whichever thread uses it later, so only
// socket(2) and the options run on a thread locked into the pod's namespace
// (kernel.InNetns: a few microseconds); the non-blocking connect(2) and the
// wait for it (up to timeout, or until ctx ends) happen on an ordinary
// goroutine, parked in the runtime's poller like any net.Dialer dial. The
// connection gets what net.Dialer would give it: TCP_NODELAY and Go's
// default keep-alive (net.FileConn), plus the proxy mark.
func (n podNetns) dial(ctx context.Context, dst netip.AddrPort, timeout time.Duration) (*net.TCPConn, error) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if !dst.IsValid() {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("invalid address")}
	}
	f, err := n.socket(dst.Addr().Is6())
	if err != nil {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(dst), Err: err}
	}
	defer f.Close() // net.FileConn keeps a duplicate
	if err := connect(ctx, f, dst, timeout); err != nil {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(dst), Err: err}
	}
	c, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// socket creates a non-blocking TCP socket in the pod's namespace, with the
// proxy mark and recorded as the proxy's own, and hands it back as a pollable file (os.NewFile registers a
// non-blocking descriptor with the runtime's poller).
func (n podNetns) socket(v6 bool) (*os.File, error) {
	family := unix.AF_INET
	if v6 {
		family = unix.AF_INET6
	}
	fd := -1
	err := kernel.InNetns(n.fd, func() error {
		s, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
		if err != nil {
			return os.NewSyscallError("socket", err)
		}
		fd = s
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, bpf.ProxyMark); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("SO_MARK: %w", err)
	}
	// Fail the dial rather than connect unrecorded: the kernel would send
	// the proxy's own connection back to the proxy.
	if n.own != nil {
		if err := n.own.MarkProxySocket(uintptr(fd)); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("recording the socket as the proxy's own: %w", err)
		}
	}
	return os.NewFile(uintptr(fd), "tcp"), nil
}

// connect runs a non-blocking connect(2) on f and waits for it in the
// runtime's poller, as net's own dialer does: writable means finished, then
// SO_ERROR says how. The deadline is the earlier of timeout and ctx's; ctx
// ending first interrupts the wait by moving the deadline into the past.
func connect(ctx context.Context, f *os.File, dst netip.AddrPort, timeout time.Duration) error {
	var sa unix.Sockaddr
	if dst.Addr().Is4() {
		sa = &unix.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()}
	} else {
		sa = &unix.SockaddrInet6{Port: int(dst.Port()), Addr: dst.Addr().As16()}
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		for {
			cerr = unix.Connect(int(fd), sa)
			if cerr != unix.EINTR {
				return
			}
		}
	}); err != nil {
		return err
	}
	switch cerr {
	case nil, unix.EISCONN:
		return nil
	case unix.EINPROGRESS, unix.EALREADY:
	default:
		return os.NewSyscallError("connect", cerr)
	}

	deadline, ok := ctx.Deadline()
	if timeout > 0 {
		if d := time.Now().Add(timeout); !ok || d.Before(deadline) {
			deadline = d
		}
	}
	if !deadline.IsZero() {
		if err := f.SetWriteDeadline(deadline); err != nil {
			return err
		}
	}
	if ctx.Done() != nil {
		stop := context.AfterFunc(ctx, func() { _ = f.SetWriteDeadline(aLongTimeAgo) })
		defer stop()
	}
	var werr error
	err = rc.Write(func(fd uintptr) bool {
		soerr, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			werr = os.NewSyscallError("getsockopt", err)
			return true
		}
		switch e := unix.Errno(soerr); e {
		case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
			return false
		case 0, unix.EISCONN:
			// Writable with no error can be spurious; connected means a peer.
			if _, err := unix.Getpeername(int(fd)); err != nil {
				return false
			}
			return true
		default:
			werr = os.NewSyscallError("connect", e)
			return true
		}
	})
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return ctxErr
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return errDialTimeout
		}
		return err
	}
	if werr != nil {
		return werr
	}
	return f.SetWriteDeadline(time.Time{})
}

// aLongTimeAgo is a deadline that has passed: setting it wakes a waiter.
var aLongTimeAgo = time.Unix(1, 0)

// errDialTimeout is what a dial that ran out of time returns: a net.Error
// whose Timeout() is true, as net.Dialer's is.
var errDialTimeout error = dialTimeoutError{}

type dialTimeoutError struct{}

func (dialTimeoutError) Error() string   { return "i/o timeout" }
func (dialTimeoutError) Timeout() bool   { return true }
func (dialTimeoutError) Temporary() bool { return true }
func (dialTimeoutError) Is(err error) bool {
	return err == os.ErrDeadlineExceeded || err == context.DeadlineExceeded
}

// migrateRequests turns on net.ipv4.tcp_migrate_req inside the pod: when
// an old daemon closes its listener during an upgrade, connections waiting
// in its accept queue move to the new daemon's listener instead of being
// reset. Best effort: kernels before 5.14 do not have it.
func (n podNetns) migrateRequests() error {
	return kernel.InNetns(n.fd, func() error {
		// /proc/sys/net follows the namespace of the thread that opens it.
		f, err := os.OpenFile("/proc/sys/net/ipv4/tcp_migrate_req", os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = f.WriteString("1")
		return err
	})
}

// originalDst is where a connection redirected by iptables (istio-cni's
// in-pod rules: REDIRECT to 15001/15006) was going.
func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var out netip.AddrPort
	var gerr error
	v6 := c.LocalAddr().(*net.TCPAddr).AddrPort().Addr().Unmap().Is6()
	cerr := rc.Control(func(fd uintptr) {
		if v6 {
			var sa unix.RawSockaddrInet6
			l := uint32(unsafe.Sizeof(sa))
			// IP6T_SO_ORIGINAL_DST == SO_ORIGINAL_DST (80) at SOL_IPV6.
			_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_IPV6, unix.SO_ORIGINAL_DST,
				uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&l)), 0)
			if e != 0 {
				gerr = e
				return
			}
			p := (*[2]byte)(unsafe.Pointer(&sa.Port))
			out = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(p[0])<<8|uint16(p[1]))
			return
		}
		var sa unix.RawSockaddrInet4
		l := uint32(unsafe.Sizeof(sa))
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_IP, unix.SO_ORIGINAL_DST,
			uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&l)), 0)
		if e != 0 {
			gerr = e
			return
		}
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		out = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(p[0])<<8|uint16(p[1]))
	})
	if cerr != nil {
		return netip.AddrPort{}, cerr
	}
	if gerr != nil {
		return netip.AddrPort{}, fmt.Errorf("SO_ORIGINAL_DST: %w", gerr)
	}
	return out, nil
}

func addrPortOf(a net.Addr) netip.AddrPort {
	if t, ok := a.(*net.TCPAddr); ok {
		ap := t.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// isClosed reports errors that only mean "the listener was closed".
func isClosed(err error) bool { return errors.Is(err, net.ErrClosed) }
