package telemetry

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"kmesh.dev/kmesh/ambient/identity"
	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/kernel"
)

// Directory is the control plane's state, as the kernel reader resolves
// addresses and pods with it (*state.Store).
type Directory interface {
	Workload(uid string) *state.Workload
	WorkloadByAddr(a state.NetworkAddr) *state.Workload
	ServiceByVIP(a state.NetworkAddr) *state.Service
}

// Pods knows the enrolled pods by network namespace cookie (the daemon's
// enroller): the kernel attests the cookie, so the source or destination
// pod of a kernel-path connection is never taken from an address alone.
type Pods interface {
	// PodByNetns returns the enrolled pod's workload UID and a duplicate
	// of its namespace handle (the caller closes it); ok false when no
	// pod is enrolled with that cookie.
	PodByNetns(cookie uint64) (workloadUID string, netns *os.File, ok bool)
	// WorkloadByNetns is the workload UID alone (no handle to duplicate
	// and close): what resolving each connection event needs.
	WorkloadByNetns(cookie uint64) (workloadUID string, ok bool)
}

// EventSource is kmesh_events (*bpf.ConnEvents).
type EventSource interface {
	Read() (bpf.ConnEvent, error)
	SetDeadline(time.Time)
	// Wait returns at the time given or when the kernel wakes the ring's
	// readers, without holding a thread in a system call.
	Wait(time.Time) error
	Close() error
}

// KernelConfig configures the kernel-path reader.
type KernelConfig struct {
	Events  EventSource
	Pods    Pods
	Dir     Directory
	Network string
	Metrics *Metrics
	Log     *AccessLog // nil: no access log
	// Interval between byte reports of open connections (default 5 s).
	Interval time.Duration
	// MaxOpen bounds the open connections tracked (default 65536);
	// beyond, a connection is reported once, when it closes.
	MaxOpen int
	// SocketBytes dumps a namespace's TCP sockets' counters
	// (kernel.TCPSocketBytes; tests replace it).
	SocketBytes func(nsFd int) (map[uint64]kernel.TCPBytes, error)
	// SpliceReceived returns what sk_msg redirected into the spliced
	// socket with these ends (bpf.Maps.SpliceReceived; nil: splicing is
	// not counted). TCP's counters miss those bytes; a socket's sent
	// spliced bytes are its peer's received ones.
	SpliceReceived func(local, remote netip.AddrPort, netnsCookie uint64) (uint64, error)
	Logger         *slog.Logger
}

// openConn is one kernel-path connection between its open and close events.
type openConn struct {
	// res is shared by every connection with the same ends; local and
	// remote are this one's addresses, formatted only for a log line.
	res           *resolvedConn
	local, remote netip.AddrPort
	dialled       netip.AddrPort // the VIP the application dialled, if any
	series        *Series
	netns         uint64
	outbound      bool
	opened        time.Duration // monotonic
	// Bytes already reported, as the socket counts them.
	acked, received uint64
	// missed: walks that did not find the socket (its close event was
	// lost): dropped after two.
	missed int
}

// KernelReader turns kmesh_events into Istio metrics and access logs. One
// goroutine (Run) owns all its state.
type KernelReader struct {
	cfg KernelConfig
	// mu guards open for Connections (the admin server's); the reader
	// goroutine is the only writer.
	mu   sync.Mutex
	open map[uint64]*openConn
	// peers caches PeerOf per workload record: the store replaces a
	// record on every change rather than editing it, so a record's Peer
	// never goes stale, and the map keeps the records it names alive
	// (a pointer is never reused for another workload while cached).
	peers map[*state.Workload]Peer
	// conns caches what resolve makes of a connection's ends, for the
	// same reason and with the same bound: the labels, and their series
	// resolved once.
	conns map[connKey]*resolvedConn
}

// connKey is what a kernel-path connection's labels depend on: the
// records of both ends and of the dialled service, and which end the
// enrolled pod is.
type connKey struct {
	self, peer *state.Workload
	svc        *state.Service
	inbound    bool
}

// resolvedConn is a connection's labels (addresses left out) and their
// series.
type resolvedConn struct {
	conn   Conn
	series *Series
}

