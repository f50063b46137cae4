package tunnel

import (
	"context"
	"net/http"
	"net/netip"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"kmesh.dev/kmesh/ambient/hbone"
)

// connSpan is one tunnelled connection's span: a client span for an
// outbound HBONE connection, a server span for an inbound stream. nil
// when tracing is off (Config.Tracer nil): every method is a no-op on nil
// and the connection pays nothing, not even an allocation
// (TestSpanOffPathAllocatesNothing).
type connSpan struct {
	span trace.Span
}

// Attribute keys. The network ones are OpenTelemetry's semantic
// conventions for network connections; the workload ones have no
// convention yet and follow Istio's metric labels.
const (
	attrPeerAddr      = "network.peer.address"
	attrPeerPort      = "network.peer.port"
	attrLocalAddr     = "network.local.address"
	attrLocalPort     = "network.local.port"
	attrServerAddr    = "server.address"
	attrServerPort    = "server.port"
	attrDestAddr      = "destination.address"
	attrDestPort      = "destination.port"
	attrClientAddr    = "client.address"
	attrClientPort    = "client.port"
	attrTransport     = "network.transport"
	attrNetType       = "network.type"
	attrMethod        = "http.request.method"
	attrStatus        = "http.response.status_code"
	attrSrcWorkload   = "source.workload.name"
	attrSrcNamespace  = "source.workload.namespace"
	attrSrcPrincipal  = "source.principal"
	attrDstWorkload   = "destination.workload.name"
	attrDstNamespace  = "destination.workload.namespace"
	attrDstPrincipal  = "destination.principal"
	attrDstService    = "destination.service.name"
	attrBytesReceived = "kmesh.connection.received_bytes" // client to server
	attrBytesSent     = "kmesh.connection.sent_bytes"     // server to client
	attrRefusal       = "kmesh.refusal.reason"
)

// spanName: HBONE is HTTP CONNECT, and HTTP's convention names spans by
// method (the target would make the name high-cardinality).
const spanName = "CONNECT"

// clientSpan starts the span of an outbound tunnelled connection: to the
// HBONE peer dial (the destination's node, or its waypoint), asking for
// target.
func (p *Proxy) clientSpan(ctx context.Context, dial, target netip.AddrPort, rep *connReport) *connSpan {
	if p.cfg.Tracer == nil {
		return nil
	}
	_, s := p.cfg.Tracer.Start(ctx, spanName, trace.WithSpanKind(trace.SpanKindClient))
	if !s.IsRecording() {
		return &connSpan{span: s} // not sampled: only its context travels
	}
	// server.* is what the application connected to (a service VIP, say);
	// destination.* the backend the tunnel asks the peer for (the
	// convention's address "behind any intermediaries").
	attrs := addrAttrs(make([]attribute.KeyValue, 0, 22), attrPeerAddr, attrPeerPort, dial)
	if d, err := netip.ParseAddrPort(rep.dstAddr); err == nil {
		attrs = addrAttrs(attrs, attrServerAddr, attrServerPort, d)
	}
	attrs = addrAttrs(attrs, attrDestAddr, attrDestPort, target)
	if c, err := netip.ParseAddrPort(rep.srcAddr); err == nil {
		attrs = addrAttrs(attrs, attrClientAddr, attrClientPort, c)
	}
	s.SetAttributes(append(attrs, reportAttrs(dial.Addr(), rep)...)...)
	return &connSpan{span: s}
}

// serverSpan starts the span of an inbound HBONE stream, continuing the
// peer's trace when its CONNECT carries a traceparent (ztunnel and Kmesh
// send one), so both nodes' spans share one trace id.
func (p *Proxy) serverSpan(ctx context.Context, req *hbone.Request, peer, local netip.AddrPort) *connSpan {
	if p.cfg.Tracer == nil {
		return nil
	}
	ctx = propagation.TraceContext{}.Extract(ctx, requestCarrier{req})
	_, s := p.cfg.Tracer.Start(ctx, spanName, trace.WithSpanKind(trace.SpanKindServer))
	if s.IsRecording() {
		attrs := addrAttrs(make([]attribute.KeyValue, 0, 12), attrPeerAddr, attrPeerPort, peer)
		attrs = addrAttrs(attrs, attrLocalAddr, attrLocalPort, local)
		s.SetAttributes(append(attrs, attribute.String(attrTransport, "tcp"), attribute.String(attrNetType, netType(peer.Addr())),
			attribute.String(attrMethod, req.Method))...)
	}
	return &connSpan{span: s}
}

