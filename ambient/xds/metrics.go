package xds

import "github.com/prometheus/client_golang/prometheus"

// Metrics of the xDS client. Names follow ztunnel's where ztunnel has one.
type Metrics struct {
	Messages     *prometheus.CounterVec
	MessageBytes *prometheus.CounterVec
	Terminations *prometheus.CounterVec
	Rejections   *prometheus.CounterVec
	ApplySeconds *prometheus.HistogramVec
}

// NewMetrics creates the metrics and registers them with reg (if not nil).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_xds_message_total", Help: "xDS responses received, by type URL.",
		}, []string{"url"}),
		MessageBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_xds_message_bytes_total", Help: "Bytes of xDS responses received, by type URL.",
		}, []string{"url"}),
		Terminations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_xds_connection_terminations_total", Help: "xDS streams that ended, by reason.",
		}, []string{"reason"}),
		Rejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kmesh_xds_rejected_resources_total", Help: "Resources NACKed (not applied), by type URL.",
		}, []string{"url"}),
		ApplySeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "kmesh_xds_apply_seconds", Help: "Time to apply one xDS response to state and kernel maps.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 18),
		}, []string{"url"}),
	}
	if reg != nil {
		reg.MustRegister(m.Messages, m.MessageBytes, m.Terminations, m.Rejections, m.ApplySeconds)
	}
	return m
}
