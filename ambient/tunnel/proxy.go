// Package tunnel is the node proxy's user-space data path: the HBONE
// tunnel (HTTP/2 CONNECT over mutual TLS 1.3 on port 15008) that carries
// connections between nodes and to waypoints, exactly as ztunnel does, so
// Kmesh nodes interoperate with ztunnel nodes, sidecars and waypoints.
//
// Most connections never come here: the kernel path connects pods on one
// node directly. What needs mTLS (a mesh workload on another node, or
// anything behind a waypoint) is sent by the kernel to the proxy's
// outbound listener inside the pod (127.0.0.1:15001), with the original
// destination and the chosen backend recorded in kmesh_tunnel.
//
// Per enrolled pod, inside the pod's network namespace:
//
//	15001  outbound: take the kernel's record (or iptables' original
//	       destination), resolve the route, open (or reuse) an HBONE
//	       connection with the pod's certificate, CONNECT, copy.
//	15008  inbound HBONE: verify the peer chains to the mesh root and is in
//	       our trust domain, check the CONNECT targets this pod (400),
//	       authorize (401), dial the application (503), copy.
//	15006  inbound plaintext (redirected by istio-cni's rules when they
//	       coexist): the same checks without a peer identity.
//
// Every listener has SO_REUSEPORT and every socket the proxy mark, so a
// second daemon (an upgrade) binds beside this one and takes over.
package tunnel

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/ambient/hbone"
	"kmesh.dev/kmesh/ambient/holder"
	"kmesh.dev/kmesh/ambient/identity"
	"kmesh.dev/kmesh/ambient/podsock"
	"kmesh.dev/kmesh/ambient/telemetry"
	"kmesh.dev/kmesh/bpf"
)

// Certs is the identity manager as the proxy uses it.
type Certs interface {
	Certificate(ctx context.Context, id identity.Identity) (*identity.Certificate, error)
	Roots() *x509.CertPool
}

// TunnelTable is the kernel's record of tunnelled connections (bpf.Maps).
type TunnelTable interface {
	TakeTunnel(netnsCookie uint64, client netip.AddrPort) (bpf.TunnelOrig, bool, error)
}

// OwnSockets is the kernel's record of the node proxy's own sockets
// (bpf.Maps).
type OwnSockets = podsock.OwnSockets

