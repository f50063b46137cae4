package configdump

// These tests read the dump with istioctl's own parser and table writers
// (istio.io/istio/istioctl/pkg/writer/ztunnel/configdump), the code behind
// `istioctl ztunnel-config`. They are linked into this test binary only:
// the daemon does not import istioctl (TestDaemonDoesNotLinkIstioctl).

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"math/big"
	"net/netip"
	"net/url"
	"os/exec"
	"reflect"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	zc "istio.io/istio/istioctl/pkg/writer/ztunnel/configdump"
	"istio.io/istio/pkg/workloadapi"
	"istio.io/istio/pkg/workloadapi/security"

	"kmesh.dev/kmesh/ambient/identity"
	"kmesh.dev/kmesh/ambient/state"
)

var now = time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)

func ip(s string) []byte { return netip.MustParseAddr(s).AsSlice() }

func wl(t *testing.T, w *workloadapi.Workload) *state.Workload {
	t.Helper()
	w.ClusterId, w.TrustDomain = "Kubernetes", "cluster.local"
	out, err := state.ConvertWorkload(w)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func svc(t *testing.T, s *workloadapi.Service) *state.Service {
	t.Helper()
	out, err := state.ConvertService(s)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// mesh is a small ambient mesh as istiod describes it: two meshed pods
// behind a service with a waypoint (one pod names the waypoint by address,
// the other by hostname), a pod outside the mesh behind a dual-stack
// service, the waypoint itself, and two policies.
func mesh(t *testing.T) state.Snapshot {
	web := map[string]*workloadapi.PortList{"demo/web.demo.svc.cluster.local": {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}}
	st := state.NewStore()
	st.Apply(state.Update{
		Workloads: []*state.Workload{
			wl(t, &workloadapi.Workload{Uid: "Kubernetes//Pod/demo/web-0", Name: "web-0", Namespace: "demo", Node: "node-1",
				Addresses: [][]byte{ip("10.244.1.5")}, TunnelProtocol: workloadapi.TunnelProtocol_HBONE, Status: workloadapi.WorkloadStatus_HEALTHY,
				ServiceAccount: "web", WorkloadName: "web", WorkloadType: workloadapi.WorkloadType_DEPLOYMENT, CanonicalName: "web", CanonicalRevision: "v1",
				Locality: &workloadapi.Locality{Region: "eu", Zone: "eu-1"}, Services: web, Capacity: wrapperspb.UInt32(2),
				AuthorizationPolicies: []string{"demo/deny-legacy"},
				Waypoint:              &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: ip("10.96.0.20")}}, HboneMtlsPort: 15008}}),
			wl(t, &workloadapi.Workload{Uid: "Kubernetes//Pod/demo/web-1", Name: "web-1", Namespace: "demo", Node: "node-2",
				Addresses: [][]byte{ip("10.244.2.5")}, TunnelProtocol: workloadapi.TunnelProtocol_HBONE, Status: workloadapi.WorkloadStatus_UNHEALTHY,
				ServiceAccount: "web", Services: web,
				Waypoint: &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Hostname{Hostname: &workloadapi.NamespacedHostname{Namespace: "demo", Hostname: "waypoint.demo.svc.cluster.local"}}, HboneMtlsPort: 15008}}),
			wl(t, &workloadapi.Workload{Uid: "Kubernetes//Pod/legacy/db-0", Name: "db-0", Namespace: "legacy", Node: "node-2",
				Addresses: [][]byte{ip("10.244.2.9"), ip("fd00:10:244:2::9")}, Status: workloadapi.WorkloadStatus_HEALTHY,
				Services: map[string]*workloadapi.PortList{"legacy/db.legacy.svc.cluster.local": {}}}),
			wl(t, &workloadapi.Workload{Uid: "Kubernetes//Pod/demo/waypoint-7f9", Name: "waypoint-7f9", Namespace: "demo", Node: "node-1",
				Addresses: [][]byte{ip("10.244.1.7")}, TunnelProtocol: workloadapi.TunnelProtocol_HBONE, Status: workloadapi.WorkloadStatus_HEALTHY,
				Services: map[string]*workloadapi.PortList{"demo/waypoint.demo.svc.cluster.local": {Ports: []*workloadapi.Port{{ServicePort: 15008, TargetPort: 15008}}}}}),
		},
		Services: []*state.Service{
			svc(t, &workloadapi.Service{Name: "web", Namespace: "demo", Hostname: "web.demo.svc.cluster.local",
				Addresses: []*workloadapi.NetworkAddress{{Address: ip("10.96.0.10")}}, Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}},
				Waypoint:      &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: ip("10.96.0.20")}}, HboneMtlsPort: 15008},
				LoadBalancing: &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_FAILOVER, RoutingPreference: []workloadapi.LoadBalancing_Scope{workloadapi.LoadBalancing_NODE, workloadapi.LoadBalancing_ZONE}}}),
			svc(t, &workloadapi.Service{Name: "waypoint", Namespace: "demo", Hostname: "waypoint.demo.svc.cluster.local",
				Addresses: []*workloadapi.NetworkAddress{{Address: ip("10.96.0.20")}}, Ports: []*workloadapi.Port{{ServicePort: 15008, TargetPort: 15008}}}),
			svc(t, &workloadapi.Service{Name: "db", Namespace: "legacy", Hostname: "db.legacy.svc.cluster.local",
				Addresses: []*workloadapi.NetworkAddress{{Address: ip("10.96.0.30")}, {Address: ip("fd00:10:96::30")}}, Ports: []*workloadapi.Port{{ServicePort: 5432, TargetPort: 5432}}}),
		},
		Policies: []state.Policy{
			{Authorization: &security.Authorization{Name: "deny-legacy", Namespace: "demo", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY,
				Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{
					Namespaces:       []*security.StringMatch{{MatchType: &security.StringMatch_Exact{Exact: "legacy"}}},
					Principals:       []*security.StringMatch{{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}},
					SourceIps:        []*security.Address{{Address: ip("10.244.2.0"), Length: 24}},
					DestinationPorts: []uint32{8080},
				}}}}}}}},
			{Authorization: &security.Authorization{Name: "allow-all", Namespace: "istio-system", Scope: security.Scope_GLOBAL, Action: security.Action_ALLOW}},
		},
	})
	return st.Snapshot()
}

