package tunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/ambient/podsock"
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

func (n podNetns) listen(addr string) (*net.TCPListener, error) {
	var l net.Listener
	err := kernel.InNetns(n.fd, func() (err error) {
		lc := net.ListenConfig{Control: podsock.Control()}
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
// connection is being made (podsock: only socket(2) runs in the pod's
// namespace; the connect waits, up to timeout or until ctx ends, in the
// runtime's poller). The connection gets what net.Dialer would give it:
// TCP_NODELAY and Go's default keep-alive (net.FileConn), plus the proxy
// mark, and it is recorded as the proxy's own.
func (n podNetns) dial(ctx context.Context, dst netip.AddrPort, timeout time.Duration) (*net.TCPConn, error) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if !dst.IsValid() {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("invalid address")}
	}
	f, err := podsock.Socket(n.inNetns, dst.Addr().Is6(), unix.SOCK_STREAM, n.own)
	if err != nil {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(dst), Err: err}
	}
	defer f.Close() // net.FileConn keeps a duplicate
	if err := podsock.Connect(ctx, f, dst, timeout); err != nil {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(dst), Err: err}
	}
	c, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// inNetns runs fn on a thread inside the pod's network namespace.
func (n podNetns) inNetns(fn func() error) error { return kernel.InNetns(n.fd, fn) }

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
