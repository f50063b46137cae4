package tunnel

import (
	"net"

	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/ambient/holder"
)

// ListenerStore keeps the pods' listening sockets beyond the daemon's life
// (holder.Keeper, backed by the listener holder process): while it has a
// copy, a crash of the daemon does not close them, connections wait in
// their accept queues, and the next daemon claims the same sockets.
type ListenerStore = holder.Store

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
	si, err := holder.Inspect(f)
	if err == nil {
		err = holder.Check(si, unix.SOCK_STREAM, addrs, key.Netns)
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
