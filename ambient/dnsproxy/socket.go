package dnsproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/kernel"
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
		var u net.PacketConn
		var l net.Listener
		err := kernel.InNetns(int(netns.Fd()), func() error {
			lc := net.ListenConfig{Control: reuseMark}
			var err error
			if u, err = lc.ListenPacket(context.Background(), "udp", addr); err != nil {
				return err
			}
			lc.SetMultipathTCP(false)
			if l, err = lc.Listen(context.Background(), "tcp", addr); err != nil {
				u.Close()
				return err
			}
			return nil
		})
		if err != nil {
			if host == "::1" && isNoV6(err) {
				continue // a pod without IPv6 has no ::1
			}
			s.Close()
			return nil, fmt.Errorf("DNS listeners on %s inside the pod: %w", addr, err)
		}
		s.UDP = append(s.UDP, u.(*net.UDPConn))
		s.TCP = append(s.TCP, l.(*net.TCPListener))
	}
	return s, nil
}

func isNoV6(err error) bool {
	return errors.Is(err, unix.EADDRNOTAVAIL) || errors.Is(err, unix.EAFNOSUPPORT)
}

// reuseMark sets SO_REUSEPORT (an upgraded daemon listens beside us) and
// the proxy mark (istio-cni's rules leave the proxy's packets alone).
func reuseMark(_, _ string, rc syscall.RawConn) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); serr != nil {
			return
		}
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, bpf.ProxyMark)
	})
	if err != nil {
		return err
	}
	return serr
}
