package dnsproxy

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are ztunnel's DNS series (src/dns/metrics.rs), with its labels:
// request_query_type (lower case: "a", "aaaa", …), request_protocol
// ("udp", "tcp"), source_canonical_service, source_canonical_revision
// ("unknown" when not known). Plus Kmesh's own counters of what the bounds
// refused.
type Metrics struct {
	Requests         *prometheus.CounterVec
	UpstreamRequests *prometheus.CounterVec
	UpstreamFailures *prometheus.CounterVec
	UpstreamDuration *prometheus.HistogramVec
	Refused          *prometheus.CounterVec
	// Listeners counts pods' DNS socket pairs at enrolment by how they came.
	Listeners *prometheus.CounterVec
}

var dnsLabels = []string{"request_query_type", "request_protocol", "source_canonical_service", "source_canonical_revision"}

// NewMetrics registers the DNS metrics on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_dns_requests_total",
			Help: "Total number of DNS requests (unstable)"}, dnsLabels),
		UpstreamRequests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_dns_upstream_requests_total",
			Help: "Total number of DNS requests forwarded to upstream (unstable)"}, dnsLabels),
		UpstreamFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_dns_upstream_failures_total",
			Help: "Total number of DNS requests that failed to forward upstream (unstable)"}, dnsLabels),
		UpstreamDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "istio_dns_upstream_request_duration_seconds",
			Help:    "Total time in seconds Istio takes to get DNS response from upstream (unstable)",
			Buckets: []float64{0.001, 0.005, 0.01, 0.1, 1, 5}}, dnsLabels),
		Refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kmesh_dns_refused_total",
			Help: "DNS messages not answered normally, by reason: formerr (malformed), overload (per-pod bound hit)."}, []string{"reason"}),
		Listeners: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kmesh_dns_listeners_total",
			Help: "Pods' DNS socket pairs (UDP and TCP of one address) at enrolment, by how: reused (kept by the listener holder across a restart), opened, refused (a held socket that was not the pod's)."}, []string{"how"}),
	}
	if reg != nil {
		reg.MustRegister(m.Requests, m.UpstreamRequests, m.UpstreamFailures, m.UpstreamDuration, m.Refused, m.Listeners)
	}
	return m
}

func (m *Metrics) listener(how string) {
	if m != nil {
		m.Listeners.WithLabelValues(how).Inc()
	}
}

func (m *Metrics) request(l [4]string) {
	if m != nil {
		m.Requests.WithLabelValues(l[:]...).Inc()
	}
}

func (m *Metrics) upstream(l [4]string, d time.Duration, failed bool) {
	if m == nil {
		return
	}
	m.UpstreamRequests.WithLabelValues(l[:]...).Inc()
	m.UpstreamDuration.WithLabelValues(l[:]...).Observe(d.Seconds())
	if failed {
		m.UpstreamFailures.WithLabelValues(l[:]...).Inc()
	}
}

func (m *Metrics) formErr() {
	if m != nil {
		m.Refused.WithLabelValues("formerr").Inc()
	}
}

func (m *Metrics) dropped() {
	if m != nil {
		m.Refused.WithLabelValues("overload").Inc()
	}
}