// pki issues a root and, for id, a leaf valid from an hour before now for
// lifetime.
func pki(t *testing.T, id identity.Identity, serial int64, lifetime time.Duration) *identity.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rootTmpl := &x509.Certificate{SerialNumber: big.NewInt(0xabc), Subject: pkix.Name{Organization: []string{"cluster.local"}},
		NotBefore: now.Add(-24 * time.Hour), NotAfter: now.Add(10 * 365 * 24 * time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(rootDER)
	u, _ := url.Parse(id.String())
	leafTmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), URIs: []*url.URL{u},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(-time.Hour + lifetime), KeyUsage: x509.KeyUsageDigitalSignature}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, root, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(leafDER)
	return &identity.Certificate{Identity: id, TLS: tls.Certificate{Certificate: [][]byte{leafDER}, PrivateKey: key, Leaf: leaf},
		Leaf: leaf, Roots: []*x509.Certificate{root}, NotAfter: leaf.NotAfter, Received: leaf.NotBefore}
}

var (
	webID  = identity.Identity{TrustDomain: "cluster.local", Namespace: "demo", ServiceAccount: "web"}
	newID  = identity.Identity{TrustDomain: "cluster.local", Namespace: "demo", ServiceAccount: "new"}
	downID = identity.Identity{TrustDomain: "cluster.local", Namespace: "legacy", ServiceAccount: "default"}
)

func input(t *testing.T) Input {
	return Input{
		State: mesh(t),
		Certificates: []identity.Held{
			{Identity: newID, Refs: 1},
			{Identity: webID, Cert: pki(t, webID, 0x1234, 24*time.Hour), Err: errors.New("renewal refused"), Refs: 2},
			{Identity: downID, Err: errors.New("CA unreachable at istiod:15012"), Refs: 1},
		},
		Pods: []Pod{
			{UID: "8d3c-web-0", Name: "web-0", Namespace: "demo", ServiceAccount: "web", TrustDomain: "cluster.local", State: "Up",
				Connections: Connections{Outbound: []Connection{{Src: "10.244.1.5:41000", OriginalDst: "10.96.0.30:5432", ActualDst: "10.244.2.9:5432", Protocol: "TCP"}}}},
			{UID: "77aa-waypoint", Name: "waypoint-7f9", Namespace: "demo", ServiceAccount: "waypoint", TrustDomain: "cluster.local", State: "Up", NetnsCookie: 4099},
		},
		Now: now,
	}
}

