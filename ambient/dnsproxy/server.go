package dnsproxy

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/ambient/holder"
	"kmesh.dev/kmesh/kernel"
)

// Config configures the DNS server.
type Config struct {
	View     View
	Upstream *Upstream
	// Domain is the cluster's DNS domain (default cluster.local).
	Domain string
	// Network is this node's network: VIPs of other networks are not
	// answered.
	Network string
	// Port is the in-pod port (default 15053).
	Port    int
	Metrics *Metrics
	Log     *slog.Logger
	// Source names the querying pod's workload for metrics (canonical
	// service and revision); nil: unknown.
	Source func(workloadUID string) (canonicalService, canonicalRevision string)

	// Ready is closed once the first full control-plane state is in View.
	// Until then (at most ReadyWait, default 10 s) the pods' sockets are
	// not read: questions wait in the socket buffers rather than being
	// answered from an empty state (a restarted daemon would forward mesh
	// names upstream and get NXDOMAIN). nil: ready at once.
	Ready     <-chan struct{}
	ReadyWait time.Duration

	// UpstreamFromPod forwards from inside the asking pod (ztunnel's
	// in-pod sockets: the resolver sees the pod's address), with its
	// sockets recorded in OwnSockets; otherwise, or for a resolver on
	// loopback, from the daemon's namespace.
	UpstreamFromPod bool
	OwnSockets      OwnSockets

	// Bounds against a pod that floods us (defaults in brackets).
	// InFlight: UDP questions being forwarded per pod at once [64];
	// beyond, they are dropped (the client retries). Names the mesh
	// knows are answered on the read loop and never wait. TCPConns: TCP
	// connections per pod [16], each answering one question at a time;
	// beyond, refused.
	// TCPIdle: a TCP connection with no question for that long is closed
	// [5 s, ztunnel's].
	InFlight int
	TCPConns int
	TCPIdle  time.Duration

	// Listeners, when set, keeps every pod's DNS sockets beyond this
	// daemon (the listener holder): a restarted daemon takes them back,
	// with the questions that arrived meanwhile still queued.
	Listeners ListenerStore
}

// Pod is one enrolled pod the server answers.
type Pod struct {
	UID         string
	WorkloadUID string
	Namespace   string
	Netns       *os.File
	// Cookie is the namespace's cookie: with UID, the key of the pod's
	// sockets in Config.Listeners (0: not kept there).
	Cookie uint64
}

// Server answers the DNS questions of every enrolled pod on the node.
type Server struct {
	cfg Config
	log *slog.Logger

	mu   sync.Mutex
	pods map[string]*podServer
	wg   sync.WaitGroup
}

type podServer struct {
	pod      Pod
	socks    *Sockets
	keys     []holder.Key // the sockets' keys in Config.Listeners
	inflight chan struct{}
	tcpConns chan struct{}
	ctx      context.Context
	cancel   context.CancelFunc

	mu           sync.Mutex
	conns        map[net.Conn]struct{}
	drainStarted bool
	closeOnce    sync.Once
	nsMu         sync.RWMutex
	nsClosed     bool
}

