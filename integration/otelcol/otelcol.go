// Package otelcol runs a real OpenTelemetry Collector for the tests: the
// OTLP receiver on loopback (gRPC and HTTP) and the file exporter writing
// what arrived as OTLP JSON lines, which the test reads back.
//
// The collector is built from its modules in collector/, a module of its
// own: its dependency tree (hundreds of modules) stays out of
// kmesh.dev/kmesh. The binary is built once and cached, keyed by the
// hash of that module's go.sum, go.mod and main.go, under
// $KMESH_CACHE_DIR/otelcol or /var/cache/kmesh-otelcol. A cold build
// takes ~7 min on 2 vCPUs (measured, go module cache warm); a cached
// one is reused at once.
package otelcol

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"kmesh.dev/kmesh/integration/freeport"
)

// moduleDir is collector/ next to this file.
func moduleDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "collector")
}

// CacheDir is where built collectors are kept.
func CacheDir() string {
	if d := os.Getenv("KMESH_CACHE_DIR"); d != "" {
		return filepath.Join(d, "otelcol")
	}
	return "/var/cache/kmesh-otelcol"
}

// Build returns the path of the collector binary, building it when no
// binary of the current sources is cached. Concurrent callers (test
// binaries of several packages) wait for one build.
func Build() (string, error) {
	dir := moduleDir()
	h := sha256.New()
	for _, f := range []string{"go.sum", "go.mod", "main.go"} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			return "", fmt.Errorf("otelcol: reading the collector module: %w", err)
		}
		fmt.Fprintf(h, "%s %d\n", f, len(b))
		h.Write(b)
	}
	cache := CacheDir()
	bin := filepath.Join(cache, "otelcol-"+hex.EncodeToString(h.Sum(nil))[:16])
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return "", fmt.Errorf("otelcol: cache directory: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(cache, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", err
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	if _, err := os.Stat(bin); err == nil {
		return bin, nil // built by whoever held the lock
	}
	tmp := bin + ".tmp"
	start := time.Now()
	cmd := exec.Command("go", "build", "-trimpath", "-o", tmp, ".")
	cmd.Dir = dir
	// The module is complete on its own (go.sum included): no workspace,
	// and no edits to go.mod during a test run.
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=readonly")
	if out, err := cmd.CombinedOutput(); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("otelcol: building the OpenTelemetry Collector in %s failed after %s (needs the Go module proxy for its modules the first time): %w\n%s",
			dir, time.Since(start).Round(time.Second), err, out)
	}
	if err := os.Rename(tmp, bin); err != nil {
		return "", err
	}
	return bin, nil
}

// Collector is a running collector.
type Collector struct {
	// GRPC and HTTP are the OTLP receiver's addresses (host:port).
	GRPC, HTTP string
	dir        string
	cmd        *exec.Cmd
	done       chan struct{}
	log        string
}

