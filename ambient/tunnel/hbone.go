package tunnel

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"strings"

	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"kmesh.dev/kmesh/ambient/identity"
	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/bpf"
)

// HBONE is HTTP/2 CONNECT over mutual TLS 1.3 to port 15008 (ztunnel's
// protocol), with ambient/hbone's default HTTP/2 settings (windows, frame
// size, streams per connection).
const alpnH2 = "h2"

// refusal is an inbound CONNECT the proxy turns down: the HTTP status the
// peer gets and the reason label it is counted under.
type refusal struct {
	status int
	reason string
	msg    string
}

func (r *refusal) Error() string { return fmt.Sprintf("%d %s: %s", r.status, r.reason, r.msg) }

// Refusal reasons (the "reason" label of kmesh_tunnel_refused_total).
const (
	reasonNotConnect    = "not_connect"
	reasonBadAuthority  = "bad_authority"
	reasonNotThisPod    = "not_this_pod"
	reasonProxyPort     = "proxy_port"
	reasonDenied        = "authz_denied"
	reasonUpstream      = "upstream_unreachable"
	reasonNoCertificate = "no_client_certificate"
	reasonUntrusted     = "untrusted_certificate"
	reasonTrustDomain   = "foreign_trust_domain"
	reasonHandshake     = "tls_handshake"
	reasonUnknownPod    = "unknown_pod"
	reasonUnknownDst    = "unknown_destination"
	reasonUIDMismatch   = "workload_uid_mismatch"
)

// checkConnect validates an inbound HBONE request: a CONNECT whose
// :authority is ip:port of this very pod (anything else would make the
// proxy an open relay into the pod's namespace), and not one of the
// proxy's own ports (a loop). It is pure: FuzzCheckConnect feeds it.
func checkConnect(method, authority string, pod []netip.Addr) (netip.AddrPort, *refusal) {
	if method != http.MethodConnect {
		return netip.AddrPort{}, &refusal{http.StatusBadRequest, reasonNotConnect, "HBONE accepts only CONNECT, got " + truncate(method)}
	}
	target, err := netip.ParseAddrPort(authority)
	if err != nil || target.Port() == 0 || target.Addr().Zone() != "" {
		return netip.AddrPort{}, &refusal{http.StatusBadRequest, reasonBadAuthority, "CONNECT authority must be ip:port, got " + truncate(authority)}
	}
	target = netip.AddrPortFrom(target.Addr().Unmap(), target.Port())
	switch target.Port() {
	case bpf.HBONEPort, bpf.OutboundPort, bpf.InboundPlainPort:
		return netip.AddrPort{}, &refusal{http.StatusBadRequest, reasonProxyPort, fmt.Sprintf("port %d is the proxy's own", target.Port())}
	}
	for _, a := range pod {
		if a.Unmap() == target.Addr() {
			return target, nil
		}
	}
	return netip.AddrPort{}, &refusal{http.StatusBadRequest, reasonNotThisPod, target.Addr().String() + " is not this pod"}
}

// truncate quotes what a peer sent for a log line, bounded: quoting can
// multiply the length of binary input by four.
func truncate(s string) string {
	const max = 80
	q := fmt.Sprintf("%q", s)
	if len(q) > max {
		q = q[:max] + "…"
	}
	return q
}

// verifyPeer checks a peer's certificate chain against the mesh roots and
// returns the identity it carries. want (when set) is the one identity the
// peer must have; otherwise any identity of trustDomain will do.
func verifyPeer(raw [][]byte, roots *x509.CertPool, want *identity.Identity, trustDomain string) (identity.Identity, *refusal) {
	if len(raw) == 0 {
		return identity.Identity{}, &refusal{0, reasonNoCertificate, "the peer presented no certificate"}
	}
	certs := make([]*x509.Certificate, 0, len(raw))
	for _, r := range raw {
		c, err := x509.ParseCertificate(r)
		if err != nil {
			return identity.Identity{}, &refusal{0, reasonUntrusted, "unparsable peer certificate: " + err.Error()}
		}
		certs = append(certs, c)
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	// SPIFFE certificates carry no DNS name to check: the chain and the URI
	// SAN are what authenticate the peer.
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return identity.Identity{}, &refusal{0, reasonUntrusted, "peer certificate not trusted: " + err.Error()}
	}
	id, err := identity.FromCertificate(certs[0])
	if err != nil {
		return identity.Identity{}, &refusal{0, reasonUntrusted, err.Error()}
	}
	if want != nil {
		if id != *want {
			return id, &refusal{0, reasonUntrusted, fmt.Sprintf("peer is %s, expected %s", id, want)}
		}
		return id, nil
	}
	if id.TrustDomain != trustDomain {
		return id, &refusal{0, reasonTrustDomain, fmt.Sprintf("peer %s is not in trust domain %s", id, trustDomain)}
	}
	return id, nil
}