// New returns a server; pods are added with AddPod.
func New(cfg Config) *Server {
	if cfg.Domain == "" {
		cfg.Domain = "cluster.local"
	}
	if cfg.Port == 0 {
		cfg.Port = Port
	}
	if cfg.InFlight <= 0 {
		cfg.InFlight = 64
	}
	if cfg.TCPConns <= 0 {
		cfg.TCPConns = 16
	}
	if cfg.TCPIdle <= 0 {
		cfg.TCPIdle = 5 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.ReadyWait <= 0 {
		cfg.ReadyWait = 10 * time.Second
	}
	return &Server{cfg: cfg, log: cfg.Log.With("component", "dns"), pods: map[string]*podServer{}}
}

// AddPod opens the pod's DNS listeners (OpenSockets) and serves them.
// Adding a pod again replaces its listeners.
func (s *Server) AddPod(p Pod) error {
	socks, keys, err := s.claimSockets(p)
	if err != nil {
		return err
	}
	old := s.serve(p, socks, keys)
	if old != nil && s.cfg.Listeners != nil {
		// A recreated sandbox: the old namespace's sockets go from the
		// store (the same keys were just put again).
		for _, k := range old.keys {
			if !slices.Contains(keys, k) {
				s.cfg.Listeners.Drop(k)
			}
		}
	}
	return nil
}

// dialFor is how the pod's forwarded questions reach the upstream.
func (s *Server) dialFor(ps *podServer) Dial {
	if !s.cfg.UpstreamFromPod || s.cfg.OwnSockets == nil || ps == nil || ps.pod.Netns == nil {
		return nil
	}
	return podDial(ps.inNetns, s.cfg.OwnSockets)
}

// inNetns runs fn on a thread in the pod's namespace. The namespace handle
// is closed only when no fn runs (a closed descriptor's number may be
// reused by another file: entering it would be entering who knows what).
func (ps *podServer) inNetns(fn func() error) error {
	ps.nsMu.RLock()
	defer ps.nsMu.RUnlock()
	if ps.nsClosed {
		return errors.New("pod left the mesh")
	}
	return kernel.InNetns(int(ps.pod.Netns.Fd()), fn)
}

// Serve answers the questions arriving on socks, opened for p elsewhere
// (a listener holder).
func (s *Server) Serve(p Pod, socks *Sockets) { s.serve(p, socks, nil) }

// serve serves socks for p and returns the enrolment it replaced, closed.
func (s *Server) serve(p Pod, socks *Sockets, keys []holder.Key) *podServer {
	if p.Netns != nil {
		// The caller's handle may close; keep our own for upstream sockets.
		if fd, err := unix.FcntlInt(p.Netns.Fd(), unix.F_DUPFD_CLOEXEC, 0); err == nil {
			p.Netns = os.NewFile(uintptr(fd), "netns:"+p.UID)
		} else {
			p.Netns = nil
		}
	}
	ps := &podServer{pod: p, socks: socks, keys: keys, inflight: make(chan struct{}, s.cfg.InFlight),
		tcpConns: make(chan struct{}, s.cfg.TCPConns), conns: map[net.Conn]struct{}{}}
	ps.ctx, ps.cancel = context.WithCancel(context.Background())
	for _, u := range socks.UDP {
		s.wg.Add(1)
		go s.serveUDP(ps, u)
	}
	for _, l := range socks.TCP {
		s.wg.Add(1)
		go s.serveTCP(ps, l)
	}
	s.mu.Lock()
	old := s.pods[p.UID]
	s.pods[p.UID] = ps
	s.mu.Unlock()
	if old != nil {
		old.close()
	}
	return old
}

// RemovePod closes the pod's listeners.
func (s *Server) RemovePod(uid string) {
	s.mu.Lock()
	ps := s.pods[uid]
	delete(s.pods, uid)
	s.mu.Unlock()
	if ps != nil {
		if s.cfg.Listeners != nil {
			for _, k := range ps.keys {
				s.cfg.Listeners.Drop(k)
			}
		}
		ps.close()
	}
}

// Close closes every pod's listeners at once and waits for the server's
// goroutines.
func (s *Server) Close() { s.Shutdown(0) }

// Shutdown hands the pods' DNS over to a successor daemon listening beside
// this one (SO_REUSEPORT) and stops. For handover it keeps answering; then
// each UDP socket is connected to an address that never sends, which takes
// it out of its reuseport group's choice for new queries (the kernel skips
// connected sockets when it spreads datagrams), and the queries already
// queued on it are answered before it closes: none is lost to the close.
// TCP listeners close (tcp_migrate_req, set in each pod by the tunnel,
// moves connections still queued to the successor); open TCP connections
// get up to a second to finish the question they are on.
func (s *Server) Shutdown(handover time.Duration) {
	if handover > 0 {
		time.Sleep(handover)
	}
	s.mu.Lock()
	pods := s.pods
	s.pods = map[string]*podServer{}
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, ps := range pods {
		if handover <= 0 {
			ps.close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ps.drain()
		}()
	}
	wg.Wait()
	s.wg.Wait()
}

// drain stops new work reaching the pod's sockets, lets the queued work
// finish, then closes.
func (ps *podServer) drain() {
	ps.mu.Lock()
	ps.drainStarted = true
	ps.mu.Unlock()
	for _, l := range ps.socks.TCP {
		l.Close()
	}
	for _, u := range ps.socks.UDP {
		rc, err := u.SyscallConn()
		if err != nil {
			continue
		}
		_ = rc.Control(func(fd uintptr) {
			// Port 1 on loopback: nothing sends from there, so nothing
			// new is delivered to this socket; nothing is sent by connect.
			sa, _ := unix.Getsockname(int(fd))
			var to unix.Sockaddr = &unix.SockaddrInet4{Port: 1, Addr: [4]byte{127, 0, 0, 1}}
			if _, v6 := sa.(*unix.SockaddrInet6); v6 {
				to = &unix.SockaddrInet6{Port: 1, Addr: [16]byte{15: 1}}
			}
			_ = unix.Connect(int(fd), to)
		})
		// The read loop answers what is queued; it ends when a read
		// finds nothing for a while.
		u.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	}
	time.Sleep(time.Second) // questions in progress, TCP and forwarded
	ps.close()
}

func (ps *podServer) draining() bool {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return ps.drainStarted
}

func (ps *podServer) close() {
	ps.closeOnce.Do(ps.closeNow)
}

func (ps *podServer) closeNow() {
	ps.cancel()
	if ps.pod.Netns != nil {
		ps.nsMu.Lock()
		ps.nsClosed = true
		ps.pod.Netns.Close()
		ps.nsMu.Unlock()
	}
	ps.socks.Close()
	ps.mu.Lock()
	for c := range ps.conns {
		c.Close()
	}
	ps.mu.Unlock()
}

// waitReady waits for the first state (Config.Ready), at most ReadyWait;
// false when the pod went away meanwhile.
func (s *Server) waitReady(ps *podServer) bool {
	if s.cfg.Ready == nil {
		return true
	}
	t := time.NewTimer(s.cfg.ReadyWait)
	defer t.Stop()
	select {
	case <-s.cfg.Ready:
	case <-t.C:
		s.log.Warn("answering DNS before the first control-plane state: mesh names may be forwarded upstream", "pod", ps.pod.UID)
	case <-ps.ctx.Done():
		return false
	}
	return true
}

func (s *Server) serveUDP(ps *podServer, u *net.UDPConn) {
	defer s.wg.Done()
	if !s.waitReady(ps) {
		return
	}
	buf := make([]byte, dns.MaxMsgSize)
	for {
		n, from, err := u.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) || ps.ctx.Err() != nil || errors.Is(err, os.ErrDeadlineExceeded) {
				return // closed, or drained (Shutdown)
			}
			continue
		}
		if ps.draining() {
			u.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		}
		// Names the mesh knows (and bad input) are answered here, on the
		// read loop: no goroutine, no queue, and an upstream that is slow
		// or flooded never delays them.
		reply, fwd := s.local(ps.pod, buf[:n], "udp")
		if fwd == nil {
			s.send(u, reply, buf[:n], from)
			continue
		}
		select {
		case ps.inflight <- struct{}{}:
		default:
			// Flooded: drop, the client's resolver retries. Nothing
			// queues beyond InFlight forwarded questions per pod.
			s.cfg.Metrics.dropped()
			continue
		}
		req := append([]byte(nil), buf[:n]...)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() { <-ps.inflight }()
			s.send(u, s.forward(ps.ctx, ps, ps.pod, fwd, "udp"), req, from)
		}()
	}
}

