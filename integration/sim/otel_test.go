package sim_test

import (
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"

	"kmesh.dev/kmesh/integration/otelcol"
	"kmesh.dev/kmesh/integration/sim"
)

// istioModuleDir is where the pinned istio.io/istio module is (for its
// Grafana dashboards).
func istioModuleDir(t *testing.T) string {
	t.Helper()
	out, err := goList("-m", "-f", "{{.Dir}}", "istio.io/istio")
	if err != nil || out == "" {
		t.Fatalf("locating the istio.io/istio module: %v %s", err, out)
	}
	return out
}

// Telemetry leaves the node the ways operators collect it, checked
// against real receivers:
//   - OTLP to a real OpenTelemetry Collector, node-1's daemon over gRPC
//     and node-2's over HTTP: every istio_tcp_* series the daemon serves
//     arrives with the same attributes and values, kmesh_* and istio_xds_*
//     arrive too, with the daemon's resource attributes;
//   - a span per tunnelled connection: the client span on node-1 and the
//     server span on node-2 in one trace, the server's parent the client
//     span (the traceparent crossed HBONE);
//   - Istio's ztunnel Grafana dashboard: each selector it queries matches
//     series of a real daemon's scrape, or is a listed difference.
func TestPrivilegedSimTelemetryExport(t *testing.T) {
	start := time.Now()
	bin, err := otelcol.Build()
	if err != nil {
		t.Fatalf("the OpenTelemetry Collector this test sends to could not be built: %v", err)
	}
	t.Logf("collector ready in %s (cached: %s)", time.Since(start).Round(time.Millisecond), bin)
	col, err := otelcol.Start(bin, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("--- collector log:\n%s", col.Log())
		}
		col.Close()
	})
	c := startClusterWith(t, sim.Options{Nodes: 2, Objects: objects,
		// Short intervals: the test reads what arrived within seconds.
		DaemonEnv: []string{"OTEL_METRIC_EXPORT_INTERVAL=300", "OTEL_BSP_SCHEDULE_DELAY=100",
			"OTEL_RESOURCE_ATTRIBUTES=k8s.cluster.name=sim"},
		NodeEnv: func(node string) []string {
			if node == "node-1" {
				return []string{"OTEL_EXPORTER_OTLP_PROTOCOL=grpc", "OTEL_EXPORTER_OTLP_ENDPOINT=http://" + col.GRPC}
			}
			return []string{"OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT=http://" + col.HTTP}
		}})
	create(t, c,
		echoPod("demo", "web-0", "node-2", map[string]string{"app": "web"}),
		clientPod("demo", "client", "node-1"),
	)
	client, _ := c.Pod("demo", "client")
	eventually(t, "traffic through the VIP to the other node", func() (bool, string) {
		return sameKeys(httpFrom(t, client, "http://10.96.0.10/", 3), "web-0")
	})
	// One connection per request: each is a tunnelled connection.
	const n = 7
	if res := httpFrom(t, client, "http://10.96.0.10/", n); res.Names["web-0"] != n {
		t.Fatalf("%d requests: %+v", n, res)
	}

	t.Run("metrics", func(t *testing.T) {
		for _, node := range c.Nodes {
			var last string
			ok := poll(20*time.Second, func() bool {
				scrape := scrapeDaemon(t, node)
				pts, err := col.Metrics()
				if err != nil {
					t.Fatal(err)
				}
				last = ""
				for _, name := range []string{"istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
					"istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total"} {
					want := series(scrape[name])
					got := map[string]float64{}
					for k, p := range otelcol.Latest(pts, name, map[string]string{"k8s.node.name": node.Name}) {
						got[k] = p.Value
					}
					if len(want) == 0 || !maps.Equal(want, got) {
						last += fmt.Sprintf("\n%s: daemon %v\n  collector %v", name, want, got)
					}
				}
				return last == ""
			})
			if !ok {
				t.Fatalf("%s: the collector's istio_tcp_* series differ from the daemon's /metrics:%s", node.Name, last)
			}
		}
		pts, _ := col.Metrics()
		src := otelcol.Latest(pts, "istio_tcp_connections_opened_total", map[string]string{"k8s.node.name": "node-1", "reporter": "source"})
		dst := otelcol.Latest(pts, "istio_tcp_connections_opened_total", map[string]string{"k8s.node.name": "node-2", "reporter": "destination"})
		if !hasSeries(src, n, map[string]string{"connection_security_policy": "mutual_tls", "source_workload_namespace": "demo",
			"destination_principal": "spiffe://cluster.local/ns/demo/sa/web"}) {
			t.Errorf("node-1: no source series with >= %d mTLS connections to web: %v", n, src)
		}
		if !hasSeries(dst, n, map[string]string{"connection_security_policy": "mutual_tls", "destination_workload_namespace": "demo",
			"source_principal": "spiffe://cluster.local/ns/demo/sa/default"}) {
			t.Errorf("node-2: no destination series with >= %d mTLS connections from the client: %v", n, dst)
		}
		names := map[string]map[string]string{}
		for _, p := range pts {
			names[p.Name] = p.Resource
		}
		for _, want := range []string{"kmesh_tunnel_handshakes_total", "istio_xds_message_total", "kmesh_map_capacity", "istio_build"} {
			if names[want] == nil {
				t.Errorf("%s did not reach the collector", want)
			}
		}
		res := names["istio_tcp_connections_opened_total"]
		for k, v := range map[string]string{"service.name": "kmesh", "k8s.namespace.name": "istio-system", "k8s.cluster.name": "sim"} {
			if res[k] != v {
				t.Errorf("resource %s = %q, want %q (resource %v)", k, res[k], v, res)
			}
		}
		if !strings.HasPrefix(res["k8s.pod.name"], "ztunnel-node-") {
			t.Errorf("resource k8s.pod.name = %q, want the daemon's pod", res["k8s.pod.name"])
		}
	})

	t.Run("spans", func(t *testing.T) {
		var client, server []otelcol.Span
		var pairs int
		poll(20*time.Second, func() bool {
			spans, err := col.Spans()
			if err != nil {
				t.Fatal(err)
			}
			client, server = nil, nil
			for _, s := range spans {
				switch {
				case s.Kind == 3 && s.Resource["k8s.node.name"] == "node-1":
					client = append(client, s)
				case s.Kind == 2 && s.Resource["k8s.node.name"] == "node-2":
					server = append(server, s)
				}
			}
			pairs = 0
			for _, cs := range client {
				for _, ss := range server {
					if ss.TraceID == cs.TraceID && ss.ParentSpanID == cs.SpanID {
						pairs++
					}
				}
			}
			return pairs >= n
		})
		if pairs < n {
			t.Fatalf("%d client spans on node-1, %d server spans on node-2, %d in the same trace as parent and child; want >= %d\nclient %v\nserver %v",
				len(client), len(server), pairs, n, client, server)
		}
		cs := client[len(client)-1]
		for k, v := range map[string]string{"network.peer.port": "15008", "server.address": "10.96.0.10", "server.port": "80", "destination.port": "8080",
			"network.transport": "tcp", "source.workload.namespace": "demo", "destination.principal": "spiffe://cluster.local/ns/demo/sa/web",
			"http.response.status_code": "200"} {
			if cs.Attrs[k] != v {
				t.Errorf("client span %s = %q, want %q (%v)", k, cs.Attrs[k], v, cs.Attrs)
			}
		}
		ss := server[len(server)-1]
		for k, v := range map[string]string{"server.port": "8080", "network.transport": "tcp",
			"source.principal": "spiffe://cluster.local/ns/demo/sa/default", "destination.workload.namespace": "demo"} {
			if ss.Attrs[k] != v {
				t.Errorf("server span %s = %q, want %q (%v)", k, ss.Attrs[k], v, ss.Attrs)
			}
		}
		if cs.StatusCode == 2 || ss.StatusCode == 2 {
			t.Errorf("completed connections' spans carry an error status: client %d server %d", cs.StatusCode, ss.StatusCode)
		}
	})

	t.Run("ztunnel-dashboard", func(t *testing.T) {
		checkZtunnelDashboard(t, istioModuleDir(t), c.Nodes)
	})
}