// Config configures the node proxy.
type Config struct {
	// TrustDomain: inbound peers must belong to it.
	TrustDomain string
	// Network is the node's network (addresses are looked up within it).
	Network string
	Dir     Directory
	Certs   Certs
	// Tunnels is the kernel's record; nil: only iptables redirection
	// (SO_ORIGINAL_DST) tells where connections go.
	Tunnels TunnelTable
	// Picker decides connections the kernel did not see (iptables
	// redirection) from the kernel's records; nil refuses them.
	Picker Picker
	// Inbound receives each pod's 15006 listener, for the kernel's inbound
	// enforcement (sk_lookup) to steer plaintext connections to; nil: only
	// iptables redirection reaches 15006.
	Inbound InboundTable
	// OwnSockets records the sockets the proxy connects from inside a pod
	// as its own, so the kernel's connect programs leave them alone (a
	// pod cannot forge that record, unlike a socket mark). Required when
	// the kernel path is loaded: without it the proxy's own connections
	// would be redirected back to itself. nil: no kernel path.
	OwnSockets OwnSockets
	// Rand feeds the load balancer and the waypoint choice (default:
	// math/rand/v2); tests make it deterministic.
	Rand func() uint32
	// Ready is closed once the control plane's state is in (the first xDS
	// sync). Connections accepted before wait for it, up to ReadyTimeout
	// (10 s), instead of being decided on an empty state. nil: ready.
	Ready        <-chan struct{}
	ReadyTimeout time.Duration
	// DialTimeout bounds connecting to a peer or the application (5 s).
	DialTimeout time.Duration
	// IdleTimeout closes pooled HBONE connections without streams (60 s).
	IdleTimeout time.Duration
	// MaxHBONEConnsPerPeer and MaxHBONEConns bound the inbound HBONE
	// connections of the node at once, from one source address and in
	// total (1024 and 16384; negative: unlimited). Connections beyond are
	// reset at accept and counted (limits.go).
	MaxHBONEConnsPerPeer, MaxHBONEConns int

	Registerer prometheus.Registerer
	Log        *slog.Logger
	// Telemetry: Istio's TCP metrics, shared with the kernel path's
	// reporter (nil: the proxy's own, registered with Registerer).
	Telemetry *telemetry.Metrics
	// AccessLog logs each connection as it ends (nil: none).
	AccessLog *telemetry.AccessLog
	// ReportInterval: how often open connections report their bytes (5 s).
	ReportInterval time.Duration
	// Listeners keeps each pod's listening sockets beyond this daemon
	// (the listener holder): a crash then queues new connections for the
	// next daemon instead of refusing them, and a new daemon takes the
	// sockets a previous one left instead of opening new ones. nil: the
	// listeners die with the daemon.
	Listeners ListenerStore
	// Tracer makes a span per tunnelled connection (client outbound,
	// server inbound, continuing the peer's traceparent). nil: tracing is
	// off and costs nothing per connection.
	Tracer trace.Tracer
	// Splice: the kernel may splice the pods' in-pod legs (sockmap,
	// KMESH_SPLICE), so the plaintext relays read with read(2), which
	// sees redirected bytes, instead of splice(2), which does not.
	Splice bool
}

// Pod is an enrolled pod as the proxy sees it.
type Pod struct {
	// UID is the enrolment's id (ZDS uid).
	UID string
	// WorkloadUID is istiod's id for the pod's workload.
	WorkloadUID string
	Identity    identity.Identity
	// Netns is the pod's network namespace; the proxy keeps a duplicate.
	Netns *os.File
	// Addrs are the pod's own addresses (read from its namespace by
	// AddPod when empty): a CONNECT may only lead to one of them.
	Addrs []netip.Addr
	// Cookie is the namespace's cookie (the kernel's key).
	Cookie uint64
}

// Proxy is the node proxy: one per daemon, serving every enrolled pod.
type Proxy struct {
	cfg  Config
	log  *slog.Logger
	m    *metrics
	pool *pool
	// h2 is the inbound (server) HTTP/2 configuration; the pool has the
	// outbound one. They differ in where they count errors.
	h2      hbone.Config
	authz   *authzCache
	inbound *connLimits // inbound HBONE connections at once
	plain   *connLimits // inbound plaintext (15006) connections at once

	mu     sync.Mutex
	pods   map[string]*podProxy
	active map[*net.TCPConn]struct{}
	// draining: Close began (no new pods); closed: listeners are closed.
	draining, closed bool
	wg               sync.WaitGroup
	stop             chan struct{}
	// connCtx carries every proxied connection: a pod leaving the mesh
	// (or a daemon shutting down) stops new connections, not established
	// ones; it ends only when a drain runs out of time.
	connCtx    context.Context
	cancelConn context.CancelFunc

	// dialApp connects to the application behind an inbound tunnel, from
	// inside its pod (replaced by the fuzz test).
	dialApp func(ctx context.Context, pp *podProxy, target netip.AddrPort) (*net.TCPConn, error)
}

// podProxy is one pod's listeners. Its context ends with the pod's
// enrolment; connections already carried live on (see Proxy.connCtx).
type podProxy struct {
	pod       Pod
	ns        podNetns
	nsFile    *os.File
	listeners []net.Listener
	// keys name the listeners in Config.Listeners.
	keys      []holder.Key
	ctx       context.Context
	cancel    context.CancelFunc
	closeOnce sync.Once

	mu sync.Mutex
	// refs: one for the enrolment, one per connection or stream being
	// served. The namespace fd is closed with the last: a connection that
	// outlives the pod's enrolment may still dial inside it, and a closed
	// fd number can be reused for another pod's namespace.
	refs int
	// servers: inbound HBONE connections, told GOAWAY when the pod leaves
	// or the daemon drains, so peers move new streams elsewhere.
	servers map[*hbone.Conn]struct{}
}

