package tunnel

import (
	"github.com/prometheus/client_golang/prometheus"
)

// connLabels are Istio's standard TCP metric labels (the subset a node
// proxy knows without L7): dashboards built for ztunnel work unchanged.
var connLabels = []string{
	"reporter",
	"source_workload", "source_workload_namespace", "source_principal",
	"destination_workload", "destination_workload_namespace", "destination_principal", "destination_service",
	"connection_security_policy",
}

type metrics struct {
	opened, closed *prometheus.CounterVec
	// received: bytes from client to server; sent: server to client
	// (Istio's convention), added when a connection ends.
	received, sent *prometheus.CounterVec
	refused        *prometheus.CounterVec
	pooled         prometheus.Gauge
	handshakes     *prometheus.CounterVec
	// hboneErrors: limits HBONE peers hit and protocol errors they made
	// (hbone.Reason*), by direction.
	hboneErrors *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		opened: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_opened_total",
			Help: "TCP connections opened through the node proxy."}, connLabels),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_closed_total",
			Help: "TCP connections closed by the node proxy."}, connLabels),
		received: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_received_bytes_total",
			Help: "Bytes from client to server, counted when a connection closes."}, connLabels),
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_sent_bytes_total",
			Help: "Bytes from server to client, counted when a connection closes."}, connLabels),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kmesh_tunnel_refused_total",
			Help: "Connections and CONNECT requests the node proxy refused, by direction and reason."}, []string{"direction", "reason"}),
		pooled: prometheus.NewGauge(prometheus.GaugeOpts{Name: "kmesh_tunnel_pooled_connections",
			Help: "Outbound HBONE connections held open for reuse."}),
		handshakes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kmesh_tunnel_handshakes_total",
			Help: "TLS handshakes of HBONE connections, by direction."}, []string{"direction"}),
		hboneErrors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kmesh_hbone_connection_errors_total",
			Help: "HTTP/2 limits HBONE peers hit and protocol errors they made (streams reset or connections closed for it), by direction and reason."},
			[]string{"direction", "reason"}),
	}
	if reg != nil {
		reg.MustRegister(m.opened, m.closed, m.received, m.sent, m.refused, m.pooled, m.handshakes, m.hboneErrors)
	}
	return m
}

// countHBONE is an hbone.Config.CountError for one direction.
func (m *metrics) countHBONE(direction string) func(reason string) {
	return func(reason string) { m.hboneErrors.WithLabelValues(direction, reason).Inc() }
}

// connReport is one proxied connection, for Istio's TCP metrics.
type connReport struct {
	reporter                     string
	srcWorkload, srcNS, srcPrinc string
	dstWorkload, dstNS, dstPrinc string
	dstService                   string
	mtls                         bool
}

func (r *connReport) labels() prometheus.Labels {
	policy := "unknown"
	if r.mtls {
		policy = "mutual_tls"
	}
	or := func(s string) string {
		if s == "" {
			return "unknown"
		}
		return s
	}
	return prometheus.Labels{
		"reporter":                       r.reporter,
		"source_workload":                or(r.srcWorkload),
		"source_workload_namespace":      or(r.srcNS),
		"source_principal":               or(r.srcPrinc),
		"destination_workload":           or(r.dstWorkload),
		"destination_workload_namespace": or(r.dstNS),
		"destination_principal":          or(r.dstPrinc),
		"destination_service":            or(r.dstService),
		"connection_security_policy":     policy,
	}
}

func (m *metrics) open(r *connReport) prometheus.Labels {
	l := r.labels()
	m.opened.With(l).Inc()
	return l
}

func (m *metrics) close(l prometheus.Labels, received, sent int64) {
	m.closed.With(l).Inc()
	m.received.With(l).Add(float64(received))
	m.sent.With(l).Add(float64(sent))
}
