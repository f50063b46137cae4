package dnsproxy

import (
	"fmt"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/ambient/holder"
	"kmesh.dev/kmesh/kernel"
)

// ListenerStore keeps the pods' sockets beyond the daemon's life (the
// listener holder), so that questions asked while no daemon runs wait in
// the sockets' buffers and are answered by the next one.
type ListenerStore = holder.Store

// SetListeners sets Config.Listeners before the first pod is added (a
// nil-able store cannot be put in Config as an interface without the
// nil-interface trap: the agent's holder is a *holder.Keeper that may be
// nil).
func (s *Server) SetListeners(st ListenerStore) { s.cfg.Listeners = st }

// socketKey names one of a pod's DNS sockets in the store.
func socketKey(p Pod, proto, host string) holder.Key {
	fam := "v4"
	if host == "::1" {
		fam = "v6"
	}
	return holder.Key{Pod: p.UID, Netns: p.Cookie, Name: fmt.Sprintf("%d/%s/%s", Port, proto, fam)}
}

// claimSockets takes the pod's DNS sockets a previous daemon left in the
// store, for each address where both (UDP and TCP) are there and are the
// pod's (holder.Check); the rest are opened anew. Every socket is then put
// (again) to the store. It returns the sockets and the keys put.
func (s *Server) claimSockets(p Pod) (*Sockets, []holder.Key, error) {
	st := s.cfg.Listeners
	if st == nil || p.Cookie == 0 {
		socks, err := OpenSockets(p.Netns, s.cfg.Port)
		return socks, nil, err
	}
	socks := &Sockets{}
	var keys []holder.Key
	for _, host := range []string{"127.0.0.1", "::1"} {
		addr := net.JoinHostPort(host, fmt.Sprint(s.cfg.Port))
		uk, tk := socketKey(p, "udp", host), socketKey(p, "tcp", host)
		u := s.heldUDP(st.Claim(uk), uk, addr)
		l := s.heldTCP(st.Claim(tk), tk, addr)
		if u == nil || l == nil {
			if u != nil {
				u.Close()
			}
			if l != nil {
				l.Close()
			}
			var err error
			u, l, err = openAt(p.Netns, addr)
			if err != nil {
				if host == "::1" && isNoV6(err) {
					continue
				}
				socks.Close()
				return nil, nil, fmt.Errorf("DNS listeners on %s inside the pod: %w", addr, err)
			}
			s.cfg.Metrics.listener("opened")
		} else {
			s.cfg.Metrics.listener("reused")
		}
		socks.UDP = append(socks.UDP, u)
		socks.TCP = append(socks.TCP, l)
		for _, kc := range []struct {
			key holder.Key
			rc  syscall.Conn
		}{{uk, u}, {tk, l}} {
			if err := putConn(st, kc.key, kc.rc); err != nil {
				s.log.Warn("DNS socket not given to the holder: it will not outlive the daemon", "key", kc.key.String(), "err", err)
				continue
			}
			keys = append(keys, kc.key)
		}
	}
	return socks, keys, nil
}

func putConn(st ListenerStore, key holder.Key, c syscall.Conn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var perr error
	if err := rc.Control(func(fd uintptr) { perr = st.Put(key, fd) }); err != nil {
		return err
	}
	return perr
}

func (s *Server) heldUDP(f *os.File, key holder.Key, addr string) *net.UDPConn {
	if f == nil {
		return nil
	}
	defer f.Close() // FilePacketConn keeps a duplicate
	si, err := holder.Inspect(f)
	if err == nil {
		err = holder.Check(si, unix.SOCK_DGRAM, []string{addr}, key.Netns)
	}
	if err == nil {
		var c net.PacketConn
		if c, err = net.FilePacketConn(f); err == nil {
			return c.(*net.UDPConn)
		}
	}
	s.cfg.Metrics.listener("refused")
	s.log.Warn("held DNS socket refused: opening a new one", "key", key.String(), "err", err)
	return nil
}

func (s *Server) heldTCP(f *os.File, key holder.Key, addr string) *net.TCPListener {
	if f == nil {
		return nil
	}
	defer f.Close()
	si, err := holder.Inspect(f)
	if err == nil {
		err = holder.Check(si, unix.SOCK_STREAM, []string{addr}, key.Netns)
	}
	if err == nil {
		var l net.Listener
		if l, err = net.FileListener(f); err == nil {
			return l.(*net.TCPListener)
		}
	}
	s.cfg.Metrics.listener("refused")
	s.log.Warn("held DNS socket refused: opening a new one", "key", key.String(), "err", err)
	return nil
}

// openAt opens one address's UDP socket and TCP listener inside the pod.
func openAt(netns *os.File, addr string) (*net.UDPConn, *net.TCPListener, error) {
	var u *net.UDPConn
	var l *net.TCPListener
	err := kernel.InNetns(int(netns.Fd()), func() error {
		uc, tl, err := listenBoth(addr)
		u, l = uc, tl
		return err
	})
	return u, l, err
}
