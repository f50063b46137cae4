// Package otelexport sends the daemon's telemetry to an OpenTelemetry
// collector over OTLP: every Prometheus series the daemon serves on
// /metrics (through the Prometheus bridge, so nothing is instrumented
// twice) and a span per tunnelled connection.
//
// It is configured only by the standard variables, so operators set it
// the way they set any OpenTelemetry SDK:
//
//	OTEL_SDK_DISABLED=true                   everything off
//	OTEL_METRICS_EXPORTER, OTEL_TRACES_EXPORTER   otlp | none
//	OTEL_EXPORTER_OTLP_[METRICS_|TRACES_]ENDPOINT, _PROTOCOL (grpc |
//	http/protobuf), _HEADERS, _TIMEOUT, _INSECURE, _CERTIFICATE, ...
//	OTEL_METRIC_EXPORT_INTERVAL, OTEL_BSP_*, OTEL_TRACES_SAMPLER[_ARG]
//	OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
//
// Unlike the SDK's default ("otlp" to localhost), a signal is off unless
// its exporter is named or an OTLP endpoint is set: a node proxy that
// started dialling localhost:4318 after an upgrade would be a surprise.
//
// The exporters are picked here rather than by contrib's autoexport: it
// also links the Prometheus, stdout and log exporters, and its metric
// producer is process-wide state, where the daemon's registry is per
// agent.
package otelexport

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	promb "go.opentelemetry.io/contrib/bridges/prometheus"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetricgrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetrichttp"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// ScopeName is the instrumentation scope of the daemon's spans.
const ScopeName = "kmesh.dev/kmesh/ambient/tunnel"

// Config is what the export needs from the daemon.
type Config struct {
	// Gatherer is the daemon's registry (what /metrics serves).
	Gatherer prometheus.Gatherer
	// Node, Pod and Namespace become k8s.node.name, k8s.pod.name and
	// k8s.namespace.name (the daemon's own pod).
	Node, Pod, Namespace string
	// Getenv reads the OTEL_* selection (default os.Getenv). The OTLP
	// exporters read their own variables from the process environment.
	Getenv func(string) string
	Log    *slog.Logger
}

// Exporter is the running export. The zero value (and nil) is "off".
type Exporter struct {
	mp *sdkmetric.MeterProvider
	tp *sdktrace.TracerProvider
	// Tracer makes the tunnel's spans; nil when traces are off, which the
	// tunnel takes as "no span work at all".
	Tracer trace.Tracer
}

