package xds

import "github.com/prometheus/client_golang/prometheus"

// Metrics of the xDS client. Names follow ztunnel's where ztunnel has one.
type Metrics struct {
	Messages     *prometheus.CounterVec
	MessageBytes *prometheus.CounterVec
	Terminations *prometheus.CounterVec
	Rejections   *prometheus.CounterVec
	ApplySeconds *prometheus.HistogramVec
	// InitialSync is the time from starting the client to the first full
	// state applied (every type answered once).
	InitialSync prometheus.Gauge
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
			// 25% steps from 20 us to ~1.5 s: fine enough for p50/p99 of single updates.
			Buckets: prometheus.ExponentialBuckets(0.00002, 1.25, 50),
		}, []string{"url"}),
		InitialSync: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kmesh_xds_initial_sync_seconds", Help: "Time from start to the first full control-plane state in the kernel.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.Messages, m.MessageBytes, m.Terminations, m.Rejections, m.ApplySeconds, m.InitialSync)
	}
	return m
}