// conn is the connection with this socket's addresses, for the log.
func (o *openConn) conn() Conn {
	c := o.res.conn
	c.SrcAddrPort, c.DstAddrPort = o.local, o.remote
	if c.Direction == "inbound" {
		c.SrcAddrPort, c.DstAddrPort = o.remote, o.local
	}
	return c
}

// maxCachedPeers bounds peers; beyond, the cache starts over (replaced
// records would otherwise accumulate).
const maxCachedPeers = 4096

// NewKernelReader prepares a reader; Run starts it.
func NewKernelReader(cfg KernelConfig) *KernelReader {
	if cfg.Interval <= 0 {
		cfg.Interval = 5 * time.Second
	}
	if cfg.MaxOpen <= 0 {
		cfg.MaxOpen = 65536
	}
	if cfg.SocketBytes == nil {
		cfg.SocketBytes = kernel.TCPSocketBytes
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &KernelReader{cfg: cfg, open: map[uint64]*openConn{}, peers: map[*state.Workload]Peer{}, conns: map[connKey]*resolvedConn{}}
}

// pollEvery is how often the reader drains the ring without a wakeup: the
// delay of a metric or an access-log line for a quiet node.
const pollEvery = 100 * time.Millisecond

// Run reads events until ctx ends (or the source is closed), and reports
// open connections' bytes every Interval.
func (k *KernelReader) Run(ctx context.Context) {
	go func() {
		<-ctx.Done()
		k.cfg.Events.Close()
	}()
	// Reads never wait in the kernel (a deadline in the past): the waits
	// are Events.Wait's, in Go's network poller (see bpf.ConnEvents.Wait).
	k.cfg.Events.SetDeadline(time.Unix(1, 0))
	next := time.Now().Add(k.cfg.Interval)
	for {
		for { // drain what is queued
			ev, err := k.cfg.Events.Read()
			if err == nil {
				k.Handle(ev)
				continue
			}
			if bpf.IsTimeout(err) {
				break
			}
			if ctx.Err() != nil || err == bpf.ErrEventsClosed {
				return
			}
			k.cfg.Logger.Warn("reading kernel-path connection events", "err", err)
			break
		}
		if now := time.Now(); !now.Before(next) {
			k.Walk()
			next = now.Add(k.cfg.Interval)
		}
		// The kernel does not wake us per event (sockops.c submits with
		// BPF_RB_NO_WAKEUP below a fill level): drain every pollEvery.
		until := time.Now().Add(pollEvery)
		if next.Before(until) {
			until = next
		}
		if err := k.cfg.Events.Wait(until); err != nil {
			if ctx.Err() != nil || err == bpf.ErrEventsClosed {
				return
			}
			k.cfg.Logger.Warn("waiting for kernel-path connection events", "err", err)
			time.Sleep(pollEvery) // never spin
		}
	}
}

// Open is how many connections are tracked now.
func (k *KernelReader) Open() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.open)
}

