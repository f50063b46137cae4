package tunnel

import (
	"context"
	"errors"
	"net/http"
	"net/netip"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"kmesh.dev/kmesh/ambient/hbone"
)

var (
	dialAddr   = netip.MustParseAddrPort("10.244.2.7:15008")
	targetAddr = netip.MustParseAddrPort("10.244.2.7:8080")
	testRep    = &connReport{srcWorkload: "client", srcNS: "demo", srcPrinc: "spiffe://cluster.local/ns/demo/sa/default",
		dstWorkload: "web", dstNS: "demo", dstPrinc: "spiffe://cluster.local/ns/demo/sa/web", dstService: "web.demo.svc.cluster.local",
		srcAddr: "10.244.1.5:40000", dstAddr: "10.96.0.10:80"}
)

// With tracing off (the default) a connection's span work is a nil check:
// no allocation, whatever the connection does. Catches span work that
// escapes the Tracer == nil gate (attributes built before the check, a
// context allocated for nothing).
func TestSpanOffPathAllocatesNothing(t *testing.T) {
	p := &Proxy{}
	req := &hbone.Request{Method: http.MethodConnect, Authority: targetAddr.String(),
		Header: map[string][]string{"traceparent": {"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}}}
	ctx := context.Background()
	denied, reset := &refusal{http.StatusUnauthorized, reasonDenied, "denied"}, errors.New("reset") // the connection's own
	allocs := testing.AllocsPerRun(1000, func() {
		out := p.clientSpan(ctx, dialAddr, targetAddr, testRep)
		_ = out.spanContext()
		out.status(http.StatusOK)
		out.end(100, 200, nil)
		in := p.serverSpan(ctx, req, dialAddr, targetAddr)
		in.accepted(targetAddr, testRep)
		in.status(http.StatusOK)
		in.end(100, 200, reset)
		p.serverSpan(ctx, req, dialAddr, targetAddr).refused(denied)
	})
	if allocs != 0 {
		t.Fatalf("tracing off: %v allocations per connection, want 0", allocs)
	}
}

// The client span's context is what the CONNECT carries, and the server
// span continues it: one trace across the two proxies, the server span a
// child of the client span. Also the attributes and the error status.
func TestSpansPropagateThroughConnect(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	p := &Proxy{cfg: Config{Tracer: tp.Tracer("test")}}

	out := p.clientSpan(context.Background(), dialAddr, targetAddr, testRep)
	req := &hbone.Request{Method: http.MethodConnect, Authority: targetAddr.String(), Header: map[string][]string{}}
	for _, h := range connectHeaders(source{}, out.spanContext()) {
		req.Header[h[0]] = append(req.Header[h[0]], h[1])
	}
	in := p.serverSpan(context.Background(), req, netip.MustParseAddrPort("10.244.1.2:51000"), dialAddr)
	in.accepted(targetAddr, testRep)
	in.end(10, 20, errors.New("connection reset"))
	out.status(http.StatusOK)
	out.end(10, 20, nil)

	spans := rec.Ended()
	if len(spans) != 2 {
		t.Fatalf("%d spans ended, want 2", len(spans))
	}
	server, client := spans[0], spans[1]
	if client.SpanKind() != trace.SpanKindClient || server.SpanKind() != trace.SpanKindServer {
		t.Fatalf("kinds: client %v server %v", client.SpanKind(), server.SpanKind())
	}
	if server.SpanContext().TraceID() != client.SpanContext().TraceID() {
		t.Fatalf("server span in trace %s, client span in %s: the traceparent was not continued", server.SpanContext().TraceID(), client.SpanContext().TraceID())
	}
	if server.Parent().SpanID() != client.SpanContext().SpanID() || !server.Parent().IsRemote() {
		t.Fatalf("server span's parent %v, want the client span %s (remote)", server.Parent(), client.SpanContext().SpanID())
	}
	want := map[attribute.Key]attribute.Value{
		"network.peer.address": attribute.StringValue("10.244.2.7"), "network.peer.port": attribute.IntValue(15008),
		"server.address": attribute.StringValue("10.96.0.10"), "server.port": attribute.IntValue(80),
		"destination.address": attribute.StringValue("10.244.2.7"), "destination.port": attribute.IntValue(8080),
		"network.transport": attribute.StringValue("tcp"), "network.type": attribute.StringValue("ipv4"),
		"source.workload.name": attribute.StringValue("client"), "destination.workload.name": attribute.StringValue("web"),
		"source.principal":          attribute.StringValue("spiffe://cluster.local/ns/demo/sa/default"),
		"destination.principal":     attribute.StringValue("spiffe://cluster.local/ns/demo/sa/web"),
		"http.response.status_code": attribute.IntValue(200), "kmesh.connection.received_bytes": attribute.Int64Value(10),
	}
	got := map[attribute.Key]attribute.Value{}
	for _, kv := range client.Attributes() {
		got[kv.Key] = kv.Value
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("client span %s = %v, want %v", k, got[k].Emit(), v.Emit())
		}
	}
	if client.Status().Code != codes.Unset {
		t.Errorf("client span status %v, want unset", client.Status())
	}
	if server.Status().Code != codes.Error {
		t.Errorf("server span of a reset connection: status %v, want error", server.Status())
	}
}

// A refused CONNECT ends the server span with an error and the reason.
func TestRefusedStreamSpan(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	p := &Proxy{cfg: Config{Tracer: sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec)).Tracer("test")}}
	req := &hbone.Request{Method: http.MethodConnect, Authority: targetAddr.String()}
	p.serverSpan(context.Background(), req, dialAddr, targetAddr).refused(&refusal{http.StatusUnauthorized, reasonDenied, "no ALLOW policy matched"})
	s := rec.Ended()
	if len(s) != 1 || s[0].Status().Code != codes.Error {
		t.Fatalf("want one span with an error status, got %v", s)
	}
	for _, kv := range s[0].Attributes() {
		if kv.Key == attrRefusal && kv.Value.AsString() == reasonDenied {
			return
		}
	}
	t.Fatalf("no %s=%s attribute: %v", attrRefusal, reasonDenied, s[0].Attributes())
}