// dashboardKnownDifferences are the ztunnel dashboard's metrics no Kmesh
// daemon exports, and why.
var dashboardKnownDifferences = map[string]string{
	"container_memory_working_set_bytes":   "cAdvisor's (the kubelet's), not the proxy's: matches when the DaemonSet keeps container istio-proxy, as the chart and the istioctl profile do",
	"container_cpu_usage_seconds_total":    "cAdvisor's (the kubelet's), not the proxy's: as container_memory_working_set_bytes",
	"istio_dns_requests_total":             "Kmesh has no DNS proxy yet (ROADMAP); the panel stays empty",
	"workload_manager_pending_proxy_count": "enrolment is done while the ZDS add is acknowledged: there is no pending state to count",
	// Exported, but a labelled counter has no series before its first
	// event (ztunnel's neither): no xDS stream ended during the test.
	"istio_xds_connection_terminations_total": "exported from the first xDS stream that ends; none ended in this test",
}

// ztunnelTargetLabels are the labels Prometheus' Kubernetes pod discovery
// (Istio's sample config) puts on the daemon's series: the chart keeps
// ztunnel's pod name prefix, container name and app label.
func ztunnelTargetLabels(node *sim.Node) map[string]string {
	return map[string]string{"pod": "ztunnel-" + node.Name, "container": "istio-proxy", "app": "ztunnel", "namespace": "istio-system"}
}

