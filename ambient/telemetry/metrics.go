// Package telemetry turns connections into Istio's standard TCP metrics and
// ztunnel-style access logs, for both of Kmesh's paths: the node proxy
// (ambient/tunnel) reports the connections it carries, and the kernel path
// (connections no proxy sees) is reported from the events sockops queues
// in kmesh_events (kernel.go). Both feed the same metric objects, so a
// dashboard built for ztunnel sees one set of series whichever path a
// connection took.
package telemetry

import (
	"net/netip"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Labels are Istio's standard TCP metric labels, as ztunnel exports them
// (src/proxy/metrics.rs).
var Labels = []string{
	"reporter",
	"source_workload", "source_canonical_service", "source_canonical_revision", "source_workload_namespace",
	"source_principal", "source_app", "source_version", "source_cluster",
	"destination_service", "destination_service_namespace", "destination_service_name",
	"destination_workload", "destination_canonical_service", "destination_canonical_revision",
	"destination_workload_namespace", "destination_principal", "destination_app", "destination_version",
	"destination_cluster",
	"request_protocol", "response_flags", "connection_security_policy",
}

// Metrics are Istio's TCP connection metrics, registered once per daemon
// and shared by every path.
type Metrics struct {
	Opened, Closed, Failed *prometheus.CounterVec
	// Received: bytes from client to server; Sent: server to client
	// (Istio's convention), whichever end reports.
	Received, Sent *prometheus.CounterVec
	// EventsDropped counts kernel-path events lost before they were
	// turned into metrics, by where (ring buffer full, too many open
	// connections tracked).
	EventsDropped *prometheus.CounterVec
	// LogsDropped counts access log lines the rate limit suppressed.
	LogsDropped prometheus.Counter
	// SocketsOpen is ztunnel's istio_tcp_sockets_open{reporter}: the
	// connections of both paths open now, by which end reports them.
	SocketsOpen *prometheus.GaugeVec

	// cache holds each label set's counters once resolved: finding a
	// series in a CounterVec hashes and validates all 23 label values
	// (four vectors: ~90% of the reader's CPU per kernel-path connection
	// before this cache, BenchmarkHandleConnection).
	mu    sync.Mutex
	cache map[seriesKey]*Series
}

// seriesKey is what decides a connection's labels (Conn without its
// addresses and direction, which no label carries).
type seriesKey struct {
	reporter                                        string
	src, dst                                        Peer
	dstService, dstServiceNamespace, dstServiceName string
	mtls                                            bool
	responseFlags                                   string
}

// maxCachedSeries bounds the cache: beyond, it starts over (the series
// themselves stay in the vectors; only the shortcut is lost).
const maxCachedSeries = 16384

// NewMetrics creates the metrics and registers them with reg (nil: not
// registered, for tests).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Opened: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_opened_total",
			Help: "TCP connections opened (node proxy and kernel path)."}, Labels),
		Closed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_closed_total",
			Help: "TCP connections closed (node proxy and kernel path)."}, Labels),
		Failed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_failed_total",
			Help: "TCP connections that failed to connect (kernel path: refused, reset or timed out before established)."}, Labels),
		Received: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_received_bytes_total",
			Help: "Bytes from client to server, reported while connections are open (every few seconds) and when they close."}, Labels),
		Sent: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_sent_bytes_total",
			Help: "Bytes from server to client, reported while connections are open (every few seconds) and when they close."}, Labels),
		EventsDropped: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kmesh_telemetry_events_dropped_total",
			Help: "Kernel-path connection events lost, by reason (ring_buffer_full: counted by the kernel; table_full: too many open connections tracked)."},
			[]string{"reason"}),
		LogsDropped: prometheus.NewCounter(prometheus.CounterOpts{Name: "kmesh_access_log_dropped_total",
			Help: "Access log lines suppressed by the rate limit."}),
	}
	m.SocketsOpen = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "istio_tcp_sockets_open",
		Help: "TCP connections open now (node proxy and kernel path), by reporter."}, []string{"reporter"})
	if reg != nil {
		reg.MustRegister(m.Opened, m.Closed, m.Failed, m.Received, m.Sent, m.EventsDropped, m.LogsDropped, m.SocketsOpen)
	}
	return m
}

// Peer is one end of a connection as the metrics and logs name it; empty
// fields are reported as "unknown".
type Peer struct {
	Workload, Namespace, Principal string
	CanonicalService, CanonicalRev string
	App, Version, Cluster          string
}

