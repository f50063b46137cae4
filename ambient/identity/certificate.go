package identity

import (
	"bytes"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"time"
)

// Certificate is one workload certificate with its key, ready for TLS.
type Certificate struct {
	Identity Identity
	// TLS holds the chain the workload presents (leaf first, then any
	// intermediates; never the root) and the private key; TLS.Leaf is set.
	TLS  tls.Certificate
	Leaf *x509.Certificate
	// Roots are the trust anchors the CA returned with the certificate.
	Roots    []*x509.Certificate
	NotAfter time.Time
	// Received is when the CA's answer arrived (the rotation schedule is
	// measured from it; see RefreshAt).
	Received time.Time
}

// minRefresh bounds how soon a fresh certificate is renewed, so a CA that
// hands out nearly expired certificates cannot make us spin.
const minRefresh = time.Second

// RefreshAt is when the certificate should be renewed: half way through its
// lifetime. The lifetime counts from NotBefore or from when we received the
// certificate, whichever is later: Istio's CA backdates NotBefore by two
// minutes for clock skew, so with short-lived certificates half of the
// nominal lifetime may already be over on arrival. For a 24 h certificate
// the difference is one minute.
func (c *Certificate) RefreshAt() time.Time {
	start := c.Leaf.NotBefore
	if c.Received.After(start) {
		start = c.Received
	}
	at := start.Add(c.NotAfter.Sub(start) / 2)
	if earliest := c.Received.Add(minRefresh); at.Before(earliest) {
		at = earliest
	}
	return at
}

// Reasons a CA response is refused; a *ChainError wraps one of them.
var (
	ErrEmptyChain       = errors.New("the CA returned no certificate")
	ErrMalformedChain   = errors.New("the CA returned a malformed certificate chain")
	ErrKeyMismatch      = errors.New("the certificate is not for our key")
	ErrIdentityMismatch = errors.New("the certificate is for another identity")
	ErrUntrustedChain   = errors.New("the certificate chain does not verify to the returned root")
)

// ChainError is a CA response ParseCertChain refused.
type ChainError struct {
	Identity Identity
	// Reason is one of the Err* values above.
	Reason error
	// Detail says what exactly was wrong (may be nil).
	Detail error
}

func (e *ChainError) Error() string {
	if e.Detail == nil {
		return fmt.Sprintf("certificate for %s: %v", e.Identity, e.Reason)
	}
	return fmt.Sprintf("certificate for %s: %v: %v", e.Identity, e.Reason, e.Detail)
}

func (e *ChainError) Unwrap() []error {
	if e.Detail == nil {
		return []error{e.Reason}
	}
	return []error{e.Reason, e.Detail}
}

// ParseCertChain turns the cert_chain of an IstioCertificateResponse into
// a Certificate for want, held by key. Istio's CA answers with one PEM
// certificate per element, leaf first, and the root bundle (one or more
// certificates) as the last element; intermediates, if any, in between.
//
// It checks that the leaf is for key's public key, carries exactly want's
// SPIFFE URI, and that leaf and intermediates verify, at now, to one of the
// returned roots. The CA connection is authenticated with the mesh root, so
// the returned roots are the CA's word on what the mesh trusts.
func ParseCertChain(chain []string, key crypto.Signer, want Identity, now time.Time) (*Certificate, error) {
	fail := func(reason, detail error) (*Certificate, error) {
		return nil, &ChainError{Identity: want, Reason: reason, Detail: detail}
	}
	if len(chain) == 0 {
		return fail(ErrEmptyChain, nil)
	}
	if len(chain) < 2 {
		return fail(ErrMalformedChain, errors.New("no root certificate after the leaf"))
	}
	elems := make([][]*x509.Certificate, len(chain))
	for i, s := range chain {
		certs, err := parsePEMCerts([]byte(s))
		if err != nil {
			return fail(ErrMalformedChain, fmt.Errorf("element %d: %w", i, err))
		}
		elems[i] = certs
	}
	leaf := elems[0][0]
	var intermediates []*x509.Certificate
	intermediates = append(intermediates, elems[0][1:]...)
	for _, e := range elems[1 : len(elems)-1] {
		intermediates = append(intermediates, e...)
	}
	roots := elems[len(elems)-1]

	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(leaf.PublicKey) {
		return fail(ErrKeyMismatch, nil)
	}
	got, err := FromCertificate(leaf)
	if err != nil {
		return fail(ErrIdentityMismatch, err)
	}
	if got != want {
		return fail(ErrIdentityMismatch, fmt.Errorf("got %s", got))
	}
	opts := x509.VerifyOptions{
		Roots:         x509.NewCertPool(),
		Intermediates: x509.NewCertPool(),
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}
	for _, r := range roots {
		opts.Roots.AddCert(r)
	}
	for _, c := range intermediates {
		opts.Intermediates.AddCert(c)
	}
	if _, err := leaf.Verify(opts); err != nil {
		return fail(ErrUntrustedChain, err)
	}
	out := &Certificate{
		Identity: want,
		Leaf:     leaf,
		Roots:    roots,
		NotAfter: leaf.NotAfter,
		Received: now,
		TLS:      tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: key, Leaf: leaf},
	}
	for _, c := range intermediates {
		out.TLS.Certificate = append(out.TLS.Certificate, c.Raw)
	}
	return out, nil
}

// parsePEMCerts reads one or more PEM CERTIFICATE blocks; anything else in
// the input (other block types, trailing bytes that are not whitespace) is
// an error.
func parsePEMCerts(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		rest := bytes.TrimSpace(b)
		if len(rest) == 0 {
			break
		}
		// pem.Decode skips text before a block; we do not.
		if !bytes.HasPrefix(rest, []byte("-----BEGIN ")) {
			return nil, errors.New("not PEM")
		}
		block, after := pem.Decode(rest)
		if block == nil {
			return nil, errors.New("not PEM")
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("unexpected PEM block %q", block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
		b = after
	}
	if len(out) == 0 {
		return nil, errors.New("no certificate")
	}
	return out, nil
}