// send packs r for a UDP client: truncated (TC) to what the client accepts.
func (s *Server) send(u *net.UDPConn, r *dns.Msg, req []byte, to netip.AddrPort) {
	if r == nil {
		return
	}
	// Truncate sets TC when the answer does not fit what the client can
	// take over UDP; the client asks again over TCP.
	r.Truncate(udpSize(req))
	out, err := r.Pack()
	if err != nil {
		s.log.Debug("packing an answer", "err", err)
		return
	}
	_, _ = u.WriteToUDPAddrPort(out, to)
}

func (s *Server) serveTCP(ps *podServer, l *net.TCPListener) {
	defer s.wg.Done()
	if !s.waitReady(ps) {
		return
	}
	for {
		c, err := l.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || ps.ctx.Err() != nil {
				return
			}
			continue
		}
		select {
		case ps.tcpConns <- struct{}{}:
		default:
			s.cfg.Metrics.dropped()
			c.SetLinger(0)
			c.Close()
			continue
		}
		ps.mu.Lock()
		ps.conns[c] = struct{}{}
		ps.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() { <-ps.tcpConns }()
			s.serveConn(ps, c)
			ps.mu.Lock()
			delete(ps.conns, c)
			ps.mu.Unlock()
			c.Close()
		}()
	}
}