// hold takes a reference on the pod's namespace; false once it is closed.
func (pp *podProxy) hold() bool {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	if pp.refs == 0 {
		return false
	}
	pp.refs++
	return true
}

func (pp *podProxy) release() {
	pp.mu.Lock()
	pp.refs--
	last := pp.refs == 0
	pp.mu.Unlock()
	if last && pp.nsFile != nil {
		pp.nsFile.Close()
	}
}

func (pp *podProxy) addServer(c *hbone.Conn) {
	pp.mu.Lock()
	if pp.servers == nil {
		pp.servers = map[*hbone.Conn]struct{}{}
	}
	pp.servers[c] = struct{}{}
	pp.mu.Unlock()
}

func (pp *podProxy) removeServer(c *hbone.Conn) {
	pp.mu.Lock()
	delete(pp.servers, c)
	pp.mu.Unlock()
}

// goAway sends GOAWAY on every inbound HBONE connection: streams in
// flight finish, new ones go to a new connection (the next daemon's
// listener during an upgrade). Each connection closes with its last stream.
func (pp *podProxy) goAway() {
	pp.mu.Lock()
	cs := make([]*hbone.Conn, 0, len(pp.servers))
	for c := range pp.servers {
		cs = append(cs, c)
	}
	pp.mu.Unlock()
	for _, c := range cs {
		c.Shutdown()
	}
}

// New creates the node proxy; pods are added as they are enrolled.
func New(cfg Config) (*Proxy, error) {
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	if cfg.IdleTimeout == 0 {
		cfg.IdleTimeout = 60 * time.Second
	}
	if cfg.TrustDomain == "" {
		cfg.TrustDomain = defaultTrustDomain
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Uint32
	}
	if cfg.ReadyTimeout == 0 {
		cfg.ReadyTimeout = 10 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxHBONEConnsPerPeer == 0 {
		cfg.MaxHBONEConnsPerPeer = defaultMaxInboundPerPeer
	}
	if cfg.MaxHBONEConns == 0 {
		cfg.MaxHBONEConns = defaultMaxInbound
	}
	// ztunnel's settings; a pooled connection carries at most MaxStreams
	// streams, which is also what the server side advertises. hbone's
	// limits on what a peer may cost (handlers, resets, control frames,
	// windows, keepalive, write and idle timeouts) are its defaults.
	m := newMetrics(cfg.Registerer, cfg.Telemetry, cfg.AccessLog, cfg.ReportInterval)
	in, out := hbone.Config{CountError: m.countHBONE("inbound")}, hbone.Config{CountError: m.countHBONE("outbound")}
	p := &Proxy{
		cfg: cfg, log: cfg.Log.With("component", "tunnel"), m: m,
		pool:    newPool(out, m, cfg.IdleTimeout),
		h2:      in.WithDefaults(),
		authz:   newAuthzCache(),
		inbound: newConnLimits("inbound", cfg.MaxHBONEConnsPerPeer, cfg.MaxHBONEConns),
		plain:   newConnLimits("inbound_plaintext", defaultMaxPlainPerPeer, defaultMaxPlain),
		pods:    map[string]*podProxy{},
		active:  map[*net.TCPConn]struct{}{},
		stop:    make(chan struct{}),
	}
	p.connCtx, p.cancelConn = context.WithCancel(context.Background())
	p.dialApp = func(ctx context.Context, pp *podProxy, target netip.AddrPort) (*net.TCPConn, error) {
		return pp.ns.dial(ctx, target, p.cfg.DialTimeout)
	}
	p.wg.Add(1)
	go p.reaper()
	return p, nil
}

func (p *Proxy) reaper() {
	defer p.wg.Done()
	t := time.NewTicker(p.cfg.IdleTimeout / 4)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case now := <-t.C:
			p.pool.reap(now)
		}
	}
}