// Start sets up what the environment asks for. It returns an Exporter
// with nothing running when telemetry export is not configured.
func Start(ctx context.Context, cfg Config) (*Exporter, error) {
	getenv := cfg.Getenv
	if getenv == nil {
		getenv = os.Getenv
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	e := &Exporter{}
	if strings.EqualFold(strings.TrimSpace(getenv("OTEL_SDK_DISABLED")), "true") {
		return e, nil
	}
	metricsOn, err := enabled(getenv, "METRICS")
	if err != nil {
		return nil, err
	}
	tracesOn, err := enabled(getenv, "TRACES")
	if err != nil {
		return nil, err
	}
	if !metricsOn && !tracesOn {
		return e, nil
	}
	res, err := newResource(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if metricsOn {
		exp, proto, err := metricExporter(ctx, getenv)
		if err != nil {
			return nil, err
		}
		// The reader pulls the registry at each export interval
		// (OTEL_METRIC_EXPORT_INTERVAL, 60 s by default): no series is
		// instrumented twice, and between exports nothing runs.
		r := sdkmetric.NewPeriodicReader(exp, sdkmetric.WithProducer(promb.NewMetricProducer(promb.WithGatherer(cfg.Gatherer))))
		e.mp = sdkmetric.NewMeterProvider(sdkmetric.WithReader(r), sdkmetric.WithResource(res))
		cfg.Log.Info("exporting metrics over OTLP", "protocol", proto)
	}
	if tracesOn {
		exp, proto, err := traceExporter(ctx, getenv)
		if err != nil {
			_ = e.Shutdown(ctx)
			return nil, err
		}
		// The sampler comes from OTEL_TRACES_SAMPLER (default: parent-based,
		// always on): an inbound stream whose peer did not sample is not
		// sampled here either, so the two ends agree.
		e.tp = sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
		e.Tracer = e.tp.Tracer(ScopeName)
		cfg.Log.Info("exporting tunnel connection spans over OTLP", "protocol", proto)
	}
	return e, nil
}

// Shutdown exports what is pending (the last metric values, spans of
// connections that just ended) and stops, within ctx.
func (e *Exporter) Shutdown(ctx context.Context) error {
	if e == nil {
		return nil
	}
	var errs []error
	if e.tp != nil {
		errs = append(errs, e.tp.Shutdown(ctx))
	}
	if e.mp != nil {
		errs = append(errs, e.mp.Shutdown(ctx))
	}
	return errors.Join(errs...)
}

// enabled says whether a signal ("METRICS" or "TRACES") is to be exported.
func enabled(getenv func(string) string, signal string) (bool, error) {
	key := "OTEL_" + signal + "_EXPORTER"
	switch v := strings.ToLower(strings.TrimSpace(getenv(key))); v {
	case "none":
		return false, nil
	case "otlp":
		return true, nil
	case "":
		// The SDK default is otlp; ours is off unless an endpoint says
		// where to send (see the package comment).
		return getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || getenv("OTEL_EXPORTER_OTLP_"+signal+"_ENDPOINT") != "", nil
	default:
		// console and prometheus are not offered: the daemon already
		// serves Prometheus on /metrics and logs on stdout.
		return false, fmt.Errorf("%s=%q: only otlp or none are supported", key, v)
	}
}

// protocol is the OTLP protocol of a signal: its own variable, the
// general one, or the specification's default http/protobuf.
func protocol(getenv func(string) string, signal string) (string, error) {
	p := getenv("OTEL_EXPORTER_OTLP_" + signal + "_PROTOCOL")
	if p == "" {
		p = getenv("OTEL_EXPORTER_OTLP_PROTOCOL")
	}
	switch p = strings.TrimSpace(p); p {
	case "", "http/protobuf":
		return "http/protobuf", nil
	case "grpc":
		return p, nil
	default:
		return "", fmt.Errorf("OTLP protocol %q: grpc or http/protobuf are supported", p)
	}
}

// metricExporter: the OTLP exporters read endpoint, headers, TLS, timeout
// and compression from the environment themselves.
func metricExporter(ctx context.Context, getenv func(string) string) (sdkmetric.Exporter, string, error) {
	p, err := protocol(getenv, "METRICS")
	if err != nil {
		return nil, "", err
	}
	var exp sdkmetric.Exporter
	if p == "grpc" {
		exp, err = otlpmetricgrpc.New(ctx)
	} else {
		exp, err = otlpmetrichttp.New(ctx)
	}
	if err != nil {
		return nil, "", fmt.Errorf("OTLP metric exporter (%s): %w", p, err)
	}
	return exp, p, nil
}

func traceExporter(ctx context.Context, getenv func(string) string) (sdktrace.SpanExporter, string, error) {
	p, err := protocol(getenv, "TRACES")
	if err != nil {
		return nil, "", err
	}
	var exp sdktrace.SpanExporter
	if p == "grpc" {
		exp, err = otlptracegrpc.New(ctx)
	} else {
		exp, err = otlptracehttp.New(ctx)
	}
	if err != nil {
		return nil, "", fmt.Errorf("OTLP trace exporter (%s): %w", p, err)
	}
	return exp, p, nil
}

// newResource describes the daemon: service.name=kmesh and its pod and
// node from the daemon's configuration; OTEL_RESOURCE_ATTRIBUTES and
// OTEL_SERVICE_NAME override (they are detected last).
func newResource(ctx context.Context, cfg Config) (*resource.Resource, error) {
	attrs := []attribute.KeyValue{attribute.String("service.name", "kmesh")}
	for _, kv := range [][2]string{{"k8s.node.name", cfg.Node}, {"k8s.pod.name", cfg.Pod}, {"k8s.namespace.name", cfg.Namespace}} {
		if kv[1] != "" {
			attrs = append(attrs, attribute.String(kv[0], kv[1]))
		}
	}
	r, err := resource.New(ctx, resource.WithTelemetrySDK(), resource.WithAttributes(attrs...), resource.WithFromEnv())
	if err != nil && r == nil {
		return nil, fmt.Errorf("OpenTelemetry resource: %w", err)
	}
	// A partly malformed OTEL_RESOURCE_ATTRIBUTES still yields the rest.
	if err != nil {
		cfg.Log.Warn("OTEL_RESOURCE_ATTRIBUTES partly ignored", "err", err)
	}
	return r, nil
}