// clientTLS is the TLS configuration of one outbound HBONE connection:
// our pod's certificate, TLS 1.3, h2, and the peer must be exactly the
// destination's identity. No SNI: peers are addressed by IP.
func clientTLS(cert *identity.Certificate, roots func() *x509.CertPool, want identity.Identity) *tls.Config {
	return &tls.Config{
		Certificates:       []tls.Certificate{cert.TLS},
		MinVersion:         tls.VersionTLS13,
		NextProtos:         []string{alpnH2},
		InsecureSkipVerify: true, // replaced by VerifyPeerCertificate: SPIFFE, not DNS names
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if _, r := verifyPeer(raw, roots(), &want, ""); r != nil {
				return r
			}
			return nil
		},
	}
}

// source describes the client side of an outbound connection, for the
// request headers peers (and waypoints) read.
type source struct {
	addr netip.Addr
	w    *state.Workload
}

// connectHeaders are the CONNECT's header fields besides :method and
// :authority: where the connection comes from, for the peer's telemetry
// and policies, and the trace context (sc: the connection's client span;
// invalid when tracing is off).
func connectHeaders(src source, sc trace.SpanContext) [][2]string {
	var out [][2]string
	if src.addr.IsValid() {
		out = append(out, [2]string{"forwarded", forwardedFor(src.addr)})
	}
	if b := baggage(src.w); b != "" {
		out = append(out, [2]string{"baggage", b})
	}
	h := http.Header{}
	injectTraceparent(h, sc)
	for k, vs := range h {
		for _, v := range vs {
			out = append(out, [2]string{strings.ToLower(k), v})
		}
	}
	return out
}

// forwardedFor is RFC 7239's for= parameter (IPv6 quoted and bracketed).
func forwardedFor(a netip.Addr) string {
	if a.Unmap().Is4() {
		return `for="` + a.Unmap().String() + `"`
	}
	return `for="[` + a.String() + `]"`
}

// baggage carries the source workload's attributes to the peer (ztunnel's
// keys; the receiving side reports them in its metrics).
func baggage(w *state.Workload) string {
	if w == nil {
		return ""
	}
	m := w.Meta()
	var parts []string
	add := func(k, v string) {
		if v != "" {
			parts = append(parts, k+"="+url.QueryEscape(v))
		}
	}
	add("k8s.cluster.name", m.ClusterID)
	add("k8s.namespace.name", m.Namespace)
	if m.WorkloadName != "" {
		kind := strings.ToLower(m.WorkloadType)
		if kind == "" {
			kind = "deployment"
		}
		add("k8s."+kind+".name", m.WorkloadName)
	}
	add("service.name", m.CanonicalName)
	add("service.version", m.CanonicalRevision)
	return strings.Join(parts, ",")
}

// injectTraceparent writes the connection's W3C trace context: its client
// span's, or without tracing a random unsampled one (the id still
// correlates the two proxies' logs; tracing backends may sample).
func injectTraceparent(h http.Header, sc trace.SpanContext) {
	if !sc.IsValid() {
		var tid trace.TraceID
		var sid trace.SpanID
		fillRandom(tid[:])
		fillRandom(sid[:])
		sc = trace.NewSpanContext(trace.SpanContextConfig{TraceID: tid, SpanID: sid})
	}
	propagation.TraceContext{}.Inject(trace.ContextWithSpanContext(context.Background(), sc), propagation.HeaderCarrier(h))
}

// parseBaggage reads the peer's baggage header (best effort, for metrics).
func parseBaggage(v string) map[string]string {
	out := map[string]string{}
	for _, kv := range strings.Split(v, ",") {
		k, val, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok {
			continue
		}
		if u, err := url.QueryUnescape(val); err == nil {
			val = u
		}
		out[k] = val
	}
	return out
}

var errStreamRefused = errors.New("HBONE peer refused the CONNECT")
