package tunnel

import (
	"net"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/ambient/telemetry"
)

type metrics struct {
	// tcp: Istio's TCP metrics, shared with the kernel path's reader.
	tcp *telemetry.Metrics
	// live reports long-lived connections' bytes every few seconds.
	live       *telemetry.Live
	log        *telemetry.AccessLog
	refused    *prometheus.CounterVec
	pooled     prometheus.Gauge
	handshakes *prometheus.CounterVec
	// hboneErrors: limits HBONE peers hit and protocol errors they made
	// (hbone.Reason*), by direction.
	hboneErrors *prometheus.CounterVec
	// listeners: in-pod listeners by how they came (reused from the
	// holder, opened, or a held one refused).
	listeners *prometheus.CounterVec
}

// newMetrics uses tcp for Istio's TCP metrics (nil: its own, registered
// with reg).
func newMetrics(reg prometheus.Registerer, tcp *telemetry.Metrics, log *telemetry.AccessLog, interval time.Duration) *metrics {
	if tcp == nil {
		tcp = telemetry.NewMetrics(reg)
	}
	m := &metrics{tcp: tcp, log: log, live: telemetry.NewLive(interval),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kmesh_tunnel_refused_total",
			Help: "Connections and CONNECT requests the node proxy refused, by direction and reason."}, []string{"direction", "reason"}),
		pooled: prometheus.NewGauge(prometheus.GaugeOpts{Name: "kmesh_tunnel_pooled_connections",
			Help: "Outbound HBONE connections held open for reuse."}),
		handshakes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kmesh_tunnel_handshakes_total",
			Help: "TLS handshakes of HBONE connections, by direction."}, []string{"direction"}),
		hboneErrors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kmesh_hbone_connection_errors_total",
			Help: "HTTP/2 limits HBONE peers hit and protocol errors they made (streams reset or connections closed for it), by direction and reason."},
			[]string{"direction", "reason"}),
		listeners: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kmesh_tunnel_listeners_total",
			Help: "In-pod listeners the node proxy took: reused (held across a daemon restart by the listener holder), opened anew, or refused (a held socket that was not the pod's)."},
			[]string{"how"}),
	}
	if reg != nil {
		reg.MustRegister(m.refused, m.pooled, m.handshakes, m.hboneErrors, m.listeners)
	}
	return m
}

// countHBONE is an hbone.Config.CountError for one direction.
func (m *metrics) countHBONE(direction string) func(reason string) {
	return func(reason string) { m.hboneErrors.WithLabelValues(direction, reason).Inc() }
}

// connReport is one proxied connection, for Istio's TCP metrics and the
// access log.
type connReport struct {
	reporter                     string
	srcWorkload, srcNS, srcPrinc string
	dstWorkload, dstNS, dstPrinc string
	dstService, dstServiceNS     string
	mtls                         bool
	// dst: the destination workload, for the rest of its labels.
	dst              *state.Workload
	srcAddr, dstAddr string
	// For the config dump's connection list: the pod (UID) it belongs
	// to, where it went (an HBONE peer's address, else dstAddr) and how.
	pod       string
	actualDst string
}

func (r *connReport) conn() *telemetry.Conn {
	c := &telemetry.Conn{Reporter: r.reporter, MTLS: r.mtls, SrcAddr: r.srcAddr, DstAddr: r.dstAddr, Direction: "outbound"}
	if r.reporter == "destination" {
		c.Direction = "inbound"
	}
	c.Dst = telemetry.PeerOf(r.dst)
	c.Src = telemetry.Peer{Workload: r.srcWorkload, Namespace: r.srcNS, Principal: r.srcPrinc}
	if r.dst == nil {
		c.Dst = telemetry.Peer{}
	}
	c.Dst.Workload, c.Dst.Namespace, c.Dst.Principal = r.dstWorkload, r.dstNS, r.dstPrinc
	c.DstService, c.DstServiceNamespace = r.dstService, r.dstServiceNS
	c.DstServiceName, _, _ = strings.Cut(c.DstService, ".")
	return c
}

// connMetrics is one open connection's reports.
type connMetrics struct {
	m       *metrics
	c       *telemetry.Conn
	tracked *telemetry.Tracked
	start   time.Time
}

// open counts the connection opened; sample reads its bytes so far for
// the periodic reports (client to server, server to client).
func (m *metrics) open(r *connReport, sample func() (recv, sent uint64, ok bool)) *connMetrics {
	c := r.conn()
	info := telemetry.ConnInfo{Pod: r.pod, Inbound: r.reporter == "destination", Src: r.srcAddr, OriginalDst: r.dstAddr,
		ActualDst: r.actualDst, Protocol: "TCP"}
	if info.ActualDst == "" {
		info.ActualDst = r.dstAddr
	}
	if r.mtls {
		info.Protocol = "HBONE"
	}
	return &connMetrics{m: m, c: c, tracked: m.live.Track(m.tcp.Open(c), info, sample), start: time.Now()}
}

// close counts it closed with its totals, and logs it.
func (cm *connMetrics) close(received, sent int64, err error) {
	cm.tracked.Close(uint64(max(received, 0)), uint64(max(sent, 0)))
	rec := &telemetry.Record{Conn: cm.c, Duration: time.Since(cm.start), BytesRecv: uint64(max(received, 0)), BytesSent: uint64(max(sent, 0))}
	if err != nil {
		rec.Err = err.Error()
	}
	cm.m.log.Log(rec)
}

// socketSample reads a socket's tcp_info counters: what it received and
// what its peer acknowledged. outbound: the socket's peer is the client
// (the application connecting out), so its received bytes go to the
// server; otherwise its peer is the server.
func socketSample(c *net.TCPConn, peerIsClient bool) func() (recv, sent uint64, ok bool) {
	return func() (uint64, uint64, bool) {
		rc, err := c.SyscallConn()
		if err != nil {
			return 0, 0, false
		}
		var info *unix.TCPInfo
		var serr error
		if err := rc.Control(func(fd uintptr) { info, serr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil || serr != nil {
			return 0, 0, false
		}
		if peerIsClient {
			return info.Bytes_received, info.Bytes_acked, true
		}
		return info.Bytes_acked, info.Bytes_received, true
	}
}

// Connections lists the connections the proxy carries now, by pod.
func (p *Proxy) Connections() []telemetry.ConnInfo { return p.m.live.Connections() }
