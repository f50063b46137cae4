package tunnel

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"time"

	"kmesh.dev/kmesh/ambient/hbone"
	"kmesh.dev/kmesh/ambient/identity"
)

// poolKey: connections are shared only between streams with the same
// source pod (its IP is the TCP source the peer authorizes), the same
// identities at both ends and the same peer address.
type poolKey struct {
	pod      string
	src, dst identity.Identity
	addr     netip.AddrPort
}

type pooledConn struct {
	cc       *hbone.Conn
	active   int
	lastUsed time.Time
}

// pool holds outbound HBONE connections. A new stream takes the first
// connection with room (fewer than cfg.MaxStreams streams); while one
// connection to a key is being dialled, other callers wait for it instead
// of racing to open their own.
//
// The pool's lock guards its maps only: nothing that touches the network
// (dialling, the TLS handshake, the HTTP/2 preface, GOAWAY, closing a
// connection) happens while it is held, so a peer that hangs holds up the
// callers that want a connection to that peer, bounded by the dial and
// handshake timeouts, and nobody else.
type pool struct {
	cfg     hbone.Config
	m       *metrics
	idle    time.Duration
	mu      sync.Mutex
	conns   map[poolKey][]*pooledConn
	dialing map[poolKey]*dialing
}

// dialing is a connection being opened; err is set before done closes.
// Callers that queued behind a failed dial share its error rather than
// each dialling in turn (N callers to a dead peer would take N timeouts).
type dialing struct {
	done chan struct{}
	err  error
}

func newPool(cfg hbone.Config, m *metrics, idle time.Duration) *pool {
	return &pool{cfg: cfg.WithDefaults(), m: m, idle: idle, conns: map[poolKey][]*pooledConn{}, dialing: map[poolKey]*dialing{}}
}

// get returns a connection with a stream reserved on it, and the function
// that gives the stream back.
func (p *pool) get(ctx context.Context, k poolKey, dial func(context.Context) (net.Conn, error)) (*pooledConn, func(), error) {
	for {
		var dead []*pooledConn
		p.mu.Lock()
		conns := p.conns[k]
		live := conns[:0]
		var pick *pooledConn
		for _, pc := range conns {
			if pc.cc.GoingAway() {
				if pc.active == 0 {
					dead = append(dead, pc)
					continue
				}
			} else if pick == nil && pc.active < int(p.cfg.MaxStreams) && pc.cc.Available(int(p.cfg.MaxStreams)) {
				pick = pc
			}
			live = append(live, pc)
		}
		clear(conns[len(live):])
		p.conns[k] = live
		if pick != nil {
			pick.active++
		}
		wait, waiting := p.dialing[k]
		var d *dialing
		if pick == nil && !waiting {
			d = &dialing{done: make(chan struct{})}
			p.dialing[k] = d
		}
		p.mu.Unlock()
		p.close(dead)
		if pick != nil {
			return pick, p.releaser(pick), nil
		}
		if waiting {
			select {
			case <-wait.done:
				if wait.err != nil {
					return nil, nil, wait.err
				}
				continue
			case <-ctx.Done():
				return nil, nil, ctx.Err()
			}
		}

		c, err := dial(ctx)
		var cc *hbone.Conn
		if err == nil {
			cc, err = hbone.Client(c, p.cfg)
		}
		p.mu.Lock()
		delete(p.dialing, k)
		d.err = err
		close(d.done)
		if err != nil {
			p.mu.Unlock()
			return nil, nil, err
		}
		pc := &pooledConn{cc: cc, active: 1}
		p.conns[k] = append(p.conns[k], pc)
		p.m.pooled.Inc()
		p.mu.Unlock()
		return pc, p.releaser(pc), nil
	}
}

// close closes connections taken out of the pool (without its lock:
// closing does not wait for the network, but nothing that could is done
// under the lock).
func (p *pool) close(conns []*pooledConn) {
	for _, pc := range conns {
		pc.cc.Close()
		p.m.pooled.Dec()
	}
}

func (p *pool) releaser(pc *pooledConn) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			p.mu.Lock()
			pc.active--
			pc.lastUsed = time.Now()
			p.mu.Unlock()
		})
	}
}

// reap closes connections idle for longer than the idle timeout, and dead ones.
func (p *pool) reap(now time.Time) {
	var dead []*pooledConn
	p.mu.Lock()
	for k, conns := range p.conns {
		live := conns[:0]
		for _, pc := range conns {
			if pc.active == 0 && (now.Sub(pc.lastUsed) > p.idle || pc.cc.GoingAway()) {
				dead = append(dead, pc)
				continue
			}
			live = append(live, pc)
		}
		clear(conns[len(live):])
		if len(live) == 0 {
			delete(p.conns, k)
		} else {
			p.conns[k] = live
		}
	}
	p.mu.Unlock()
	p.close(dead)
}

// dropPod closes the idle connections of a pod that left; busy ones get
// GOAWAY and stay in the pool, unusable (GoingAway), until reap closes
// them after their last stream. Neither waits for the network: a peer
// that stopped reading does not hold up the pod's removal.
func (p *pool) dropPod(uid string) {
	var idle, busy []*pooledConn
	p.mu.Lock()
	for k, conns := range p.conns {
		if k.pod != uid {
			continue
		}
		kept := conns[:0]
		for _, pc := range conns {
			if pc.active == 0 {
				idle = append(idle, pc)
				continue
			}
			busy = append(busy, pc)
			kept = append(kept, pc)
		}
		clear(conns[len(kept):])
		if len(kept) == 0 {
			delete(p.conns, k)
		} else {
			p.conns[k] = kept
		}
	}
	p.mu.Unlock()
	p.close(idle)
	for _, pc := range busy {
		pc.cc.Shutdown()
	}
}

func (p *pool) closeAll() {
	var all []*pooledConn
	p.mu.Lock()
	for k, conns := range p.conns {
		all = append(all, conns...)
		delete(p.conns, k)
	}
	p.mu.Unlock()
	p.close(all)
}
