package agent

import (
	"runtime/debug"

	"github.com/prometheus/client_golang/prometheus"
)

// Version is the daemon's release, set at link time
// (-X kmesh.dev/kmesh/ambient/agent.Version=...); empty: the VCS revision
// the binary was built from.
var Version string

// ztunnelCompatMetrics are series Istio's ztunnel dashboard reads, with
// what Kmesh has for them (TestPrivilegedSimTelemetryExport checks every
// selector of the dashboard against a real daemon's scrape):
//   - istio_build{component="ztunnel",tag}: the "versions" panel. The
//     component is the slot Kmesh fills (the dashboard filters on it); the
//     tag is Kmesh's own version.
//   - workload_manager_active_proxy_count: pods this node serves.
func (a *Agent) ztunnelCompatMetrics() []prometheus.Collector {
	build := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "istio_build",
		Help: "Build of the node proxy in ztunnel's slot (component ztunnel; tag is Kmesh's version)."}, []string{"component", "tag"})
	build.WithLabelValues("ztunnel", version()).Set(1)
	active := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "workload_manager_active_proxy_count",
		Help: "Pods enrolled on this node (ztunnel: in-pod proxies running)."}, func() float64 { return float64(a.enr.count()) })
	return []prometheus.Collector{build, active}
}

func version() string {
	if Version != "" {
		return Version
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				return s.Value[:12]
			}
		}
	}
	return "unknown"
}

// dataplaneCollector exports the data path's own counters: the kernel's
// per-CPU event counters and the user-space writer's.
func (a *Agent) dataplaneCollector() prometheus.Collector {
	return &dpCollector{a: a,
		kernel: prometheus.NewDesc("kmesh_datapath_events_total", "Data path events counted in the kernel, by event.", []string{"event"}, nil),
		writes: prometheus.NewDesc("kmesh_dataplane_writes_total", "Objects written to the kernel maps, by kind.", []string{"kind"}, nil),
		errs:   prometheus.NewDesc("kmesh_dataplane_errors_total", "Objects the kernel refused (previous state kept), by cause.", []string{"cause"}, nil),
		fill:   prometheus.NewDesc("kmesh_map_capacity", "max_entries of each sized kernel map.", []string{"map"}, nil),
		authz: prometheus.NewDesc("kmesh_authz_workloads", "Local workloads with authorization policies, by where same-node "+
			"connections to them are authorized: kernel (at connect) or tunnel (the kernel cannot hold their policies; "+
			"the daemon logs why, once per workload and reason).", []string{"where"}, nil),
		unfit: prometheus.NewDesc("kmesh_authz_entries_unfit_total", "Same-node authorization entries the kernel did not take "+
			"(those source/destination pairs take the tunnel).", nil, nil),
	}
}

type dpCollector struct {
	a                          *Agent
	kernel, writes, errs, fill *prometheus.Desc
	authz, unfit               *prometheus.Desc
}

func (c *dpCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.kernel
	ch <- c.writes
	ch <- c.errs
	ch <- c.fill
	ch <- c.authz
	ch <- c.unfit
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
	ch <- prometheus.MustNewConstMetric(c.authz, prometheus.GaugeValue, float64(s.AuthzKernel.Load()), "kernel")
	ch <- prometheus.MustNewConstMetric(c.authz, prometheus.GaugeValue, float64(s.AuthzTunnel.Load()), "tunnel")
	ch <- prometheus.MustNewConstMetric(c.unfit, prometheus.CounterValue, float64(s.AuthzUnfit.Load()))
	for name, n := range c.a.DP.Maps.MaxEntries() {
		ch <- prometheus.MustNewConstMetric(c.fill, prometheus.GaugeValue, float64(n), name)
	}
}
