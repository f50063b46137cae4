package identity

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"sync/atomic"
	"testing"
	"time"
)

// testCA is a root (and optionally an intermediate) that signs workload
// certificates the way Istio's CA does: empty subject, one URI SAN,
// NotBefore backdated two minutes.
type testCA struct {
	root    *x509.Certificate
	rootKey crypto.Signer
	// signer is the intermediate when present, else the root.
	signer    *x509.Certificate
	signerKey crypto.Signer
}

func newTestCA(t testing.TB, org string, intermediate bool) *testCA {
	t.Helper()
	now := time.Now()
	key := mustKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{Organization: []string{org}},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(10 * 365 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(der)
	ca := &testCA{root: root, rootKey: key, signer: root, signerKey: key}
	if intermediate {
		ikey := mustKey(t)
		itmpl := &x509.Certificate{
			SerialNumber: big.NewInt(2), Subject: pkix.Name{Organization: []string{org}, CommonName: "intermediate"},
			NotBefore: tmpl.NotBefore, NotAfter: tmpl.NotAfter,
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
		}
		ider, err := x509.CreateCertificate(rand.Reader, itmpl, root, ikey.Public(), key)
		if err != nil {
			t.Fatal(err)
		}
		ca.signer, _ = x509.ParseCertificate(ider)
		ca.signerKey = ikey
	}
	return ca
}

func mustKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

var serial atomic.Int64

// issue signs pub for uri (a SPIFFE URI or any URI; "" for none).
func (ca *testCA) issue(t testing.TB, pub crypto.PublicKey, uris []string, notBefore, notAfter time.Time) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(100 + serial.Add(1)), NotBefore: notBefore, NotAfter: notAfter,
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	for _, u := range uris {
		pu, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.signer, pub, ca.signerKey)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

// response is what Istio's CA answers: leaf, intermediates, root last.
func (ca *testCA) response(leaf *x509.Certificate) []string {
	out := []string{pemOf(leaf)}
	if ca.signer != ca.root {
		out = append(out, pemOf(ca.signer))
	}
	return append(out, pemOf(ca.root))
}

// workload issues a certificate for id valid for ttl from now, Istio style.
func (ca *testCA) workload(t testing.TB, id Identity, ttl time.Duration) (crypto.Signer, []string) {
	t.Helper()
	key := mustKey(t)
	now := time.Now()
	leaf := ca.issue(t, key.Public(), []string{id.String()}, now.Add(-2*time.Minute), now.Add(ttl))
	return key, ca.response(leaf)
}

func pemOf(c *x509.Certificate) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
}