// Conn is one connection, for labels and the access log.
type Conn struct {
	// Reporter is "source" (the client's side reports) or "destination".
	Reporter string
	Src, Dst Peer
	// DstService is the destination service's hostname, with its namespace
	// and short name; empty when the connection went to a workload.
	DstService, DstServiceNamespace, DstServiceName string
	// MTLS: the connection was carried over HBONE.
	MTLS bool
	// ResponseFlags is Istio's flag ("-" when empty): CONNECT for a
	// connect that failed, DENY for a refused one.
	ResponseFlags string
	// For the access log.
	SrcAddr, DstAddr string
	// SrcAddrPort and DstAddrPort stand for SrcAddr and DstAddr when those
	// are empty: the kernel path keeps addresses unformatted, since most
	// of its records never reach the (rate-limited) log.
	SrcAddrPort, DstAddrPort netip.AddrPort
	Direction                string // "inbound" or "outbound"
}

// Addrs are the source and destination addresses as the log prints them.
func (c *Conn) Addrs() (src, dst string) {
	src, dst = c.SrcAddr, c.DstAddr
	if src == "" && c.SrcAddrPort.IsValid() {
		src = c.SrcAddrPort.String()
	}
	if dst == "" && c.DstAddrPort.IsValid() {
		dst = c.DstAddrPort.String()
	}
	return src, dst
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// SecurityPolicy is connection_security_policy: ztunnel reports
// mutual_tls for HBONE and unknown for plaintext.
func (c *Conn) SecurityPolicy() string {
	if c.MTLS {
		return "mutual_tls"
	}
	return "unknown"
}

// Labels are the connection's metric labels.
func (c *Conn) Labels() prometheus.Labels {
	flags := c.ResponseFlags
	if flags == "" {
		flags = "-"
	}
	return prometheus.Labels{
		"reporter":                       orUnknown(c.Reporter),
		"source_workload":                orUnknown(c.Src.Workload),
		"source_canonical_service":       orUnknown(c.Src.CanonicalService),
		"source_canonical_revision":      orUnknown(c.Src.CanonicalRev),
		"source_workload_namespace":      orUnknown(c.Src.Namespace),
		"source_principal":               orUnknown(c.Src.Principal),
		"source_app":                     orUnknown(c.Src.App),
		"source_version":                 orUnknown(c.Src.Version),
		"source_cluster":                 orUnknown(c.Src.Cluster),
		"destination_service":            orUnknown(c.DstService),
		"destination_service_namespace":  orUnknown(c.DstServiceNamespace),
		"destination_service_name":       orUnknown(c.DstServiceName),
		"destination_workload":           orUnknown(c.Dst.Workload),
		"destination_canonical_service":  orUnknown(c.Dst.CanonicalService),
		"destination_canonical_revision": orUnknown(c.Dst.CanonicalRev),
		"destination_workload_namespace": orUnknown(c.Dst.Namespace),
		"destination_principal":          orUnknown(c.Dst.Principal),
		"destination_app":                orUnknown(c.Dst.App),
		"destination_version":            orUnknown(c.Dst.Version),
		"destination_cluster":            orUnknown(c.Dst.Cluster),
		"request_protocol":               "tcp",
		"response_flags":                 flags,
		"connection_security_policy":     c.SecurityPolicy(),
	}
}

// Open counts an opened connection and returns its labels' series, for
// Add and Close.
func (m *Metrics) Open(c *Conn) *Series {
	s := m.series(c)
	s.open()
	return s
}

// Series is one connection's counters, resolved once.
type Series struct {
	opened, closed, received, sent prometheus.Counter
	sockets                        prometheus.Gauge
}

// open counts a connection opened and open.
func (s *Series) open() {
	s.opened.Inc()
	s.sockets.Inc()
}

func (m *Metrics) series(c *Conn) *Series {
	k := seriesKey{reporter: c.Reporter, src: c.Src, dst: c.Dst, dstService: c.DstService,
		dstServiceNamespace: c.DstServiceNamespace, dstServiceName: c.DstServiceName, mtls: c.MTLS, responseFlags: c.ResponseFlags}
	m.mu.Lock()
	s := m.cache[k]
	m.mu.Unlock()
	if s != nil {
		return s
	}
	l := c.Labels()
	s = &Series{opened: m.Opened.With(l), closed: m.Closed.With(l), received: m.Received.With(l), sent: m.Sent.With(l),
		sockets: m.SocketsOpen.WithLabelValues(l["reporter"])}
	m.mu.Lock()
	if m.cache == nil || len(m.cache) >= maxCachedSeries {
		m.cache = make(map[seriesKey]*Series)
	}
	m.cache[k] = s
	m.mu.Unlock()
	return s
}

// Add reports bytes moved since the last report: received from the client,
// sent back to it.
func (s *Series) Add(received, sent uint64) {
	if received > 0 {
		s.received.Add(float64(received))
	}
	if sent > 0 {
		s.sent.Add(float64(sent))
	}
}

// Close counts the connection closed, with the bytes not yet reported.
func (s *Series) Close(received, sent uint64) {
	s.Add(received, sent)
	s.closed.Inc()
	s.sockets.Dec()
}

// Fail counts a connection that never opened.
func (m *Metrics) Fail(c *Conn) {
	m.Failed.With(c.Labels()).Inc()
}