// Connections lists the open kernel-path connections by the pod's
// namespace cookie. A nil reader has none.
func (k *KernelReader) Connections() []ConnInfo {
	if k == nil {
		return nil
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	out := make([]ConnInfo, 0, len(k.open))
	for _, o := range k.open {
		c := o.conn()
		src, dst := c.Addrs()
		orig := dst
		if o.dialled.IsValid() {
			orig = o.dialled.String()
		}
		out = append(out, ConnInfo{Netns: o.netns, Inbound: !o.outbound, Src: src, OriginalDst: orig, ActualDst: dst, Protocol: "TCP"})
	}
	return out
}

// Handle applies one event.
func (k *KernelReader) Handle(ev bpf.ConnEvent) {
	k.mu.Lock()
	defer k.mu.Unlock()
	switch ev.Kind {
	case bpf.ConnOpen:
		if _, dup := k.open[ev.SockCookie]; dup {
			return
		}
		if len(k.open) >= k.cfg.MaxOpen {
			// Reported in full when it closes (as an untracked one).
			k.cfg.Metrics.EventsDropped.WithLabelValues("table_full").Inc()
			return
		}
		o := k.track(ev)
		o.netns, o.opened = ev.NetnsCookie, ev.Time
		k.open[ev.SockCookie] = o
	case bpf.ConnDeny:
		// Refused in the kernel by the destination's policies (same node,
		// kmesh_authz): ztunnel's DENY, as its inbound side would log it,
		// reported by the source since the destination never saw it.
		c := k.resolveSlow(ev)
		c.ResponseFlags = "DENY"
		// The socket never got a local address: the pod's own, of the
		// connection's family, is what it would have been.
		c.SrcAddrPort, c.SrcAddr = netip.AddrPort{}, "unknown"
		if uid, ok := k.cfg.Pods.WorkloadByNetns(ev.NetnsCookie); ok {
			if w := k.cfg.Dir.Workload(uid); w != nil {
				for _, a := range w.Addresses {
					if a.Is4() == ev.Remote.Addr().Unmap().Is4() {
						c.SrcAddr = a.String()
						break
					}
				}
			}
		}
		k.cfg.Metrics.Fail(&c)
		k.cfg.Log.Log(&Record{Conn: &c, Duration: -1, Err: "denied at connect by the destination's authorization policies", Failed: true})
	case bpf.ConnClose:
		o := k.open[ev.SockCookie]
		delete(k.open, ev.SockCookie)
		outcome := Classify(ev.OldState)
		if outcome == Failed {
			c := k.resolveSlow(ev)
			c.ResponseFlags = "CONNECT"
			k.cfg.Metrics.Fail(&c)
			k.cfg.Log.Log(&Record{Conn: &c, Duration: -1, Err: "connection refused or timed out", Failed: true})
			return
		}
		duration := time.Duration(-1)
		if o == nil {
			// Opened before this daemon read events (a restart), or not
			// tracked: counted opened and closed now, bytes in full.
			o = k.track(ev)
		} else {
			duration = ev.Time - o.opened
		}
		acked, received := Payload(o.outbound, ev.OldState, ev.BytesAcked, ev.BytesReceived)
		recv, sent := Directional(o.outbound, acked, received)
		prevRecv, prevSent := Directional(o.outbound, o.acked, o.received)
		o.series.Close(sub(recv, prevRecv), sub(sent, prevSent))
		if now := time.Now(); k.cfg.Log.Admit(now) {
			c := o.conn()
			r := &Record{Time: now, Conn: &c, Duration: duration, BytesSent: sent, BytesRecv: recv}
			if outcome == Reset {
				r.Err = "connection reset"
			}
			k.cfg.Log.Write(r)
		}
	}
}

// Walk reports the bytes open connections moved since the last report,
// one sock_diag dump per pod namespace with open connections, and forgets
// connections whose sockets are gone twice in a row (their close event
// was lost to a full ring buffer: kmesh_datapath_events_total
// {event="conn_event_drop"} counts those).
func (k *KernelReader) Walk() {
	k.mu.Lock()
	defer k.mu.Unlock()
	byNetns := map[uint64][]uint64{}
	for cookie, o := range k.open {
		byNetns[o.netns] = append(byNetns[o.netns], cookie)
	}
	for ns, cookies := range byNetns {
		var socks map[uint64]kernel.TCPBytes
		if _, f, ok := k.cfg.Pods.PodByNetns(ns); ok {
			var err error
			socks, err = k.cfg.SocketBytes(int(f.Fd()))
			f.Close()
			if err != nil {
				k.cfg.Logger.Debug("reading a pod's TCP sockets", "netns_cookie", ns, "err", err)
				continue
			}
		}
		for _, c := range cookies {
			o := k.open[c]
			b, ok := socks[c]
			if !ok {
				if o.missed++; o.missed >= 2 {
					o.series.Close(0, 0)
					delete(k.open, c)
				}
				continue
			}
			o.missed = 0
			if k.cfg.SpliceReceived != nil {
				// Counted by sk_msg under each end's own key: ours
				// is what we received, the peer's what we sent.
				if n, err := k.cfg.SpliceReceived(o.local, o.remote, o.netns); err == nil {
					b.Received += n
				}
				if n, err := k.cfg.SpliceReceived(o.remote, o.local, o.netns); err == nil {
					b.Acked += n
				}
			}
			acked, received := Payload(o.outbound, b.State, b.Acked, b.Received)
			recv, sent := Directional(o.outbound, acked, received)
			prevRecv, prevSent := Directional(o.outbound, o.acked, o.received)
			o.series.Add(sub(recv, prevRecv), sub(sent, prevSent))
			o.acked, o.received = max(o.acked, acked), max(o.received, received)
		}
	}
}

func sub(a, b uint64) uint64 {
	if a < b {
		return 0
	}
	return a - b
}

// Outcome is how a kernel-path connection ended.
type Outcome int

const (
	Completed Outcome = iota
	Failed            // never established: refused, reset or timed out while connecting
	Reset             // aborted while established (RST sent or received)
)

// Classify tells how a connection ended from the TCP state it left for
// TCP_CLOSE: an orderly close leaves FIN_WAIT2/TIME_WAIT, LAST_ACK or
// CLOSING (or FIN_WAIT1, timed out); a connect that never completed leaves
// SYN_SENT (SYN_RECV on the accepting side); a reset leaves ESTABLISHED or
// CLOSE_WAIT.
func Classify(oldState uint8) Outcome {
	switch oldState {
	case bpf.TCPSynSent, bpf.TCPSynRecv:
		return Failed
	case bpf.TCPEstablished, bpf.TCPCloseWait:
		return Reset
	}
	return Completed
}

// Payload removes the sequence numbers SYN and FIN take from a socket's
// counters, leaving the application's bytes: the kernel's bytes_acked
// counts the acknowledged FIN and, on the connecting side only, the SYN
// (an accepted socket starts with its SYN-ACK acknowledged:
// tcp_create_openreq_child), bytes_received the peer's FIN. state is the TCP state the socket is
// in, or left for TCP_CLOSE: whether our FIN was acknowledged (FIN_WAIT2,
// TIME_WAIT, CLOSING's way to TIME_WAIT, LAST_ACK's to CLOSE) and whether
// the peer's arrived (CLOSE_WAIT, LAST_ACK, CLOSING, TIME_WAIT, and
// FIN_WAIT2 on its way to TIME_WAIT) follow from it.
func Payload(outbound bool, state uint8, acked, received uint64) (uint64, uint64) {
	var synFin, peerFin uint64
	switch state {
	case bpf.TCPSynSent, bpf.TCPSynRecv, bpf.TCPListen, 0:
		// nothing acknowledged yet
	case bpf.TCPEstablished, bpf.TCPFinWait1:
		synFin = 1
	case bpf.TCPCloseWait:
		synFin, peerFin = 1, 1
	case bpf.TCPFinWait2, bpf.TCPTimeWait, bpf.TCPClosing, bpf.TCPLastAck:
		synFin, peerFin = 2, 1
	}
	if !outbound && synFin > 0 {
		synFin--
	}
	return sub(acked, synFin), sub(received, peerFin)
}

// Directional maps a socket's counters to Istio's: received is client to
// server, sent is server to client. On the client's socket (outbound)
// what it sent and had acked went to the server; on the server's, what
// it received came from the client.
func Directional(outbound bool, acked, received uint64) (recv, sent uint64) {
	if outbound {
		return acked, received
	}
	return received, acked
}

// resolve names both ends of a kernel-path connection: the pod by the
// namespace cookie the kernel attests, the peer by its address in this
// network, the service by the VIP the application dialled (else the
// destination workload's first service, as the node proxy does).
func (k *KernelReader) ends(ev bpf.ConnEvent) connKey {
	key := connKey{inbound: ev.Direction == bpf.ConnInbound}
	if uid, ok := k.cfg.Pods.WorkloadByNetns(ev.NetnsCookie); ok {
		key.self = k.cfg.Dir.Workload(uid)
	}
	key.peer = k.cfg.Dir.WorkloadByAddr(state.NetworkAddr{Network: k.cfg.Network, Addr: ev.Remote.Addr().Unmap()})
	if ev.Dialled.IsValid() {
		key.svc = k.cfg.Dir.ServiceByVIP(state.NetworkAddr{Network: k.cfg.Network, Addr: ev.Dialled.Addr().Unmap()})
	}
	return key
}

// resolveSlow is resolve without the caches (failed connects: rare, and
// labelled apart).
func (k *KernelReader) resolveSlow(ev bpf.ConnEvent) Conn {
	key := k.ends(ev)
	return kernelConn(ev, key.self, key.peer, key.svc, k.peerOf)
}

// track starts a connection's record: counted opened under its labels.
func (k *KernelReader) track(ev bpf.ConnEvent) *openConn {
	key := k.ends(ev)
	r := k.conns[key]
	if r == nil {
		c := kernelConn(ev, key.self, key.peer, key.svc, k.peerOf)
		c.SrcAddrPort, c.DstAddrPort = netip.AddrPort{}, netip.AddrPort{}
		r = &resolvedConn{conn: c, series: k.cfg.Metrics.series(&c)}
		if len(k.conns) >= maxCachedPeers {
			clear(k.conns)
		}
		k.conns[key] = r
	}
	r.series.open()
	return &openConn{res: r, series: r.series, local: ev.Local, remote: ev.Remote, dialled: ev.Dialled, outbound: !key.inbound}
}

func (k *KernelReader) peerOf(w *state.Workload) Peer {
	if w == nil {
		return Peer{}
	}
	if p, ok := k.peers[w]; ok {
		return p
	}
	if len(k.peers) >= maxCachedPeers {
		clear(k.peers)
	}
	p := PeerOf(w)
	k.peers[w] = p
	return p
}

// KernelConn builds the connection's labels from what resolve found (pure).
func KernelConn(ev bpf.ConnEvent, self, peer *state.Workload, svc *state.Service) Conn {
	return kernelConn(ev, self, peer, svc, PeerOf)
}

func kernelConn(ev bpf.ConnEvent, self, peer *state.Workload, svc *state.Service, peerOf func(*state.Workload) Peer) Conn {
	c := Conn{Reporter: "source", Direction: "outbound"}
	local := netip.AddrPortFrom(ev.Local.Addr().Unmap(), ev.Local.Port())
	remote := netip.AddrPortFrom(ev.Remote.Addr().Unmap(), ev.Remote.Port())
	src, dst := self, peer
	c.SrcAddrPort, c.DstAddrPort = local, remote
	if ev.Direction == bpf.ConnInbound {
		c.Reporter, c.Direction = "destination", "inbound"
		src, dst = peer, self
		c.SrcAddrPort, c.DstAddrPort = remote, local
	}
	c.Src, c.Dst = peerOf(src), peerOf(dst)
	if svc != nil {
		c.DstService, c.DstServiceNamespace, c.DstServiceName = svc.Hostname, svc.Namespace, svc.Name
	} else if dst != nil && len(dst.Services) > 0 {
		ns, host, _ := strings.Cut(dst.Services[0].Service, "/")
		c.DstService, c.DstServiceNamespace = host, ns
		c.DstServiceName, _, _ = strings.Cut(host, ".")
	}
	return c
}

// PeerOf names a workload for metrics and logs; nil: unknown (outside the
// mesh, or not yet known to the control plane).
func PeerOf(w *state.Workload) Peer {
	if w == nil {
		return Peer{}
	}
	m := w.Meta()
	id := identity.Identity{TrustDomain: m.TrustDomain, Namespace: m.Namespace, ServiceAccount: m.ServiceAccount}
	if id.TrustDomain == "" {
		id.TrustDomain = "cluster.local"
	}
	if id.ServiceAccount == "" {
		id.ServiceAccount = "default"
	}
	name := m.WorkloadName
	if name == "" {
		name = w.Name
	}
	// ztunnel reports the canonical service and revision as app and version.
	return Peer{Workload: name, Namespace: m.Namespace, Principal: id.String(), CanonicalService: m.CanonicalName,
		CanonicalRev: m.CanonicalRevision, App: m.CanonicalName, Version: m.CanonicalRevision, Cluster: m.ClusterID}
}
