package otelexport

import (
	"context"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func env(kv ...string) func(string) string {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) string { return m[k] }
}

// Which signals run for a given environment. Catches the SDK's default
// ("otlp" when nothing is set) leaking in: a daemon with no OTEL_*
// configuration must not start exporters.
func TestSelection(t *testing.T) {
	for _, tc := range []struct {
		name            string
		env             func(string) string
		metrics, traces bool
		err             string
	}{
		{"nothing set: off", env(), false, false, ""},
		{"endpoint: both", env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"), true, true, ""},
		{"metrics endpoint only", env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://127.0.0.1:4318/v1/metrics"), true, false, ""},
		{"traces named, no endpoint (SDK default endpoint)", env("OTEL_TRACES_EXPORTER", "otlp"), false, true, ""},
		{"none wins over an endpoint", env("OTEL_EXPORTER_OTLP_ENDPOINT", "x", "OTEL_METRICS_EXPORTER", "none"), false, true, ""},
		{"SDK disabled", env("OTEL_EXPORTER_OTLP_ENDPOINT", "x", "OTEL_SDK_DISABLED", "true"), false, false, ""},
		{"console refused", env("OTEL_METRICS_EXPORTER", "console"), false, false, "only otlp or none"},
		{"http/json refused", env("OTEL_TRACES_EXPORTER", "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"), false, false, "grpc or http/protobuf"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, err := Start(context.Background(), Config{Gatherer: prometheus.NewRegistry(), Getenv: tc.env})
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer e.Shutdown(context.Background())
			if (e.mp != nil) != tc.metrics || (e.Tracer != nil) != tc.traces {
				t.Fatalf("metrics %v traces %v, want %v %v", e.mp != nil, e.Tracer != nil, tc.metrics, tc.traces)
			}
		})
	}
}

func TestProtocol(t *testing.T) {
	for _, tc := range []struct {
		env  func(string) string
		want string
	}{
		{env(), "http/protobuf"}, // the specification's default
		{env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"), "grpc"},
		{env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf"), "http/protobuf"},
	} {
		if got, err := protocol(tc.env, "METRICS"); err != nil || got != tc.want {
			t.Errorf("protocol = %q, %v; want %q", got, err, tc.want)
		}
	}
}

// The resource names the daemon, and OTEL_RESOURCE_ATTRIBUTES overrides.
func TestResource(t *testing.T) {
	t.Setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.cluster.name=prod,k8s.node.name=override")
	r, err := newResource(context.Background(), Config{Node: "node-1", Pod: "ztunnel-abc", Namespace: "istio-system"})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, kv := range r.Attributes() {
		got[string(kv.Key)] = kv.Value.Emit()
	}
	for k, v := range map[string]string{"service.name": "kmesh", "k8s.pod.name": "ztunnel-abc", "k8s.namespace.name": "istio-system",
		"k8s.cluster.name": "prod", "k8s.node.name": "override"} {
		if got[k] != v {
			t.Errorf("%s = %q, want %q (all: %v)", k, got[k], v, got)
		}
	}
}