// Start runs the collector bin with its files under dir until Close.
func Start(bin, dir string) (*Collector, error) {
	c := &Collector{dir: dir, done: make(chan struct{}), log: filepath.Join(dir, "otelcol.log")}
	var err error
	if c.GRPC, err = freeAddr(); err != nil {
		return nil, err
	}
	if c.HTTP, err = freeAddr(); err != nil {
		return nil, err
	}
	// The file exporter flushes every 100 ms so a test sees data soon.
	// The collector's own telemetry is off: its metrics server would take
	// port 8888 and collide between parallel runs.
	cfg := fmt.Sprintf(`receivers:
  otlp:
    protocols:
      grpc: {endpoint: "%s"}
      http: {endpoint: "%s"}
exporters:
  file/metrics: {path: "%s", flush_interval: 100ms}
  file/traces: {path: "%s", flush_interval: 100ms}
service:
  telemetry:
    metrics: {level: none}
    logs: {level: info}
  pipelines:
    metrics: {receivers: [otlp], exporters: [file/metrics]}
    traces: {receivers: [otlp], exporters: [file/traces]}
`, c.GRPC, c.HTTP, c.file("metrics"), c.file("traces"))
	cfgFile := filepath.Join(dir, "otelcol.yaml")
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	logf, err := os.Create(c.log)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	c.cmd = exec.Command(bin, "--config", cfgFile)
	c.cmd.Stdout, c.cmd.Stderr = logf, logf
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := c.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = c.cmd.Wait(); close(c.done) }()
	deadline := time.Now().Add(30 * time.Second)
	for _, a := range []string{c.GRPC, c.HTTP} {
		for {
			conn, err := net.DialTimeout("tcp", a, time.Second)
			if err == nil {
				conn.Close()
				break
			}
			select {
			case <-c.done:
				return nil, fmt.Errorf("otelcol exited at start:\n%s", c.Log())
			default:
			}
			if time.Now().After(deadline) {
				c.Close()
				return nil, fmt.Errorf("otelcol not listening on %s after 30 s:\n%s", a, c.Log())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return c, nil
}

func (c *Collector) file(signal string) string { return filepath.Join(c.dir, signal+".jsonl") }

// Log is the collector's own output.
func (c *Collector) Log() string {
	b, _ := os.ReadFile(c.log)
	return string(b)
}

// Close stops the collector (it flushes its files on SIGTERM).
func (c *Collector) Close() error {
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.done
	}
	return nil
}

// Point is one metric data point as received, with its resource.
type Point struct {
	Resource map[string]string
	Name     string
	Attrs    map[string]string
	Value    float64
	// TimeUnixNano orders the points of one series.
	TimeUnixNano uint64
}

// Span is one span as received, with its resource.
type Span struct {
	Resource                       map[string]string
	TraceID, SpanID, ParentSpanID  string
	Name                           string
	Kind                           int // OTLP: 2 server, 3 client
	Attrs                          map[string]string
	StatusCode                     int // OTLP: 2 error
	StartTimeUnixNano, EndTimeNano string
}

// OTLP's JSON (protobuf JSON mapping) as the file exporter writes it;
// just the fields the tests read.
type (
	kv struct {
		Key   string `json:"key"`
		Value struct {
			StringValue *string  `json:"stringValue"`
			IntValue    *string  `json:"intValue"` // int64 as a JSON string
			DoubleValue *float64 `json:"doubleValue"`
			BoolValue   *bool    `json:"boolValue"`
		} `json:"value"`
	}
	resource struct {
		Attributes []kv `json:"attributes"`
	}
	dataPoint struct {
		Attributes   []kv     `json:"attributes"`
		AsDouble     *float64 `json:"asDouble"`
		AsInt        *string  `json:"asInt"`
		TimeUnixNano string   `json:"timeUnixNano"`
	}
	metricsLine struct {
		ResourceMetrics []struct {
			Resource     resource `json:"resource"`
			ScopeMetrics []struct {
				Metrics []struct {
					Name  string                            `json:"name"`
					Sum   *struct{ DataPoints []dataPoint } `json:"sum"`
					Gauge *struct{ DataPoints []dataPoint } `json:"gauge"`
				} `json:"metrics"`
			} `json:"scopeMetrics"`
		} `json:"resourceMetrics"`
	}
	tracesLine struct {
		ResourceSpans []struct {
			Resource   resource `json:"resource"`
			ScopeSpans []struct {
				Spans []struct {
					TraceID           string `json:"traceId"`
					SpanID            string `json:"spanId"`
					ParentSpanID      string `json:"parentSpanId"`
					Name              string `json:"name"`
					Kind              int    `json:"kind"`
					StartTimeUnixNano string `json:"startTimeUnixNano"`
					EndTimeUnixNano   string `json:"endTimeUnixNano"`
					Attributes        []kv   `json:"attributes"`
					Status            struct {
						Code int `json:"code"`
					} `json:"status"`
				} `json:"spans"`
			} `json:"scopeSpans"`
		} `json:"resourceSpans"`
	}
)

func attrs(in []kv) map[string]string {
	out := make(map[string]string, len(in))
	for _, a := range in {
		switch v := a.Value; {
		case v.StringValue != nil:
			out[a.Key] = *v.StringValue
		case v.IntValue != nil:
			out[a.Key] = *v.IntValue
		case v.DoubleValue != nil:
			out[a.Key] = fmt.Sprint(*v.DoubleValue)
		case v.BoolValue != nil:
			out[a.Key] = fmt.Sprint(*v.BoolValue)
		}
	}
	return out
}

// lines reads the JSON lines of a signal's file so far; a line still
// being written at the end is skipped.
func (c *Collector) lines(signal string, each func([]byte) error) error {
	b, err := os.ReadFile(c.file(signal))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(nil, 64<<20)
	for sc.Scan() {
		if err := each(sc.Bytes()); err != nil && bytes.HasSuffix(b, append(sc.Bytes(), '\n')) {
			return err
		}
	}
	return sc.Err()
}

// Metrics returns every data point received so far, in arrival order.
func (c *Collector) Metrics() ([]Point, error) {
	var out []Point
	err := c.lines("metrics", func(line []byte) error {
		var l metricsLine
		if err := json.Unmarshal(line, &l); err != nil {
			return fmt.Errorf("otelcol metrics line: %w", err)
		}
		for _, rm := range l.ResourceMetrics {
			res := attrs(rm.Resource.Attributes)
			for _, sm := range rm.ScopeMetrics {
				for _, m := range sm.Metrics {
					var dps []dataPoint
					if m.Sum != nil {
						dps = m.Sum.DataPoints
					} else if m.Gauge != nil {
						dps = m.Gauge.DataPoints
					}
					for _, dp := range dps {
						p := Point{Resource: res, Name: m.Name, Attrs: attrs(dp.Attributes)}
						if dp.AsDouble != nil {
							p.Value = *dp.AsDouble
						} else if dp.AsInt != nil {
							fmt.Sscan(*dp.AsInt, &p.Value)
						}
						fmt.Sscan(dp.TimeUnixNano, &p.TimeUnixNano)
						out = append(out, p)
					}
				}
			}
		}
		return nil
	})
	return out, err
}

// Spans returns every span received so far.
func (c *Collector) Spans() ([]Span, error) {
	var out []Span
	err := c.lines("traces", func(line []byte) error {
		var l tracesLine
		if err := json.Unmarshal(line, &l); err != nil {
			return fmt.Errorf("otelcol traces line: %w", err)
		}
		for _, rs := range l.ResourceSpans {
			res := attrs(rs.Resource.Attributes)
			for _, ss := range rs.ScopeSpans {
				for _, s := range ss.Spans {
					out = append(out, Span{Resource: res, TraceID: s.TraceID, SpanID: s.SpanID, ParentSpanID: s.ParentSpanID,
						Name: s.Name, Kind: s.Kind, Attrs: attrs(s.Attributes), StatusCode: s.Status.Code,
						StartTimeUnixNano: s.StartTimeUnixNano, EndTimeNano: s.EndTimeUnixNano})
				}
			}
		}
		return nil
	})
	return out, err
}

// Latest returns the last value received of each series of metric name
// whose resource and attributes include match, keyed by its attributes.
func Latest(points []Point, name string, match map[string]string) map[string]Point {
	out := map[string]Point{}
	for _, p := range points {
		if p.Name != name || !includes(p.Resource, p.Attrs, match) {
			continue
		}
		k := key(p.Attrs)
		if old, ok := out[k]; !ok || p.TimeUnixNano >= old.TimeUnixNano {
			out[k] = p
		}
	}
	return out
}

func includes(res, attrs, match map[string]string) bool {
	for k, v := range match {
		if attrs[k] != v && res[k] != v {
			return false
		}
	}
	return true
}

func key(m map[string]string) string {
	parts := make([]string, 0, len(m))
	for k, v := range m {
		parts = append(parts, k+"="+v)
	}
	slices.Sort(parts)
	return strings.Join(parts, ",")
}

func freeAddr() (string, error) { return freeport.Addr() }