// AddPod opens the pod's listeners inside its network namespace. Adding a
// pod again (a new enrolment of the same pod) replaces its listeners.
func (p *Proxy) AddPod(pod Pod) error {
	fd, err := unix.FcntlInt(pod.Netns.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("pod %s: duplicating its namespace: %w", pod.UID, err)
	}
	pp := &podProxy{pod: pod, ns: podNetns{fd: fd, own: p.cfg.OwnSockets}, nsFile: os.NewFile(uintptr(fd), "netns:"+pod.UID), refs: 1}
	pp.ctx, pp.cancel = context.WithCancel(context.Background())
	fail := func(err error) error {
		// What was given to the holder goes too: a held socket nobody
		// accepts from would queue the pod's connections for nothing.
		p.dropKeys(pp.keys, nil)
		pp.close()
		return fmt.Errorf("pod %s: %w", pod.UID, err)
	}
	if err := pp.ns.migrateRequests(); err != nil {
		p.log.Debug("tcp_migrate_req not set: an upgrade may reset connections still in the accept queue", "pod", pod.UID, "err", err)
	}
	if len(pp.pod.Addrs) == 0 {
		addrs, err := pp.ns.addrs()
		if err != nil {
			return fail(fmt.Errorf("reading the pod's addresses: %w", err))
		}
		pp.pod.Addrs = addrs
	}
	type spec struct {
		name     string // the listener's name in Config.Listeners
		addrs    []string
		required bool
		serve    func(*podProxy, *net.TCPConn)
		inbound  bool // the kernel's inbound enforcement steers here
		limits   *connLimits
	}
	for _, s := range []spec{
		{"15001/v4", []string{"127.0.0.1:15001"}, true, p.serveOutbound, false, nil},
		{"15001/v6", []string{"[::1]:15001"}, false, p.serveOutbound, false, nil}, // pods without IPv6 have no ::1
		{"15008", []string{"[::]:15008", "0.0.0.0:15008"}, true, p.serveHBONE, false, p.inbound},
		{"15006", []string{"[::]:15006", "0.0.0.0:15006"}, true, p.servePlain, true, p.plain},
	} {
		key := holder.Key{Pod: pod.UID, Netns: pod.Cookie, Name: s.name}
		store := p.cfg.Listeners != nil && pod.Cookie != 0
		var l *net.TCPListener
		if store {
			l = p.heldListener(key, s.addrs)
		}
		how := "reused"
		if l == nil {
			how = "opened"
			var lerr error
			for _, a := range s.addrs {
				if l, lerr = pp.ns.listen(a); lerr == nil {
					break
				}
			}
			if lerr != nil {
				if s.required {
					return fail(fmt.Errorf("listening on %s inside the pod: %w", s.addrs[0], lerr))
				}
				continue
			}
		}
		p.m.listeners.WithLabelValues(how).Inc()
		pp.listeners = append(pp.listeners, l)
		if store {
			// Also for a reused one: the store's copy of everything this
			// daemon listens on is what a restarted holder gets again.
			if err := listenerFD(l, func(fd uintptr) error { return p.cfg.Listeners.Put(key, fd) }); err != nil {
				p.log.Warn("listener not given to the holder: it will not outlive the daemon", "key", key.String(), "err", err)
			} else {
				pp.keys = append(pp.keys, key)
			}
		}
		if s.inbound && p.cfg.Inbound != nil {
			if err := steerInbound(p.cfg.Inbound, l, pp.pod.Addrs); err != nil {
				return fail(err)
			}
		}
		p.wg.Add(1)
		go p.acceptLoop(pp, l, s.serve, s.limits)
	}
	p.mu.Lock()
	if p.draining {
		p.mu.Unlock()
		pp.close()
		return errors.New("proxy closed")
	}
	old := p.pods[pod.UID]
	p.pods[pod.UID] = pp
	p.mu.Unlock()
	if old != nil {
		p.dropKeys(old.keys, pp.keys) // a recreated sandbox: the old namespace's
		old.close()
	}
	p.log.Info("pod listeners open", "pod", pod.UID, "identity", pod.Identity.String(), "held", len(pp.keys))
	return nil
}