// writer hands the dump to istioctl exactly as `istioctl ztunnel-config`
// does with what it fetched from port 15000.
func writer(t *testing.T, d Dump) (*zc.ConfigWriter, *bytes.Buffer) {
	t.Helper()
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	out := &bytes.Buffer{}
	cw := &zc.ConfigWriter{Stdout: out, FullDump: b}
	if err := cw.Prime(b); err != nil {
		t.Fatalf("istioctl cannot read the dump: %v", err)
	}
	return cw, out
}

// rows splits a table into its header and rows of whitespace-separated fields.
func rows(s string) [][]string {
	var out [][]string
	for _, l := range strings.Split(strings.TrimSpace(s), "\n") {
		out = append(out, strings.Fields(l))
	}
	return out
}

func wantTable(t *testing.T, what, got string, want [][]string) {
	t.Helper()
	if g := rows(got); !reflect.DeepEqual(g, want) {
		t.Errorf("istioctl ztunnel-config %s printed:\n%s\nwant rows %q", what, got, want)
	}
}

func TestIstioctlReadsWorkloads(t *testing.T) {
	cw, out := writer(t, Build(input(t)))
	if err := cw.PrintWorkloadSummary(zc.WorkloadFilter{}); err != nil {
		t.Fatal(err)
	}
	// The waypoint column resolves "/10.96.0.20" and
	// "demo/waypoint.demo.svc.cluster.local" against the services: a
	// destination in another form shows "NA".
	wantTable(t, "workloads", out.String(), [][]string{
		{"NAMESPACE", "POD", "NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"},
		{"demo", "waypoint-7f9", "10.244.1.7", "node-1", "None", "HBONE"},
		{"demo", "web-0", "10.244.1.5", "node-1", "waypoint", "HBONE"},
		{"demo", "web-1", "10.244.2.5", "node-2", "waypoint", "HBONE"},
		{"legacy", "db-0", "10.244.2.9,fd00:10:244:2::9", "node-2", "None", "TCP"},
	})

	// Every field istioctl knows, under the name it expects.
	out.Reset()
	if err := cw.PrintWorkloadDump(zc.WorkloadFilter{Name: "web-0"}, "json"); err != nil {
		t.Fatal(err)
	}
	var got []*zc.ZtunnelWorkload
	if err := json.Unmarshal(out.Bytes(), &got); err != nil || len(got) != 1 {
		t.Fatalf("workloads -o json: %v\n%s", err, out)
	}
	want := &zc.ZtunnelWorkload{UID: "Kubernetes//Pod/demo/web-0", WorkloadIPs: []string{"10.244.1.5"}, Waypoint: &zc.GatewayAddress{Destination: "/10.96.0.20"},
		Protocol: "HBONE", Name: "web-0", Namespace: "demo", ServiceAccount: "web", WorkloadName: "web", WorkloadType: "deployment",
		CanonicalName: "web", CanonicalRevision: "v1", ClusterID: "Kubernetes", TrustDomain: "cluster.local", Locality: zc.Locality{Region: "eu", Zone: "eu-1"},
		Node: "node-1", Status: "Healthy", Capacity: 2, AuthorizationPolicies: []string{"demo/deny-legacy"}}
	if !reflect.DeepEqual(got[0], want) {
		g, _ := json.Marshal(got[0])
		w, _ := json.Marshal(want)
		t.Errorf("istioctl read web-0 as\n%s\nwant\n%s", g, w)
	}
}

func TestIstioctlReadsServices(t *testing.T) {
	cw, out := writer(t, Build(input(t)))
	if err := cw.PrintServiceSummary(zc.ServiceFilter{}); err != nil {
		t.Fatal(err)
	}
	// ENDPOINTS counts healthy endpoints: web-1 is not.
	wantTable(t, "services", out.String(), [][]string{
		{"NAMESPACE", "SERVICE", "NAME", "SERVICE", "VIP", "WAYPOINT", "ENDPOINTS"},
		{"demo", "waypoint", "10.96.0.20", "None", "1/1"},
		{"demo", "web", "10.96.0.10", "waypoint", "1/2"},
		{"legacy", "db", "10.96.0.30,fd00:10:96::30", "None", "1/1"},
	})

	out.Reset()
	if err := cw.PrintServiceDump(zc.ServiceFilter{Namespace: "demo"}, "json"); err != nil {
		t.Fatal(err)
	}
	var got []*zc.ZtunnelService
	if err := json.Unmarshal(out.Bytes(), &got); err != nil || len(got) != 2 {
		t.Fatalf("services -o json: %v\n%s", err, out)
	}
	web := got[1]
	want := &zc.ZtunnelService{Name: "web", Namespace: "demo", Hostname: "web.demo.svc.cluster.local", Addresses: []string{"/10.96.0.10"},
		Ports: map[string]int{"80": 8080}, Waypoint: &zc.GatewayAddress{Destination: "/10.96.0.20"}, IPFamilies: "IPv4",
		LoadBalancer: &zc.LoadBalancer{Mode: "Failover", RoutingPreferences: []string{"Node", "Zone"}, HealthPolicy: "OnlyHealthy"},
		Endpoints: map[string]*zc.ZtunnelEndpoint{
			"Kubernetes//Pod/demo/web-0": {WorkloadUID: "Kubernetes//Pod/demo/web-0", Service: "demo/web.demo.svc.cluster.local", Address: "/10.244.1.5", Port: map[uint16]uint16{80: 8080}},
			"Kubernetes//Pod/demo/web-1": {WorkloadUID: "Kubernetes//Pod/demo/web-1", Service: "demo/web.demo.svc.cluster.local", Address: "/10.244.2.5", Port: map[uint16]uint16{80: 8080}},
		}}
	if !reflect.DeepEqual(web, want) {
		g, _ := json.Marshal(web)
		w, _ := json.Marshal(want)
		t.Errorf("istioctl read demo/web as\n%s\nwant\n%s", g, w)
	}
}