// serveConn answers the questions of one TCP connection in turn (RFC 7766
// framing: a two-byte length before each message). Its goroutine is
// bounded by TCPConns; a connection idle for TCPIdle is closed.
func (s *Server) serveConn(ps *podServer, c *net.TCPConn) {
	var lenBuf [2]byte
	for {
		c.SetDeadline(time.Now().Add(s.cfg.TCPIdle))
		if _, err := io.ReadFull(c, lenBuf[:]); err != nil {
			return
		}
		n := binary.BigEndian.Uint16(lenBuf[:])
		req := make([]byte, n)
		if _, err := io.ReadFull(c, req); err != nil {
			return
		}
		r := s.handle(ps.ctx, ps, ps.pod, req, "tcp")
		if r == nil {
			return // not DNS: close
		}
		out, err := r.Pack()
		if err != nil {
			return
		}
		msg := make([]byte, 2+len(out))
		binary.BigEndian.PutUint16(msg, uint16(len(out)))
		copy(msg[2:], out)
		c.SetDeadline(time.Now().Add(s.cfg.TCPIdle))
		if _, err := c.Write(msg); err != nil {
			return
		}
	}
}

func addrPort(a net.Addr) netip.AddrPort {
	if t, ok := a.(*net.TCPAddr); ok {
		return t.AddrPort()
	}
	return netip.AddrPort{}
}

// udpSize is the UDP answer size the client accepts: its EDNS0 size, at
// least 512 (RFC 6891).
func udpSize(req []byte) int {
	m := new(dns.Msg)
	if m.Unpack(req) == nil {
		if o := m.IsEdns0(); o != nil && o.UDPSize() > dns.MinMsgSize {
			return int(o.UDPSize())
		}
	}
	return dns.MinMsgSize
}

// Handle answers one wire-format message from pod: a reply, FORMERR for a
// message that is not a well-formed question, or nil for what should get
// no answer at all (shorter than a header, or itself an answer).
func (s *Server) Handle(ctx context.Context, pod Pod, req []byte, proto string) *dns.Msg {
	return s.handle(ctx, nil, pod, req, proto)
}

func (s *Server) handle(ctx context.Context, ps *podServer, pod Pod, req []byte, proto string) *dns.Msg {
	reply, fwd := s.local(pod, req, proto)
	if fwd == nil {
		return reply
	}
	return s.forward(ctx, ps, pod, fwd, proto)
}

