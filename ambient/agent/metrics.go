package agent

import "github.com/prometheus/client_golang/prometheus"

// dataplaneCollector exports the data path's own counters: the kernel's
// per-CPU event counters and the user-space writer's.
func (a *Agent) dataplaneCollector() prometheus.Collector {
	return &dpCollector{a: a,
		kernel: prometheus.NewDesc("kmesh_datapath_events_total", "Data path events counted in the kernel, by event.", []string{"event"}, nil),
		writes: prometheus.NewDesc("kmesh_dataplane_writes_total", "Objects written to the kernel maps, by kind.", []string{"kind"}, nil),
		errs:   prometheus.NewDesc("kmesh_dataplane_errors_total", "Objects the kernel refused (previous state kept), by cause.", []string{"cause"}, nil),
		fill:   prometheus.NewDesc("kmesh_map_capacity", "max_entries of each sized kernel map.", []string{"map"}, nil),
	}
}

type dpCollector struct {
	a                          *Agent
	kernel, writes, errs, fill *prometheus.Desc
}

func (c *dpCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.kernel
	ch <- c.writes
	ch <- c.errs
	ch <- c.fill
}

func (c *dpCollector) Collect(ch chan<- prometheus.Metric) {
	if st, err := c.a.DP.Maps.Stats(); err == nil {
		for name, v := range st {
			ch <- prometheus.MustNewConstMetric(c.kernel, prometheus.CounterValue, float64(v), name)
		}
	}
	s := &c.a.Plane.Stats
	ch <- prometheus.MustNewConstMetric(c.writes, prometheus.CounterValue, float64(s.ServiceWrites.Load()), "service")
	ch <- prometheus.MustNewConstMetric(c.writes, prometheus.CounterValue, float64(s.WorkloadWrites.Load()), "workload")
	full := s.MapFull.Load()
	ch <- prometheus.MustNewConstMetric(c.errs, prometheus.CounterValue, float64(full), "map_full")
	ch <- prometheus.MustNewConstMetric(c.errs, prometheus.CounterValue, float64(s.Errors.Load()-full), "other")
	for name, n := range c.a.DP.Maps.MaxEntries() {
		ch <- prometheus.MustNewConstMetric(c.fill, prometheus.GaugeValue, float64(n), name)
	}
}
