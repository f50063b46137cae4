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
		p.mu.Lock()
		conns := p.conns[k]
		live := conns[:0]
		var pick *pooledConn
		for _, pc := range conns {
			if pc.cc.GoingAway() {
				if pc.active == 0 {
					pc.cc.Close()
					p.m.pooled.Dec()
					continue
				}
			} else if pick == nil && pc.active < int(p.cfg.MaxStreams) && pc.cc.Available(int(p.cfg.MaxStreams)) {
				pick = pc
			}
			live = append(live, pc)
		}
		p.conns[k] = live
		if pick != nil {
			pick.active++
			p.mu.Unlock()
			return pick, p.releaser(pick), nil
		}
		if wait, ok := p.dialing[k]; ok {
			p.mu.Unlock()
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
		d := &dialing{done: make(chan struct{})}
		p.dialing[k] = d
		p.mu.Unlock()

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
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, conns := range p.conns {
		live := conns[:0]
		for _, pc := range conns {
			if pc.active == 0 && (now.Sub(pc.lastUsed) > p.idle || pc.cc.GoingAway()) {
				pc.cc.Close()
				p.m.pooled.Dec()
				continue
			}
			live = append(live, pc)
		}
		if len(live) == 0 {
			delete(p.conns, k)
		} else {
			p.conns[k] = live
		}
	}
}

// dropPod closes the idle connections of a pod that left; busy ones get
// GOAWAY and stay in the pool, unusable (GoingAway), until reap closes
// them after their last stream.
func (p *pool) dropPod(uid string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, conns := range p.conns {
		if k.pod != uid {
			continue
		}
		busy := conns[:0]
		for _, pc := range conns {
			if pc.active == 0 {
				pc.cc.Close()
				p.m.pooled.Dec()
				continue
			}
			pc.cc.Shutdown()
			busy = append(busy, pc)
		}
		if len(busy) == 0 {
			delete(p.conns, k)
		} else {
			p.conns[k] = busy
		}
	}
}

func (p *pool) closeAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, conns := range p.conns {
		for _, pc := range conns {
			pc.cc.Close()
			p.m.pooled.Dec()
		}
		delete(p.conns, k)
	}
}
