package tunnel

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/ambient/holder"
)

// ListenerStore keeps the pods' listening sockets beyond the daemon's life
// (holder.Keeper, backed by the listener holder process): while it has a
// copy, a crash of the daemon does not close them, connections wait in
// their accept queues, and the next daemon claims the same sockets.
type ListenerStore interface {
	// Claim returns the socket a previous daemon left under key, or nil.
	Claim(key holder.Key) *os.File
	// Put keeps a duplicate of fd under key (replacing what key held).
	Put(key holder.Key, fd uintptr) error
	Drop(key holder.Key)
	DropPod(pod string)
}

// sockInfo is what the kernel says about a socket, for checkHeld.
type sockInfo struct {
	family, typ, proto int
	listening          bool
	local              netip.AddrPort
	netns              uint64
}

// checkHeld decides whether a socket a previous daemon left is the pod's
// listener on one of addrs: a TCP listening socket bound to that address,
// inside the pod's network namespace (cookie). Anything else (a pod whose
// sandbox was recreated, a key reused for something else) is refused and
// a new listener opened instead.
func checkHeld(si sockInfo, addrs []string, cookie uint64) error {
	if si.typ != unix.SOCK_STREAM || si.proto != unix.IPPROTO_TCP {
		return fmt.Errorf("not a TCP socket (type %d, protocol %d)", si.typ, si.proto)
	}
	if !si.listening {
		return errors.New("not listening")
	}
	if si.netns != cookie {
		return fmt.Errorf("in network namespace %d, the pod's is %d", si.netns, cookie)
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
		if si.family == fam && si.local == want {
			return nil
		}
	}
	return fmt.Errorf("bound to %s (family %d), want one of %v", si.local, si.family, addrs)
}

// inspect reads sockInfo from the kernel.
func inspect(f *os.File) (sockInfo, error) {
	fd := int(f.Fd())
	var si sockInfo
	var err error
	get := func(opt int) int {
		if err != nil {
			return 0
		}
		var v int
		v, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, opt)
		return v
	}
	si.family, si.typ, si.proto = get(unix.SO_DOMAIN), get(unix.SO_TYPE), get(unix.SO_PROTOCOL)
	si.listening = get(unix.SO_ACCEPTCONN) == 1
	if err != nil {
		return si, err
	}
	if si.netns, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE); err != nil {
		return si, fmt.Errorf("SO_NETNS_COOKIE: %w", err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return si, err
	}
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		si.local = netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		si.local = netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port))
	}
	return si, nil
}

// heldListener takes the listener a previous daemon left under key, if
// there is one and it is the pod's; nil otherwise (a refused one is
// counted and logged, and a new listener replaces it in the store).
func (p *Proxy) heldListener(key holder.Key, addrs []string) *net.TCPListener {
	if p.cfg.Listeners == nil {
		return nil
	}
	f := p.cfg.Listeners.Claim(key)
	if f == nil {
		return nil
	}
	defer f.Close() // FileListener keeps a duplicate
	si, err := inspect(f)
	if err == nil {
		err = checkHeld(si, addrs, key.Netns)
	}
	if err == nil {
		var l net.Listener
		if l, err = net.FileListener(f); err == nil {
			return l.(*net.TCPListener)
		}
	}
	p.m.listeners.WithLabelValues("refused").Inc()
	p.log.Warn("held listener refused: opening a new one", "key", key.String(), "err", err)
	return nil
}

// listenerFD is l's descriptor, for the store to duplicate.
func listenerFD(l *net.TCPListener, f func(fd uintptr) error) error {
	rc, err := l.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = f(fd) }); err != nil {
		return err
	}
	return ferr
}
