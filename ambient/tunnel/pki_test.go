package tunnel

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"sync"
	"testing"
	"time"

	"kmesh.dev/kmesh/ambient/identity"
	"kmesh.dev/kmesh/ambient/identity/spiffe"
)

// testCA issues SPIFFE workload certificates the way Istio's CA does (one
// URI SAN, no subject), so the tunnel's checks can be tested without a
// control plane; the node simulator's tests use Istio's real CA.
type testCA struct {
	root    *x509.Certificate
	key     *ecdsa.PrivateKey
	serial  int64
	mu      sync.Mutex
	pool    *x509.CertPool
	byIdent map[identity.Identity]*identity.Certificate
}

func newTestCA(t testing.TB, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{Organization: []string{name}},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(root)
	return &testCA{root: root, key: key, serial: 1, pool: pool, byIdent: map[identity.Identity]*identity.Certificate{}}
}

// issue signs a leaf for uri valid in [notBefore, notAfter).
func (ca *testCA) issue(t testing.TB, uri string, notBefore, notAfter time.Time) *identity.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(uri)
	if err != nil {
		t.Fatal(err)
	}
	ca.mu.Lock()
	ca.serial++
	serial := ca.serial
	ca.mu.Unlock()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), URIs: []*url.URL{u},
		NotBefore: notBefore, NotAfter: notAfter, KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.root, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	id, _ := spiffe.Parse(uri)
	return &identity.Certificate{Identity: id, TLS: tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf},
		Leaf: leaf, Roots: []*x509.Certificate{ca.root}, NotAfter: notAfter}
}

// Certificate implements Certs: a valid certificate per identity.
func (ca *testCA) Certificate(_ context.Context, id identity.Identity) (*identity.Certificate, error) {
	ca.mu.Lock()
	c := ca.byIdent[id]
	ca.mu.Unlock()
	if c != nil {
		return c, nil
	}
	c = ca.issue(nopTB{}, id.String(), time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	ca.mu.Lock()
	ca.byIdent[id] = c
	ca.mu.Unlock()
	return c, nil
}

func (ca *testCA) Roots() *x509.CertPool { return ca.pool }

// nopTB lets issue run outside a test's goroutine (it never fails there).
type nopTB struct{ testing.TB }

func (nopTB) Helper()           {}
func (nopTB) Fatal(args ...any) { panic(args) }
