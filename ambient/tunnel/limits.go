package tunnel

import (
	"net/netip"
	"sync"
)

// Inbound HBONE connections the node accepts at once: per source address
// (over all pods of the node) and in total. Every peer holding a mesh
// certificate may be hostile, and each connection costs a socket, TLS
// state, buffers and two goroutines before it carries anything; a
// connection beyond either bound is reset as soon as it is accepted,
// before any TLS work, and counted in kmesh_tunnel_refused_total
// {direction="inbound", reason="peer_connection_limit" | "node_connection_limit"}.
//
// The defaults are far above what HBONE clients open: ztunnel and our own
// pool share one connection among up to 100 streams per source pod,
// identity and destination.
const (
	defaultMaxInboundPerPeer = 1024
	defaultMaxInbound        = 16384
	// Plaintext inbound (15006): since the kernel's inbound enforcement
	// sends connections from anything outside the mesh there, it is
	// bounded too, with room for clients that do not pool.
	defaultMaxPlainPerPeer = 4096
	defaultMaxPlain        = 32768

	reasonPeerConnLimit = "peer_connection_limit"
	reasonNodeConnLimit = "node_connection_limit"
)

// connLimits counts inbound connections by source address.
type connLimits struct {
	dir            string // the direction label of refusals
	perPeer, total int    // ≤ 0: unlimited

	mu     sync.Mutex
	n      int
	byPeer map[netip.Addr]int
}

func newConnLimits(dir string, perPeer, total int) *connLimits {
	return &connLimits{dir: dir, perPeer: perPeer, total: total, byPeer: map[netip.Addr]int{}}
}

// acquire counts a connection from peer, or returns why it is refused.
func (l *connLimits) acquire(peer netip.Addr) (refused string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.total > 0 && l.n >= l.total {
		return reasonNodeConnLimit
	}
	if l.perPeer > 0 && l.byPeer[peer] >= l.perPeer {
		return reasonPeerConnLimit
	}
	l.n++
	l.byPeer[peer]++
	return ""
}

// release forgets a connection acquire counted.
func (l *connLimits) release(peer netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.n--
	if l.byPeer[peer]--; l.byPeer[peer] <= 0 {
		delete(l.byPeer, peer)
	}
}
