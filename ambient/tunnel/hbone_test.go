package tunnel

import (
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/trace"

	"kmesh.dev/kmesh/ambient/identity"
)

func TestCheckConnect(t *testing.T) {
	pod := []netip.Addr{netip.MustParseAddr("10.244.1.5"), netip.MustParseAddr("fd00:10:244:1::5")}
	for _, tc := range []struct {
		method, authority string
		want              string // target, or the refusal reason
	}{
		{"CONNECT", "10.244.1.5:8080", "10.244.1.5:8080"},
		{"CONNECT", "[fd00:10:244:1::5]:80", "[fd00:10:244:1::5]:80"},
		{"CONNECT", "[::ffff:10.244.1.5]:80", "10.244.1.5:80"},
		{"GET", "10.244.1.5:8080", reasonNotConnect},
		{"connect", "10.244.1.5:8080", reasonNotConnect},
		{"CONNECT", "10.244.1.6:8080", reasonNotThisPod},
		{"CONNECT", "10.244.1.5", reasonBadAuthority},
		{"CONNECT", "10.244.1.5:0", reasonBadAuthority},
		{"CONNECT", "echo.app.svc:80", reasonBadAuthority},
		{"CONNECT", "[fe80::1%eth0]:80", reasonBadAuthority},
		{"CONNECT", "", reasonBadAuthority},
		{"CONNECT", "10.244.1.5:15008", reasonProxyPort},
		{"CONNECT", "10.244.1.5:15001", reasonProxyPort},
		{"CONNECT", "10.244.1.5:15006", reasonProxyPort},
	} {
		target, ref := checkConnect(tc.method, tc.authority, pod)
		got := target.String()
		if ref != nil {
			got = ref.reason
			if ref.status != http.StatusBadRequest {
				t.Errorf("%s %s: status %d, want 400", tc.method, tc.authority, ref.status)
			}
		}
		if got != tc.want {
			t.Errorf("%s %q: got %s, want %s", tc.method, tc.authority, got, tc.want)
		}
	}
}

// FuzzCheckConnect: whatever a peer puts in :method and :authority, the
// proxy only ever connects to this pod, on a port that is not its own.
func FuzzCheckConnect(f *testing.F) {
	for _, s := range []string{"10.244.1.5:8080", "[fd00:10:244:1::5]:80", "10.244.1.5:15008", "x:1", "[::ffff:10.244.1.5]:1", "10.244.1.5:65535", "%", "[", "10.244.1.5:-1"} {
		f.Add("CONNECT", s)
	}
	f.Add("GET", "10.244.1.5:80")
	pod := []netip.Addr{netip.MustParseAddr("10.244.1.5"), netip.MustParseAddr("fd00:10:244:1::5")}
	f.Fuzz(func(t *testing.T, method, authority string) {
		target, ref := checkConnect(method, authority, pod)
		if ref != nil {
			if ref.status != http.StatusBadRequest || len(ref.msg) > 200 {
				t.Fatalf("refusal %+v", ref)
			}
			return
		}
		if method != "CONNECT" {
			t.Fatalf("accepted method %q", method)
		}
		if a := target.Addr(); a != pod[0] && a != pod[1] {
			t.Fatalf("accepted %v, not this pod", target)
		}
		if p := target.Port(); p == 0 || p == 15001 || p == 15006 || p == 15008 {
			t.Fatalf("accepted port %d", p)
		}
	})
}

func TestVerifyPeer(t *testing.T) {
	ca := newTestCA(t, "cluster.local")
	other := newTestCA(t, "other")
	now := time.Now()
	valid := func(uri string) [][]byte {
		return ca.issue(t, uri, now.Add(-time.Minute), now.Add(time.Hour)).TLS.Certificate
	}
	want := identity.Identity{TrustDomain: "cluster.local", Namespace: "app", ServiceAccount: "echo"}
	for _, tc := range []struct {
		name   string
		raw    [][]byte
		want   *identity.Identity
		reason string
	}{
		{"valid, any identity of the trust domain", valid("spiffe://cluster.local/ns/app/sa/sleep"), nil, ""},
		{"valid, expected identity", valid("spiffe://cluster.local/ns/app/sa/echo"), &want, ""},
		{"no certificate", nil, nil, reasonNoCertificate},
		{"wrong trust domain", valid("spiffe://evil.example/ns/app/sa/sleep"), nil, reasonTrustDomain},
		{"wrong SAN for the destination", valid("spiffe://cluster.local/ns/app/sa/sleep"), &want, reasonUntrusted},
		{"signed by another root", other.issue(t, "spiffe://cluster.local/ns/app/sa/echo", now.Add(-time.Minute), now.Add(time.Hour)).TLS.Certificate, nil, reasonUntrusted},
		{"expired", ca.issue(t, "spiffe://cluster.local/ns/app/sa/echo", now.Add(-2*time.Hour), now.Add(-time.Hour)).TLS.Certificate, nil, reasonUntrusted},
		{"not yet valid", ca.issue(t, "spiffe://cluster.local/ns/app/sa/echo", now.Add(time.Hour), now.Add(2*time.Hour)).TLS.Certificate, nil, reasonUntrusted},
		{"not a SPIFFE identity", valid("https://cluster.local/ns/app/sa/echo"), nil, reasonUntrusted},
		{"garbage", [][]byte{[]byte("not DER")}, nil, reasonUntrusted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, ref := verifyPeer(tc.raw, ca.Roots(), tc.want, "cluster.local")
			got := ""
			if ref != nil {
				got = ref.reason
			}
			if got != tc.reason {
				t.Fatalf("reason %q, want %q (%v)", got, tc.reason, ref)
			}
		})
	}
}

func TestRequestHeaders(t *testing.T) {
	w := workload("sleep", "app", "sleep", true, "10.244.1.9")
	m := w.Meta()
	m.ClusterID, m.CanonicalName, m.CanonicalRevision, m.WorkloadType = "Kubernetes", "sleep", "v1", "deployment"
	w.SetMeta(m)
	hdr := map[string]string{}
	for _, f := range connectHeaders(source{addr: netip.MustParseAddr("10.244.1.9"), w: w}, trace.SpanContext{}) {
		if f[0] != strings.ToLower(f[0]) {
			t.Errorf("header name %q is not lower case (HTTP/2)", f[0])
		}
		hdr[f[0]] = f[1]
	}
	if got := hdr["forwarded"]; got != `for="10.244.1.9"` {
		t.Errorf("forwarded %q", got)
	}
	if got := hdr["traceparent"]; len(got) != 55 || !strings.HasPrefix(got, "00-") {
		t.Errorf("traceparent %q", got)
	}
	bag := parseBaggage(hdr["baggage"])
	if bag["k8s.namespace.name"] != "app" || bag["k8s.deployment.name"] != "sleep" || bag["service.version"] != "v1" || bag["k8s.cluster.name"] != "Kubernetes" {
		t.Errorf("baggage %v", bag)
	}
	if got := forwardedFor(netip.MustParseAddr("fd00::1")); got != `for="[fd00::1]"` {
		t.Errorf("IPv6 forwarded %q", got)
	}
}