func TestIstioctlReadsPolicies(t *testing.T) {
	cw, out := writer(t, Build(input(t)))
	if err := cw.PrintPolicySummary(zc.PolicyFilter{}); err != nil {
		t.Fatal(err)
	}
	wantTable(t, "policies", out.String(), [][]string{
		{"NAMESPACE", "POLICY", "NAME", "ACTION", "SCOPE"},
		{"demo", "deny-legacy", "Deny", "Namespace"},
		{"istio-system", "allow-all", "Allow", "Global"},
	})
	out.Reset()
	if err := cw.PrintPolicyDump(zc.PolicyFilter{Namespace: "demo"}, "json"); err != nil {
		t.Fatal(err)
	}
	var got []*zc.ZtunnelPolicy
	if err := json.Unmarshal(out.Bytes(), &got); err != nil || len(got) != 1 {
		t.Fatalf("policies -o json: %v\n%s", err, out)
	}
	want := [][][]*zc.PolicyMatch{{{{Namespaces: []zc.StringMatch{{Exact: "legacy"}}, Principals: []zc.StringMatch{{Presence: map[string]any{}}},
		SourceIps: []string{"10.244.2.0/24"}, DestinationPorts: []uint16{8080}}}}}
	if !reflect.DeepEqual(got[0].Rules, want) {
		g, _ := json.Marshal(got[0].Rules)
		t.Errorf("istioctl read the rules of demo/deny-legacy as %s", g)
	}
}

func TestIstioctlReadsCertificates(t *testing.T) {
	in := input(t)
	cw, out := writer(t, Build(in))
	if err := cw.PrintSecretSummary(); err != nil {
		t.Fatal(err)
	}
	// istioctl judges validity against the real clock: the test
	// certificate was issued around `now`, in the past or future of it.
	leaf := in.Certificates[1].Cert.Leaf
	valid := "false"
	if time.Now().After(leaf.NotBefore) && time.Now().Before(leaf.NotAfter) {
		valid = "true"
	}
	root := in.Certificates[1].Cert.Roots[0]
	rootValid := "false"
	if time.Now().After(root.NotBefore) && time.Now().Before(root.NotAfter) {
		rootValid = "true"
	}
	// A renewal failing while the certificate is valid is still
	// Available (it is what the tunnel presents).
	wantTable(t, "certificates", out.String(), [][]string{
		{"CERTIFICATE", "NAME", "TYPE", "STATUS", "VALID", "CERT", "SERIAL", "NUMBER", "NOT", "AFTER", "NOT", "BEFORE"},
		{"spiffe://cluster.local/ns/demo/sa/new", "NA", "Initializing", "false", "NA", "NA", "NA"},
		{"spiffe://cluster.local/ns/demo/sa/web", "Leaf", "Available", valid, "1234", "2026-12-02T11:00:00Z", "2026-12-01T11:00:00Z"},
		{"spiffe://cluster.local/ns/demo/sa/web", "Root", "Available", rootValid, "abc", root.NotAfter.UTC().Format(time.RFC3339), "2026-11-30T12:00:00Z"},
		{"spiffe://cluster.local/ns/legacy/sa/default", "NA", "Unavailable", "false", "NA", "NA", "NA"},
	})
	// The JSON keeps the reason, and the PEM is the certificate.
	d := Build(in)
	if s := d.Certificates[2].State; s != "Unavailable: CA unreachable at istiod:15012" {
		t.Errorf("state %q does not say why", s)
	}
	if p := d.Certificates[1].CertChain[0].PEM; !strings.HasPrefix(p, "-----BEGIN CERTIFICATE-----") {
		t.Errorf("pem %q", p)
	}
}