// RemovePod closes the pod's listeners. Connections it has open continue
// (the pod left the mesh; what it already had keeps working, as on the
// kernel path) until they end. It does not wait for the network (it runs
// on the goroutine that enrols every pod of the node): the GOAWAYs it
// sends are queued, and a peer that stopped reading is cut off by the
// HTTP/2 write timeout.
func (p *Proxy) RemovePod(uid string) {
	p.mu.Lock()
	pp := p.pods[uid]
	delete(p.pods, uid)
	p.mu.Unlock()
	if pp != nil {
		if p.cfg.Listeners != nil {
			p.cfg.Listeners.DropPod(uid)
		}
		pp.close()
		p.pool.dropPod(uid)
		p.authz.forget(pp.pod.WorkloadUID)
	}
}

// dropKeys has the store forget keys, except those in keep (the same
// listener names of a replacing enrolment, already put again).
func (p *Proxy) dropKeys(keys, keep []holder.Key) {
	if p.cfg.Listeners == nil {
		return
	}
	for _, k := range keys {
		if !slices.Contains(keep, k) {
			p.cfg.Listeners.Drop(k)
		}
	}
}

// close ends the pod's enrolment in the proxy: listeners closed, GOAWAY
// to inbound peers, the namespace released (closed after the last
// connection still using it).
func (pp *podProxy) close() {
	pp.closeOnce.Do(func() {
		for _, l := range pp.listeners {
			l.Close()
		}
		pp.cancel()
		pp.goAway()
		pp.release()
	})
}

// acceptLoop serves the connections of one listener; limits (when set)
// bounds them per source address and in total.
func (p *Proxy) acceptLoop(pp *podProxy, l *net.TCPListener, serve func(*podProxy, *net.TCPConn), limits *connLimits) {
	defer p.wg.Done()
	for {
		c, err := l.AcceptTCP()
		if err != nil {
			if isClosed(err) {
				return
			}
			p.log.Warn("accept failed", "pod", pp.pod.UID, "addr", l.Addr().String(), "err", err)
			time.Sleep(10 * time.Millisecond) // EMFILE and friends: do not spin
			continue
		}
		release := func() {}
		if limits != nil {
			peer := addrPortOf(c.RemoteAddr()).Addr()
			if reason := limits.acquire(peer); reason != "" {
				p.m.refused.WithLabelValues(limits.dir, reason).Inc()
				p.log.Debug("inbound connection over the limit: reset", "pod", pp.pod.UID, "peer", peer.String(), "reason", reason)
				_ = c.SetLinger(0)
				c.Close()
				continue
			}
			release = func() { limits.release(peer) }
		}
		armReset(c)
		if !p.track(c) {
			release()
			c.Close()
			return
		}
		if !pp.hold() {
			release()
			p.untrack(c)
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			defer release()
			defer pp.release()
			defer p.untrack(c)
			if !p.waitReady(pp, c) {
				return
			}
			serve(pp, c)
		}()
	}
}