// local answers what needs no upstream: the mesh's names and bad input.
// It returns the reply, or the question to forward.
func (s *Server) local(pod Pod, req []byte, proto string) (reply, fwd *dns.Msg) {
	if len(req) < 12 {
		return nil, nil
	}
	hdr := dns.MsgHdr{Id: binary.BigEndian.Uint16(req), Response: req[2]&0x80 != 0, Opcode: int(req[2]>>3) & 0xf}
	if hdr.Response {
		return nil, nil // never answer an answer: no loops between two servers
	}
	q := new(dns.Msg)
	if err := q.Unpack(req); err != nil || len(q.Question) != 1 {
		s.cfg.Metrics.formErr()
		return &dns.Msg{MsgHdr: dns.MsgHdr{Id: hdr.Id, Response: true, Opcode: hdr.Opcode, Rcode: dns.RcodeFormatError}}, nil
	}
	if q.Opcode != dns.OpcodeQuery {
		m := new(dns.Msg)
		m.SetRcode(q, dns.RcodeNotImplemented)
		return m, nil
	}
	qq := q.Question[0]
	if qq.Qclass == dns.ClassINET {
		res := Resolve(s.cfg.View, s.cfg.Domain, Client{Namespace: pod.Namespace, Network: s.cfg.Network}, qq.Name, qq.Qtype)
		if res.Found {
			s.cfg.Metrics.request(s.labels(pod, qq.Qtype, proto))
			m := new(dns.Msg)
			m.SetReply(q)
			m.Authoritative = true
			m.RecursionAvailable = true
			shuffleAddrs(res.Answers)
			m.Answer = res.Answers
			return m, nil
		}
	}
	return nil, q
}

// forward asks the upstream resolvers; SERVFAIL when none answers.
func (s *Server) forward(ctx context.Context, ps *podServer, pod Pod, q *dns.Msg, proto string) *dns.Msg {
	qq := q.Question[0]
	labels := s.labels(pod, qq.Qtype, proto)
	s.cfg.Metrics.request(labels)
	if s.cfg.Upstream == nil {
		m := new(dns.Msg)
		m.SetRcode(q, dns.RcodeServerFailure)
		return m
	}
	start := time.Now()
	// Counted whether the cache answered or not, as ztunnel counts every
	// question it hands its forwarder (whose resolver caches).
	r, _, err := s.cfg.Upstream.Exchange(ctx, q, s.dialFor(ps))
	s.cfg.Metrics.upstream(labels, time.Since(start), err != nil)
	if err != nil {
		s.log.Debug("forwarding failed", "pod", pod.UID, "name", qq.Name, "err", err)
		m := new(dns.Msg)
		m.SetRcode(q, dns.RcodeServerFailure)
		return m
	}
	r.Id = q.Id
	return r
}

func (s *Server) labels(pod Pod, qtype uint16, proto string) [4]string {
	canon, rev := "", ""
	if s.cfg.Source != nil {
		canon, rev = s.cfg.Source(pod.WorkloadUID)
	}
	return labelsFor(qtype, proto, canon, rev)
}

// shuffleAddrs randomises the order of the address records (after any
// CNAME), as ztunnel does: clients that take the first spread over the
// endpoints of a headless service.
func shuffleAddrs(rrs []dns.RR) {
	i := 0
	for i < len(rrs) && rrs[i].Header().Rrtype == dns.TypeCNAME {
		i++
	}
	a := rrs[i:]
	rand.Shuffle(len(a), func(x, y int) { a[x], a[y] = a[y], a[x] })
}

func labelsFor(qtype uint16, proto, canon, rev string) [4]string {
	t := strings.ToLower(dns.TypeToString[qtype])
	if t == "" {
		t = "unknown"
	}
	if canon == "" {
		canon = "unknown"
	}
	if rev == "" {
		rev = "unknown"
	}
	return [4]string{t, proto, canon, rev}
}
