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
// connection with room (fewer than maxStreams streams); while one
// connection to a key is being dialled, other callers wait for it instead
// of racing to open their own.
type pool struct {
	cfg     hbone.Config
	m       *metrics
	idle    time.Duration
	mu      sync.Mutex
	conns   map[poolKey][]*pooledConn
	dialing map[poolKey]chan struct{}
}

func newPool(cfg hbone.Config, m *metrics, idle time.Duration) *pool {
	return &pool{cfg: cfg, m: m, idle: idle, conns: map[poolKey][]*pooledConn{}, dialing: map[poolKey]chan struct{}{}}
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
			} else if pick == nil && pc.active < maxStreams && pc.cc.Available(maxStreams) {
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
			case <-wait:
				continue
			case <-ctx.Done():
				return nil, nil, ctx.Err()
			}
		}
		done := make(chan struct{})
		p.dialing[k] = done
		p.mu.Unlock()

		c, err := dial(ctx)
		var cc *hbone.Conn
		if err == nil {
			cc, err = hbone.Client(c, p.cfg)
		}
		p.mu.Lock()
		delete(p.dialing, k)
		close(done)
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

// dropPod closes the idle connections of a pod that left; busy ones end
// with their streams.
func (p *pool) dropPod(uid string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, conns := range p.conns {
		if k.pod != uid {
			continue
		}
		for _, pc := range conns {
			if pc.active == 0 {
				pc.cc.Close()
			} else {
				pc.cc.Shutdown() // graceful: GOAWAY after the streams
			}
			p.m.pooled.Dec()
		}
		delete(p.conns, k)
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
