package kernel

import (
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TCPBytes is one TCP socket's byte counts, as tcp_info reports them.
type TCPBytes struct {
	// Acked: bytes the socket sent that its peer acknowledged; Received:
	// bytes it received (the same counters sockops reads).
	Acked, Received uint64
	// State is the socket's TCP state (TCP_ESTABLISHED = 1 ...).
	State uint8
}

// TCPSocketBytes dumps the TCP sockets of the network namespace open at
// nsFd (sock_diag with tcp_info), by socket cookie. One dump costs in
// proportion to the namespace's sockets, not to their traffic: it is how
// long-lived kernel-path connections report bytes without any per-packet
// hook.
func TCPSocketBytes(nsFd int) (map[uint64]TCPBytes, error) {
	out := map[uint64]TCPBytes{}
	err := InNetns(nsFd, func() error {
		for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
			socks, err := netlink.SocketDiagTCPInfo(family)
			if err != nil {
				return fmt.Errorf("sock_diag (family %d): %w", family, err)
			}
			for _, s := range socks {
				if s.InetDiagMsg == nil || s.TCPInfo == nil {
					continue
				}
				c := uint64(s.InetDiagMsg.ID.Cookie[0]) | uint64(s.InetDiagMsg.ID.Cookie[1])<<32
				out[c] = TCPBytes{Acked: s.TCPInfo.Bytes_acked, Received: s.TCPInfo.Bytes_received, State: s.InetDiagMsg.State}
			}
		}
		return nil
	})
	return out, err
}
