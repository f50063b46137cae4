package tunnel

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"kmesh.dev/kmesh/kernel"
)

// InboundTable is where the proxy registers each pod's plaintext inbound
// listener (15006) under the pod's addresses, for the kernel's inbound
// enforcement to steer connections to (bpf.Maps; kmesh_inproxy). The
// kernel forgets a listener when its socket closes, so nothing is removed
// by hand: during an upgrade the successor's listener replaces ours, and
// our closing it then removes nothing of the successor's.
type InboundTable interface {
	SetInboundListener(addr netip.Addr, fd uintptr) error
}

// addrs returns the pod's own addresses: what its interfaces carry,
// loopback and link-local left out. They are what the pod owns per its
// enrolment, whatever the control plane says (or has not said yet).
func (n podNetns) addrs() ([]netip.Addr, error) {
	var out []netip.Addr
	err := kernel.InNetns(n.fd, func() error {
		as, err := net.InterfaceAddrs()
		if err != nil {
			return err
		}
		for _, a := range as {
			pfx, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			ip, ok := netip.AddrFromSlice(pfx.IP)
			if !ok {
				continue
			}
			ip = ip.Unmap()
			if ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsMulticast() || ip.IsUnspecified() {
				continue
			}
			out = append(out, ip)
		}
		return nil
	})
	return out, err
}

// steerInbound registers l (the pod's 15006 listener) for each of the pod's
// addresses.
func steerInbound(t InboundTable, l *net.TCPListener, addrs []netip.Addr) error {
	rc, err := l.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	cerr := rc.Control(func(fd uintptr) {
		for _, a := range addrs {
			if err := t.SetInboundListener(a, fd); err != nil {
				serr = fmt.Errorf("registering the inbound listener for %s: %w", a, err)
				return
			}
		}
	})
	if cerr != nil {
		return cerr
	}
	return serr
}

// isNotNATed reports whether SO_ORIGINAL_DST found no NAT record: the
// connection was not redirected by iptables.
func isNotNATed(err error) bool {
	return errors.Is(err, syscall.ENOENT)
}