// accepted adds what is known once an inbound stream is checked: the
// target it asked for and both workloads.
func (s *connSpan) accepted(target netip.AddrPort, rep *connReport) {
	if s == nil || !s.span.IsRecording() {
		return
	}
	attrs := addrAttrs(make([]attribute.KeyValue, 0, 10), attrServerAddr, attrServerPort, target)
	for _, kv := range [][2]string{{attrSrcWorkload, rep.srcWorkload}, {attrSrcNamespace, rep.srcNS}, {attrSrcPrincipal, rep.srcPrinc},
		{attrDstWorkload, rep.dstWorkload}, {attrDstNamespace, rep.dstNS}, {attrDstPrincipal, rep.dstPrinc}, {attrDstService, rep.dstService}} {
		if kv[1] != "" {
			attrs = append(attrs, attribute.String(kv[0], kv[1]))
		}
	}
	s.span.SetAttributes(attrs...)
}

// spanContext is what the CONNECT's traceparent carries (invalid when
// tracing is off: the caller then sends an unsampled random one).
func (s *connSpan) spanContext() trace.SpanContext {
	if s == nil {
		return trace.SpanContext{}
	}
	return s.span.SpanContext()
}

// status records the CONNECT's HTTP status (the peer's answer, or ours).
func (s *connSpan) status(code int) {
	if s == nil || !s.span.IsRecording() {
		return
	}
	s.span.SetAttributes(attribute.Int(attrStatus, code))
}

// refused ends the span of a connection turned down before any byte
// flowed.
func (s *connSpan) refused(r *refusal) {
	if s == nil {
		return
	}
	if r.status != 0 {
		s.status(r.status)
	}
	s.span.SetAttributes(attribute.String(attrRefusal, r.reason))
	s.span.SetStatus(codes.Error, r.reason+": "+r.msg)
	s.span.End()
}

// end ends the span with the connection: its bytes, and an error status
// when it failed.
func (s *connSpan) end(received, sent int64, err error) {
	if s == nil {
		return
	}
	if s.span.IsRecording() {
		s.span.SetAttributes(attribute.Int64(attrBytesReceived, max(received, 0)), attribute.Int64(attrBytesSent, max(sent, 0)))
	}
	if err != nil {
		s.span.RecordError(err)
		s.span.SetStatus(codes.Error, err.Error())
	}
	s.span.End()
}

func addrAttrs(attrs []attribute.KeyValue, addrKey, portKey string, ap netip.AddrPort) []attribute.KeyValue {
	if !ap.IsValid() {
		return attrs
	}
	return append(attrs, attribute.String(addrKey, ap.Addr().Unmap().String()), attribute.Int(portKey, int(ap.Port())))
}

// reportAttrs are the transport and the two workloads of an outbound
// connection.
func reportAttrs(peer netip.Addr, rep *connReport) []attribute.KeyValue {
	attrs := []attribute.KeyValue{attribute.String(attrTransport, "tcp"), attribute.String(attrNetType, netType(peer)),
		attribute.String(attrMethod, http.MethodConnect)}
	for _, kv := range [][2]string{{attrSrcWorkload, rep.srcWorkload}, {attrSrcNamespace, rep.srcNS}, {attrSrcPrincipal, rep.srcPrinc},
		{attrDstWorkload, rep.dstWorkload}, {attrDstNamespace, rep.dstNS}, {attrDstPrincipal, rep.dstPrinc}, {attrDstService, rep.dstService}} {
		if kv[1] != "" {
			attrs = append(attrs, attribute.String(kv[0], kv[1]))
		}
	}
	return attrs
}

func netType(a netip.Addr) string {
	if a.Unmap().Is4() {
		return "ipv4"
	}
	return "ipv6"
}

// requestCarrier reads an inbound CONNECT's headers for the propagator.
type requestCarrier struct{ r *hbone.Request }

func (c requestCarrier) Get(key string) string { return c.r.Get(key) }
func (requestCarrier) Set(string, string)      {}
func (requestCarrier) Keys() []string          { return nil }
