package controlplane_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	authv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"kmesh.dev/kmesh/ambient/identity"
	"kmesh.dev/kmesh/ambient/istiod"
	"kmesh.dev/kmesh/ambient/xds"
	"kmesh.dev/kmesh/integration/controlplane"
)

// Two nodes; sleep runs on node1, httpbin on node2.
const caObjects = `
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: default, uid: 6f1c0a4e-sleep}
spec:
  nodeName: node1
  serviceAccountName: sleep
  containers: [{name: sleep, image: sleep}]
status: {phase: Running, podIP: 10.0.1.5, podIPs: [{ip: 10.0.1.5}]}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin, namespace: default, uid: 1d2e3f4a-httpbin}
spec:
  nodeName: node2
  serviceAccountName: httpbin
  containers: [{name: httpbin, image: httpbin}]
status: {phase: Running, podIP: 10.0.2.7, podIPs: [{ip: 10.0.2.7}]}
`

var (
	sleepID   = identity.Identity{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "sleep"}
	httpbinID = identity.Identity{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "httpbin"}
)

// caEnv is one control plane and what a daemon on node1 is given.
type caEnv struct {
	cp        *controlplane.ControlPlane
	tls       *tls.Config
	rootFile  string
	tokenFile string
}

// startCA starts a control plane the way the simulator does (ServingTLS,
// then Start with its configuration) and writes node1's token.
func startCA(t *testing.T) *caEnv {
	t.Helper()
	dir := t.TempDir()
	cfg, rootFile, err := controlplane.ServingTLS(dir)
	if err != nil {
		t.Fatal(err)
	}
	e := &caEnv{tls: cfg, rootFile: rootFile, tokenFile: filepath.Join(dir, "istio-token")}
	e.start(t, "")
	tok, err := e.cp.NodeToken(context.Background(), "node1")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(e.tokenFile, []byte(tok), 0o600); err != nil {
		t.Fatal(err)
	}
	return e
}

