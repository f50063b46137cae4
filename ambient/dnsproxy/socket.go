package dnsproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/ambient/podsock"
)

// Port is where the DNS server listens in each pod (ztunnel's 15053; the
// kernel's capture and istio-cni's rules send port 53 there).
const Port = 15053

// Sockets are one pod's DNS listeners, opened inside its network namespace.
type Sockets struct {
	UDP []*net.UDPConn
	TCP []*net.TCPListener
}

// Close closes every socket.
func (s *Sockets) Close() {
	for _, c := range s.UDP {
		c.Close()
	}
	for _, l := range s.TCP {
		l.Close()
	}
}

// OpenSockets opens the DNS listeners of the pod whose network namespace
// is netns: UDP and TCP on 127.0.0.1:port (required) and [::1]:port (when
// the pod has IPv6 loopback). They carry the proxy mark and SO_REUSEPORT,
// so a new daemon binds beside an old one during an upgrade (the kernel
// spreads queries over both until the old one closes). This is the only
// place the pod's DNS sockets are created: a holder that keeps listeners
// across a daemon crash opens them through it.
func OpenSockets(netns *os.File, port int) (*Sockets, error) {
	s := &Sockets{}
	for _, host := range []string{"127.0.0.1", "::1"} {
		addr := net.JoinHostPort(host, fmt.Sprint(port))
		u, l, err := openAt(netns, addr)
		if err != nil {
			if host == "::1" && isNoV6(err) {
				continue // a pod without IPv6 has no ::1
			}
			s.Close()
			return nil, fmt.Errorf("DNS listeners on %s inside the pod: %w", addr, err)
		}
		s.UDP = append(s.UDP, u)
		s.TCP = append(s.TCP, l)
	}
	return s, nil
}

// listenBoth opens addr's UDP socket and TCP listener (in the calling
// thread's namespace), marked and with SO_REUSEPORT.
func listenBoth(addr string) (*net.UDPConn, *net.TCPListener, error) {
	lc := net.ListenConfig{Control: podsock.Control()}
	u, err := lc.ListenPacket(context.Background(), "udp", addr)
	if err != nil {
		return nil, nil, err
	}
	lc.SetMultipathTCP(false)
	l, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		u.Close()
		return nil, nil, err
	}
	return u.(*net.UDPConn), l.(*net.TCPListener), nil
}

func isNoV6(err error) bool {
	return errors.Is(err, unix.EADDRNOTAVAIL) || errors.Is(err, unix.EAFNOSUPPORT)
}

// OwnSockets records sockets as the node proxy's own in the kernel
// (bpf.Maps): the kernel's DNS capture and load balancing leave them alone.
type OwnSockets = podsock.OwnSockets

// podDial dials from inside the pod (podsock: the socket is created there
// on a locked thread, carries the proxy mark and is recorded in own before
// it connects, so the pod's own DNS capture does not send it back to us).
// A TCP connect waits in the runtime's poller until ctx ends.
func podDial(inNetns func(func() error) error, own OwnSockets) Dial {
	return func(ctx context.Context, network string, dst netip.AddrPort) (net.Conn, error) {
		typ := unix.SOCK_DGRAM
		if network == "tcp" {
			typ = unix.SOCK_STREAM
		}
		// Not recorded, the socket would be captured back to us: Socket
		// refuses then.
		f, err := podsock.Socket(inNetns, dst.Addr().Unmap().Is6(), typ, own)
		if err != nil {
			return nil, err
		}
		defer f.Close() // net.FileConn keeps a duplicate
		if err := podsock.Connect(ctx, f, dst, 0); err != nil {
			return nil, &net.OpError{Op: "dial", Net: network, Addr: net.UDPAddrFromAddrPort(dst), Err: err}
		}
		return net.FileConn(f)
	}
}
