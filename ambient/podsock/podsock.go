// Package podsock makes the node proxy's sockets inside pods' network
// namespaces: the tunnel's listeners and upstream connections and the DNS
// proxy's listeners and forwarded queries all go through it, so every one
// carries the proxy mark and every connecting one is recorded as the
// proxy's own before it connects.
//
// A socket belongs to the network namespace it was created in for its
// whole life, whichever thread uses it later, so only socket(2) runs on a
// thread locked into the pod's namespace (a few microseconds); connect(2)
// and the wait for it happen on an ordinary goroutine, parked in the
// runtime's poller like any net.Dialer dial.
package podsock

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/bpf"
)

// OwnSockets records sockets as the node proxy's own in the kernel
// (bpf.Maps): the kernel path, its DNS capture and load balancing leave
// them alone. The kernel trusts this record, not the mark: a pod can set a
// mark, it cannot write that storage.
type OwnSockets interface {
	MarkProxySocket(fd uintptr) error
}

// InNetns runs fn on a thread inside the pod's network namespace
// (kernel.InNetns bound to the pod's namespace descriptor).
type InNetns func(fn func() error) error

// Control is a net.ListenConfig Control that sets the proxy mark
// (istio-cni's rules, when they coexist, leave the proxy's packets alone)
// and SO_REUSEPORT: a second daemon (an upgrade) binds the same ports
// beside us and the kernel spreads new connections and datagrams over both
// until we close.
func Control() func(string, string, syscall.RawConn) error {
	return func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, bpf.ProxyMark); serr != nil {
				serr = fmt.Errorf("SO_MARK: %w", serr)
				return
			}
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); serr != nil {
				serr = fmt.Errorf("SO_REUSEPORT: %w", serr)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}
}

// Socket creates a non-blocking socket (typ unix.SOCK_STREAM or
// unix.SOCK_DGRAM) inside the namespace in, with the proxy mark, recorded
// in own (when not nil), and hands it back as a pollable file (os.NewFile
// registers a non-blocking descriptor with the runtime's poller). A socket
// that cannot be recorded is closed and an error returned: connected
// unrecorded, the kernel would send the proxy's own connection back to
// the proxy.
func Socket(in InNetns, v6 bool, typ int, own OwnSockets) (*os.File, error) {
	family, name := unix.AF_INET, "tcp"
	if v6 {
		family = unix.AF_INET6
	}
	if typ == unix.SOCK_DGRAM {
		name = "udp"
	}
	fd := -1
	err := in(func() error {
		s, err := unix.Socket(family, typ|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
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
	if own != nil {
		if err := own.MarkProxySocket(uintptr(fd)); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("recording the socket as the proxy's own: %w", err)
		}
	}
	return os.NewFile(uintptr(fd), name), nil
}

// Sockaddr is dst as a connect(2) address (an IPv4-mapped address is
// connected as IPv4).
func Sockaddr(dst netip.AddrPort) unix.Sockaddr {
	a := dst.Addr().Unmap()
	if a.Is4() {
		return &unix.SockaddrInet4{Port: int(dst.Port()), Addr: a.As4()}
	}
	return &unix.SockaddrInet6{Port: int(dst.Port()), Addr: a.As16()}
}

// Connect runs a non-blocking connect(2) on f and waits for it in the
// runtime's poller, as net's own dialer does: writable means finished, then
// SO_ERROR says how. The deadline is the earlier of timeout and ctx's; ctx
// ending first interrupts the wait by moving the deadline into the past.
// Running out of time returns ErrDialTimeout; ctx ending returns its error.
// A datagram socket's connect completes at once.
func Connect(ctx context.Context, f *os.File, dst netip.AddrPort, timeout time.Duration) error {
	sa := Sockaddr(dst)
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
			return ErrDialTimeout
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

// ErrDialTimeout is what a dial that ran out of time returns: a net.Error
// whose Timeout() is true, as net.Dialer's is.
var ErrDialTimeout error = dialTimeoutError{}

type dialTimeoutError struct{}

func (dialTimeoutError) Error() string   { return "i/o timeout" }
func (dialTimeoutError) Timeout() bool   { return true }
func (dialTimeoutError) Temporary() bool { return true }
func (dialTimeoutError) Is(err error) bool {
	return err == os.ErrDeadlineExceeded || err == context.DeadlineExceeded
}