// waitReady holds a connection accepted before the daemon has the
// control plane's state (a new daemon during an upgrade, binding beside the
// old one): deciding it now would refuse what the state will allow. It
// waits up to ReadyTimeout, then resets the connection, counted.
func (p *Proxy) waitReady(pp *podProxy, c *net.TCPConn) bool {
	if p.cfg.Ready == nil {
		return true
	}
	select {
	case <-p.cfg.Ready:
		return true
	default:
	}
	t := time.NewTimer(p.cfg.ReadyTimeout)
	defer t.Stop()
	select {
	case <-p.cfg.Ready:
		return true
	case <-t.C:
	case <-p.connCtx.Done():
	}
	p.m.refused.WithLabelValues("any", "not_ready").Inc()
	p.log.Warn("connection reset: no control-plane state yet", "pod", pp.pod.UID, "waited", p.cfg.ReadyTimeout.String())
	_ = c.SetLinger(0)
	return false
}

func (p *Proxy) isClosed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closed
}

func (p *Proxy) track(c *net.TCPConn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.active[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c *net.TCPConn) {
	p.mu.Lock()
	delete(p.active, c)
	p.mu.Unlock()
	c.Close()
}

// Close hands over and drains: it keeps accepting for handover (the next
// daemon of an upgrade starts meanwhile and listens beside this one, so no
// new connection is refused), then stops accepting (connections waiting in
// the accept queue migrate to the other listener), lets connections in
// flight finish until ctx ends, and closes what is left. It returns soon
// after ctx ends whatever the peers do: GOAWAYs are queued, not waited
// for, and what is still open at the deadline is closed under them.
func (p *Proxy) Close(ctx context.Context, handover time.Duration) {
	defer p.m.live.Stop()
	p.mu.Lock()
	if p.draining {
		p.mu.Unlock()
		return
	}
	p.draining = true
	pods := p.pods
	p.mu.Unlock()
	if handover > 0 {
		select {
		case <-time.After(handover):
		case <-ctx.Done():
		}
	}
	p.mu.Lock()
	p.closed = true
	pods = p.pods
	p.pods = map[string]*podProxy{}
	p.mu.Unlock()
	for _, pp := range pods {
		for _, l := range pp.listeners {
			l.Close()
		}
		pp.goAway()
	}
	close(p.stop)
	done := make(chan struct{})
	go func() { p.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		p.cancelConn()
		p.mu.Lock()
		for c := range p.active {
			_ = c.SetLinger(0)
			c.Close()
		}
		p.mu.Unlock()
		p.pool.closeAll()
		// Every goroutine notices within moments; one that does not (a
		// plaintext leg whose far end neither reads nor closes) is left
		// behind rather than holding up the daemon's exit.
		select {
		case <-done:
		case <-time.After(closeGrace):
			p.log.Warn("drain deadline passed: connections left behind", "grace", closeGrace.String())
		}
	}
	p.cancelConn()
	p.pool.closeAll()
	for _, pp := range pods {
		pp.close()
	}
}

// serverTLS is the inbound HBONE TLS configuration of one pod: its own
// certificate, TLS 1.3, h2, and a client certificate that chains to the
// mesh roots within our trust domain.
func (p *Proxy) serverTLS(pp *podProxy, peer *identity.Identity, why *string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{alpnH2},
		// Requested, not required: VerifyPeerCertificate then also sees a
		// peer without one, and the refusal is counted with its reason.
		ClientAuth: tls.RequestClientCert,
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			c, err := p.cfg.Certs.Certificate(hello.Context(), pp.pod.Identity)
			if err != nil {
				*why = reasonHandshake
				return nil, fmt.Errorf("no certificate for %s yet: %w", pp.pod.Identity, err)
			}
			return &c.TLS, nil
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			id, r := verifyPeer(raw, p.cfg.Certs.Roots(), nil, p.cfg.TrustDomain)
			if r != nil {
				*why = r.reason
				return r
			}
			*peer = id
			return nil
		},
	}
}

func (p *Proxy) rand() uint32 { return p.cfg.Rand() }

// closeGrace is how long Close waits, after the drain deadline closed
// what was open, for the goroutines serving it to notice.
const closeGrace = time.Second