func TestCertState(t *testing.T) {
	c := pki(t, webID, 1, 2*time.Hour) // valid until now+1h
	fail := errors.New("refused")
	for _, tc := range []struct {
		name string
		h    identity.Held
		at   time.Time
		want string
	}{
		{"first fetch under way", identity.Held{}, now, "Initializing"},
		{"first fetch failed", identity.Held{Err: fail}, now, "Unavailable: refused"},
		{"issued", identity.Held{Cert: c}, now, "Available"},
		{"valid while renewal fails", identity.Held{Cert: c, Err: fail}, now, "Available"},
		{"expired, renewal failing", identity.Held{Cert: c, Err: fail}, now.Add(2 * time.Hour), "Unavailable: refused"},
		{"expired, renewal under way", identity.Held{Cert: c}, now.Add(2 * time.Hour), "Unavailable: the certificate expired at 2026-12-01T13:00:00Z; renewing"},
	} {
		if got := certState(tc.h, tc.at); got != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}

func TestIstioctlReadsConnections(t *testing.T) {
	cw, out := writer(t, Build(input(t)))
	if err := cw.PrintConnectionsSummary(zc.ConnectionsFilter{}); err != nil {
		t.Fatal(err)
	}
	// istioctl names addresses after the services and workloads it read.
	wantTable(t, "connections", out.String(), [][]string{
		{"WORKLOAD", "DIRECTION", "LOCAL", "REMOTE", "REMOTE", "TARGET", "PROTOCOL"},
		{"web-0.demo", "Outbound", "web-0.demo:41000", "db-0.legacy:5432", "db.legacy.svc.cluster.local:5432", "TCP"},
	})
	out.Reset()
	if err := cw.PrintConnectionsDump(zc.ConnectionsFilter{Workload: "waypoint-7f9"}, "json"); err != nil {
		t.Fatal(err)
	}
	var got []zc.WorkloadState
	if err := json.Unmarshal(out.Bytes(), &got); err != nil || len(got) != 1 {
		t.Fatalf("connections -o json: %v\n%s", err, out)
	}
	want := zc.WorkloadState{State: "Up", Connections: zc.WorkloadConnections{Inbound: []zc.InboundConnection{}, Outbound: []zc.OutboundConnection{}},
		Info: zc.WorkloadInfo{Name: "waypoint-7f9", Namespace: "demo", TrustDomain: "cluster.local", ServiceAccount: "waypoint"}}
	if !reflect.DeepEqual(got[0], want) {
		t.Errorf("istioctl read the waypoint pod as %+v", got[0])
	}
	// Kmesh's addition, beside istioctl's fields: the kernel's key.
	if b, _ := json.Marshal(Build(input(t)).WorkloadState["77aa-waypoint"]); !strings.Contains(string(b), `"netnsCookie":4099`) {
		t.Errorf("workloadState lacks the namespace cookie: %s", b)
	}
}

// An empty daemon (no istiod yet, no pods) still gives istioctl lists, not
// nulls: Istio's own test of `istioctl ztunnel-config ... -o json` wants
// each section present.
func TestEmptyDumpHasEverySection(t *testing.T) {
	b, err := json.Marshal(Build(Input{Now: now}))
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"workloads", "services", "policies", "certificates", "workloadState"} {
		if v := string(m[k]); v != "[]" && v != "{}" {
			t.Errorf("%s: %q, want an empty list or map", k, v)
		}
	}
	cw, out := writer(t, Build(Input{Now: now}))
	if err := cw.PrintFullSummary(true); err != nil {
		t.Fatalf("istioctl ztunnel-config all: %v\n%s", err, out)
	}
}

// The daemon must not link istioctl: only this package's tests do.
func TestDaemonDoesNotLinkIstioctl(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go list")
	}
	out, err := exec.Command("go", "list", "-deps", "kmesh.dev/kmesh/cmd/kmesh-daemon", "kmesh.dev/kmesh/cmd/kmeshctl").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, p := range strings.Fields(string(out)) {
		if strings.HasPrefix(p, "istio.io/istio/istioctl") {
			t.Errorf("a product binary links %s", p)
		}
	}
}