// start (re)starts the control plane at addr ("" for any) with the
// fixture and node1's proxy pod.
func (e *caEnv) start(t *testing.T, addr string) {
	t.Helper()
	cp, err := controlplane.Start(controlplane.Options{
		Objects: caObjects, KubeObjects: []runtime.Object{controlplane.NodeProxyPod("node1")},
		Addr: addr, TLS: e.tls, ClusterID: "Kubernetes",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cp.Stop)
	e.cp = cp
}

func (e *caEnv) client(t *testing.T, ttl time.Duration) *identity.CAClient {
	t.Helper()
	c, err := identity.NewCAClient(identity.CAConfig{
		Istiod: istiod.Config{Addr: e.cp.CAAddr, RootFile: e.rootFile, TokenFile: e.tokenFile, ClusterID: "Kubernetes"}, TTL: ttl,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func (e *caEnv) manager(t *testing.T, ttl time.Duration, reg prometheus.Registerer) *identity.Manager {
	t.Helper()
	m, err := identity.NewManager(identity.ManagerConfig{
		Fetcher: e.client(t, ttl), RootFile: e.rootFile, Registerer: reg,
		// Short retries: the 150 s cap is covered by the unit tests.
		InitialBackoff: 100 * time.Millisecond, MaxBackoff: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	return m
}

func TestCAIssuesForPodsOnTheNode(t *testing.T) {
	e := startCA(t)
	if e.cp.CAAddr != e.cp.Addr {
		t.Fatalf("CA at %q, xDS at %q: want one port, as istiod", e.cp.CAAddr, e.cp.Addr)
	}
	ctx := context.Background()
	cert, err := e.client(t, time.Hour).Fetch(ctx, sleepID)
	if err != nil {
		t.Fatal(err)
	}
	root := e.cp.CARoot()
	if len(cert.Roots) != 1 || !cert.Roots[0].Equal(root) {
		t.Fatal("the CA returned another root than the mesh root")
	}
	if _, err := cert.Leaf.Verify(x509.VerifyOptions{Roots: pool(root), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("workload certificate does not verify to the mesh root: %v", err)
	}
	if d := time.Until(cert.NotAfter); d < 59*time.Minute || d > time.Hour {
		t.Fatalf("validity %v, asked for 1h", d)
	}

	// The same root file verifies istiod's serving certificate.
	fileRoots := x509.NewCertPool()
	b, _ := os.ReadFile(e.rootFile)
	fileRoots.AppendCertsFromPEM(b)
	conn, err := tls.Dial("tcp", e.cp.Addr, &tls.Config{RootCAs: fileRoots, ServerName: controlplane.IstiodName, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatalf("istiod's certificate with the mesh root file: %v", err)
	}
	conn.Close()
}

// xDS on the shared port: a daemon with the node's token and the mesh
// root file gets its Address resources (xDS stays unauthenticated).
func TestXDSBesideTheCA(t *testing.T) {
	e := startCA(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	got := make(chan string, 16)
	c := xds.New(xds.Config{
		Istiod: istiod.Config{Addr: e.cp.Addr, RootFile: e.rootFile, ServerName: controlplane.IstiodName,
			TokenFile: e.tokenFile, ClusterID: "Kubernetes"},
		Node:  &core.Node{Id: "ztunnel~10.0.1.1~ztunnel-node1.istio-system~istio-system.svc.cluster.local"},
		Types: []string{xds.AddressType},
		Handler: func(_ string, rs *xds.Resources, _ []string) []xds.Rejection {
			for r := range rs.All() {
				got <- r.Name
			}
			return nil
		},
	})
	go func() { _ = c.Run(ctx) }()
	for {
		select {
		case name := <-got:
			if strings.Contains(name, "sleep") {
				return
			}
		case <-ctx.Done():
			t.Fatal("no Address for sleep over xDS")
		}
	}
}

func TestCARefuses(t *testing.T) {
	e := startCA(t)
	ctx := context.Background()
	client := e.client(t, time.Hour)
	refused := func(t *testing.T, id identity.Identity, wantMsg string) {
		t.Helper()
		_, err := client.Fetch(ctx, id)
		var ce *identity.CAError
		if !errors.As(err, &ce) || ce.Code != codes.Unauthenticated || !errors.Is(err, identity.ErrCARefused) {
			t.Fatalf("got %v, want a refusal", err)
		}
		if !strings.Contains(ce.Message, wantMsg) {
			t.Fatalf("message %q, want %q", ce.Message, wantMsg)
		}
	}
	t.Run("pod on another node", func(t *testing.T) { refused(t, httpbinID, "impersonation") })
	t.Run("no such pod", func(t *testing.T) {
		refused(t, identity.Identity{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "ghost"}, "impersonation")
	})
	t.Run("no clusterid", func(t *testing.T) {
		// The token is reviewed (a missing clusterid means the local
		// cluster), but the node authorizer is looked up by cluster.
		c, err := identity.NewCAClient(identity.CAConfig{Istiod: istiod.Config{Addr: e.cp.CAAddr, RootFile: e.rootFile, TokenFile: e.tokenFile}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Fetch(ctx, sleepID); !errors.Is(err, identity.ErrCARefused) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("a workload's own token", func(t *testing.T) {
		tok, err := e.cp.PodToken(ctx, "default", "sleep")
		if err != nil {
			t.Fatal(err)
		}
		writeToken(t, e.tokenFile, tok)
		refused(t, sleepID, "impersonation") // sleep is not a trusted node account
	})
	t.Run("forged token", func(t *testing.T) {
		other, err := controlplane.NewPKI("", "")
		if err != nil {
			t.Fatal(err)
		}
		writeToken(t, e.tokenFile, other.MintToken(controlplane.Token{
			Namespace: controlplane.NodeProxyNamespace, ServiceAccount: controlplane.NodeProxyServiceAccount}))
		refused(t, sleepID, "authenticate failure")
	})
	t.Run("node proxy pod gone", func(t *testing.T) {
		tok, err := e.cp.NodeToken(ctx, "node1")
		if err != nil {
			t.Fatal(err)
		}
		writeToken(t, e.tokenFile, tok)
		if _, err := client.Fetch(ctx, sleepID); err != nil {
			t.Fatal(err)
		}
		pod := controlplane.NodeProxyPod("node1")
		if err := e.cp.Kube().Kube().CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		refused(t, sleepID, "authenticate failure") // a bound token dies with its pod
	})
}

func TestTokenReview(t *testing.T) {
	e := startCA(t)
	ctx := context.Background()
	tok, _ := os.ReadFile(e.tokenFile)
	review := func(token string, aud ...string) authv1.TokenReviewStatus {
		t.Helper()
		r, err := e.cp.Kube().Kube().AuthenticationV1().TokenReviews().Create(ctx,
			&authv1.TokenReview{Spec: authv1.TokenReviewSpec{Token: token, Audiences: aud}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return r.Status
	}
	st := review(string(tok), "istio-ca")
	pod := controlplane.NodeProxyPod("node1")
	if !st.Authenticated || st.User.Username != "system:serviceaccount:istio-system:ztunnel" ||
		st.User.Extra["authentication.kubernetes.io/pod-name"][0] != pod.Name ||
		st.User.Extra["authentication.kubernetes.io/pod-uid"][0] != string(pod.UID) ||
		len(st.Audiences) != 1 || st.Audiences[0] != "istio-ca" {
		t.Fatalf("node token review: %+v", st)
	}
	if st := review(string(tok)); st.Authenticated {
		t.Fatal("istio-ca token accepted for the API server's own audience")
	}
	if st := review(string(tok) + "x"); st.Authenticated {
		t.Fatal("tampered token accepted")
	}
	expired := e.cp.PKI().MintToken(controlplane.Token{Namespace: "a", ServiceAccount: "b", Expiry: time.Now().Add(-time.Second)})
	if st := review(expired, "istio-ca"); st.Authenticated {
		t.Fatal("expired token accepted")
	}
}

func TestSignWorkloadCert(t *testing.T) {
	e := startCA(t)
	c, err := e.cp.SignWorkloadCert("spiffe://cluster.local/ns/default/sa/sleep", time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	id, err := identity.FromCertificate(c.Leaf)
	if err != nil || id != sleepID {
		t.Fatalf("identity %v, %v", id, err)
	}
	opts := x509.VerifyOptions{Roots: pool(e.cp.CARoot()), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}
	if _, err := c.Leaf.Verify(opts); err != nil {
		t.Fatal(err)
	}
	foreign, err := controlplane.NewPKI("", "other.domain")
	if err != nil {
		t.Fatal(err)
	}
	fc, err := foreign.SignWorkloadCert("spiffe://other.domain/ns/default/sa/sleep", time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fc.Leaf.Verify(opts); err == nil {
		t.Fatal("a foreign root's certificate verified to the mesh root")
	}
	past := time.Now().Add(-48 * time.Hour)
	old, err := e.cp.SignWorkloadCert(sleepID.String(), past, past.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := old.Leaf.Verify(opts); err == nil {
		t.Fatal("expired certificate verified")
	}
}

// Rotation before expiry, then a CA outage: the valid certificate is kept
// and renewal resumes when the CA is back.
func TestManagerRotationAndCAOutage(t *testing.T) {
	e := startCA(t)
	m := e.manager(t, 4*time.Second, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := m.Acquire(sleepID); err != nil {
		t.Fatal(err)
	}
	first, err := m.Certificate(ctx, sleepID)
	if err != nil {
		t.Fatal(err)
	}
	second := waitRenewed(t, m, first)
	if !second.Received.Before(first.NotAfter) {
		t.Fatal("renewed only after expiry")
	}

	e.cp.SetCAOutage(true)
	time.Sleep(time.Until(second.RefreshAt()) + 500*time.Millisecond)
	if c, err := m.Certificate(ctx, sleepID); err != nil || c != second {
		t.Fatalf("during the outage: %v (same certificate: %v)", err, c == second)
	}
	e.cp.SetCAOutage(false)
	third := waitRenewed(t, m, second)
	if !third.Received.Before(second.NotAfter) {
		t.Fatal("renewed only after expiry")
	}
}

// The control plane goes away and comes back at the same address with the
// same PKI: renewal resumes, from the same root.
func TestManagerAcrossControlPlaneRestart(t *testing.T) {
	e := startCA(t)
	reg := prometheus.NewRegistry()
	m := e.manager(t, 6*time.Second, reg)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := m.Acquire(sleepID); err != nil {
		t.Fatal(err)
	}
	first, err := m.Certificate(ctx, sleepID)
	if err != nil {
		t.Fatal(err)
	}
	addr := e.cp.Addr
	e.cp.Stop()
	time.Sleep(time.Until(first.RefreshAt()) + 300*time.Millisecond)
	if c, err := m.Certificate(ctx, sleepID); err != nil || c != first {
		t.Fatalf("control plane down: %v", err)
	}
	if n := csrCount(t, reg, "unavailable"); n == 0 {
		t.Fatal("no failed renewal counted while the CA was down")
	}
	e.start(t, addr)
	second := waitRenewed(t, m, first)
	if !second.Received.Before(first.NotAfter) {
		t.Fatal("renewed only after expiry")
	}
	if !second.Roots[0].Equal(first.Roots[0]) {
		t.Fatal("restarted control plane has another root")
	}

	// The last pod of the service account leaves: the certificate goes.
	m.Release(sleepID)
	if _, err := m.Certificate(ctx, sleepID); !errors.Is(err, identity.ErrNotAcquired) {
		t.Fatalf("after release: %v", err)
	}
	before := csrCount(t, reg, "success")
	time.Sleep(time.Until(second.RefreshAt()) + 300*time.Millisecond)
	if after := csrCount(t, reg, "success"); after != before {
		t.Fatal("released identity still renewed")
	}
}

// waitRenewed waits for a certificate other than old, at most until old
// expires.
func waitRenewed(t *testing.T, m *identity.Manager, old *identity.Certificate) *identity.Certificate {
	t.Helper()
	for time.Now().Before(old.NotAfter) {
		c, err := m.Certificate(context.Background(), old.Identity)
		if err == nil && c.Leaf.SerialNumber.Cmp(old.Leaf.SerialNumber) != 0 {
			return c
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("certificate %s not renewed before it expired", old.Leaf.SerialNumber)
	return nil
}

func csrCount(t *testing.T, g prometheus.Gatherer, result string) float64 {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "kmesh_identity_csr_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			if m.GetLabel()[0].GetValue() == result {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func writeToken(t *testing.T, file, tok string) {
	t.Helper()
	if err := os.WriteFile(file, []byte(tok), 0o600); err != nil {
		t.Fatal(err)
	}
}

func pool(c *x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c)
	return p
}
