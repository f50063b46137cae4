package identity

import (
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics of a Manager. The certificate gauges are computed at scrape
// time, so expiry is exact without a ticker.
type metrics struct {
	csr *prometheus.CounterVec
}

var (
	certsDesc = prometheus.NewDesc("kmesh_identity_certificates",
		"Workload certificates held that are valid now.", nil, nil)
	expiryDesc = prometheus.NewDesc("kmesh_identity_certificate_expiry_seconds",
		"Seconds until the soonest-expiring held certificate expires (absent when none is held).", nil, nil)
)

func newMetrics(reg prometheus.Registerer, m *Manager) *metrics {
	out := &metrics{
		csr: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "kmesh", Subsystem: "identity", Name: "csr_requests_total",
			Help: "Certificate signing requests sent to the CA, by result: success, refused (the CA said no), " +
				"unavailable (no answer), invalid (the answer was unusable), error (anything else).",
		}, []string{"result"}),
	}
	for _, r := range []string{"success", "refused", "unavailable", "invalid", "error"} {
		out.csr.WithLabelValues(r)
	}
	if reg != nil {
		reg.MustRegister(out.csr, certCollector{m})
	}
	return out
}

// result classifies a fetch outcome for the csr counter.
func result(err error) string {
	var chain *ChainError
	switch {
	case err == nil:
		return "success"
	case errors.Is(err, ErrCARefused):
		return "refused"
	case errors.Is(err, ErrCAUnavailable):
		return "unavailable"
	case errors.As(err, &chain):
		return "invalid"
	}
	return "error"
}

type certCollector struct{ m *Manager }

func (c certCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- certsDesc
	ch <- expiryDesc
}

func (c certCollector) Collect(ch chan<- prometheus.Metric) {
	n, soonest := c.m.held(time.Now())
	ch <- prometheus.MustNewConstMetric(certsDesc, prometheus.GaugeValue, float64(n))
	if n > 0 {
		ch <- prometheus.MustNewConstMetric(expiryDesc, prometheus.GaugeValue, time.Until(soonest).Seconds())
	}
}
