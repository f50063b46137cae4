package holder

import (
	"errors"
	"fmt"
	"net/netip"
	"os"

	"golang.org/x/sys/unix"
)

// Store keeps the pods' sockets beyond the daemon's life (*Keeper): the
// node proxy's listeners and the DNS proxy's sockets go through it.
type Store interface {
	// Claim returns the socket a previous daemon left under key, or nil.
	Claim(key Key) *os.File
	// Put keeps a duplicate of fd under key (replacing what key held).
	Put(key Key, fd uintptr) error
	Drop(key Key)
	DropPod(pod string)
}

// SockInfo is what the kernel says about a socket, for Check.
type SockInfo struct {
	Family, Type, Proto int
	Listening           bool
	Local               netip.AddrPort
	Netns               uint64
}

// Check decides whether a socket a previous daemon left is the pod's
// socket on one of addrs: of the wanted type (SOCK_STREAM: a listening
// TCP socket; SOCK_DGRAM: a UDP socket), bound to that address, inside the
// pod's network namespace (cookie). Anything else (a pod whose sandbox was
// recreated, a key reused for something else) is refused, and the caller
// opens a new socket instead.
func Check(si SockInfo, typ int, addrs []string, cookie uint64) error {
	switch typ {
	case unix.SOCK_STREAM:
		if si.Type != unix.SOCK_STREAM || si.Proto != unix.IPPROTO_TCP {
			return fmt.Errorf("not a TCP socket (type %d, protocol %d)", si.Type, si.Proto)
		}
		if !si.Listening {
			return errors.New("not listening")
		}
	case unix.SOCK_DGRAM:
		if si.Type != unix.SOCK_DGRAM || si.Proto != unix.IPPROTO_UDP {
			return fmt.Errorf("not a UDP socket (type %d, protocol %d)", si.Type, si.Proto)
		}
	default:
		return fmt.Errorf("socket type %d is never held", typ)
	}
	if si.Netns != cookie {
		return fmt.Errorf("in network namespace %d, the pod's is %d", si.Netns, cookie)
	}
	for _, a := range addrs {
		want, err := netip.ParseAddrPort(a)
		if err != nil {
			return err
		}
		fam := unix.AF_INET
		if want.Addr().Is6() {
			fam = unix.AF_INET6
		}
		if si.Family == fam && si.Local == want {
			return nil
		}
	}
	return fmt.Errorf("bound to %s (family %d), want one of %v", si.Local, si.Family, addrs)
}

// Inspect reads SockInfo from the kernel.
func Inspect(f *os.File) (SockInfo, error) {
	fd := int(f.Fd())
	var si SockInfo
	var err error
	get := func(opt int) int {
		if err != nil {
			return 0
		}
		var v int
		v, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, opt)
		return v
	}
	si.Family, si.Type, si.Proto = get(unix.SO_DOMAIN), get(unix.SO_TYPE), get(unix.SO_PROTOCOL)
	si.Listening = get(unix.SO_ACCEPTCONN) == 1
	if err != nil {
		return si, err
	}
	if si.Netns, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE); err != nil {
		return si, fmt.Errorf("SO_NETNS_COOKIE: %w", err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return si, err
	}
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		si.Local = netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		si.Local = netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port))
	}
	return si, nil
}