func checkZtunnelDashboard(t *testing.T, istioDir string, nodes []*sim.Node) {
	b, err := os.ReadFile(filepath.Join(istioDir, "manifests/addons/dashboards/ztunnel-dashboard.gen.json"))
	if err != nil {
		t.Fatal(err)
	}
	exprs, vars := dashboardExprs(t, b)
	if len(exprs) < 10 {
		t.Fatalf("%d expressions in the ztunnel dashboard: the file's layout changed?", len(exprs))
	}
	// Every series the nodes' daemons serve, as Prometheus stores it.
	var stored []labels.Labels
	for _, node := range nodes {
		for name, mf := range scrapeDaemon(t, node) {
			for _, m := range mf.GetMetric() {
				l := ztunnelTargetLabels(node)
				l["__name__"] = name
				for _, lp := range m.GetLabel() {
					l[lp.GetName()] = lp.GetValue()
				}
				stored = append(stored, labels.FromMap(l))
			}
		}
	}
	p := parser.NewParser(parser.Options{})
	var matched, known int
	for _, e := range exprs {
		expr, err := p.ParseExpr(substitute(e, vars))
		if err != nil {
			t.Errorf("the dashboard's %q does not parse: %v", e, err)
			continue
		}
		for _, sel := range parser.ExtractSelectors(expr) {
			name := ""
			for _, m := range sel {
				if m.Name == "__name__" {
					name = m.Value
				}
			}
			if slices.ContainsFunc(stored, func(l labels.Labels) bool { return matchesAll(sel, l) }) {
				matched++
				continue
			}
			if why, ok := dashboardKnownDifferences[name]; ok {
				known++
				t.Logf("known difference: %s (%s): %s", name, selString(sel), why)
				continue
			}
			t.Errorf("the ztunnel dashboard selects %s and no series of the daemons matches", selString(sel))
		}
	}
	t.Logf("ztunnel dashboard: %d selectors match the daemons' series, %d are listed differences", matched, known)
}

// dashboardExprs are the PromQL expressions of a Grafana dashboard's
// panels (any depth: rows nest panels) and its template variables'
// current values.
func dashboardExprs(t *testing.T, b []byte) ([]string, map[string]string) {
	var d any
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatal(err)
	}
	var exprs []string
	vars := map[string]string{}
	var walk func(any)
	walk = func(o any) {
		switch v := o.(type) {
		case map[string]any:
			for k, x := range v {
				if s, ok := x.(string); ok && k == "expr" && s != "" {
					exprs = append(exprs, s)
				}
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	walk(d)
	if tl, ok := d.(map[string]any)["templating"].(map[string]any); ok {
		for _, v := range tl["list"].([]any) {
			m := v.(map[string]any)
			name, _ := m["name"].(string)
			val := ".*" // a variable with nothing chosen selects everything
			if cur, ok := m["current"].(map[string]any); ok {
				if s, ok := cur["value"].(string); ok && s != "" && s != "$__all" {
					val = s
				}
			}
			vars[name] = val
		}
	}
	return exprs, vars
}

var varRef = regexp.MustCompile(`\$\{?(\w+)\}?`)

// substitute replaces Grafana's variables: built-in intervals by a
// duration, the dashboard's own by their value.
func substitute(expr string, vars map[string]string) string {
	return varRef.ReplaceAllStringFunc(expr, func(ref string) string {
		name := strings.Trim(ref, "${}")
		if strings.HasPrefix(name, "__") {
			return "5m" // $__rate_interval, $__interval, $__range
		}
		if v, ok := vars[name]; ok {
			return v
		}
		return ".*"
	})
}

func matchesAll(sel []*labels.Matcher, l labels.Labels) bool {
	for _, m := range sel {
		if !m.Matches(l.Get(m.Name)) {
			return false
		}
	}
	return true
}

func selString(sel []*labels.Matcher) string {
	parts := make([]string, len(sel))
	for i, m := range sel {
		parts[i] = m.String()
	}
	return "{" + strings.Join(parts, ",") + "}"
}

// scrapeDaemon reads a daemon's /metrics.
func scrapeDaemon(t *testing.T, node *sim.Node) map[string]*dto.MetricFamily {
	t.Helper()
	text, err := node.Daemon.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		t.Fatalf("%s /metrics: %v", node.Name, err)
	}
	return mfs
}

// series keys a family's samples by their labels, as otelcol.Latest does.
func series(mf *dto.MetricFamily) map[string]float64 {
	out := map[string]float64{}
	for _, m := range mf.GetMetric() {
		parts := make([]string, 0, len(m.GetLabel()))
		for _, lp := range m.GetLabel() {
			parts = append(parts, lp.GetName()+"="+lp.GetValue())
		}
		slices.Sort(parts)
		out[strings.Join(parts, ",")] = m.GetCounter().GetValue() + m.GetGauge().GetValue()
	}
	return out
}

func hasSeries(pts map[string]otelcol.Point, atLeast float64, attrs map[string]string) bool {
	for _, p := range pts {
		if p.Value < atLeast {
			continue
		}
		ok := true
		for k, v := range attrs {
			if p.Attrs[k] != v {
				ok = false
			}
		}
		if ok {
			return true
		}
	}
	return false
}

func poll(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func goList(args ...string) (string, error) {
	out, err := exec.Command("go", append([]string{"list"}, args...)...).Output()
	return strings.TrimSpace(string(out)), err
}
