// Package identity gives the node daemon the workload certificates its pods'
// service accounts need, as ztunnel does: it asks istiod's CA
// (istio.v1.auth.IstioCertificateService) for one certificate per service
// account with pods on this node, on their behalf (node impersonation),
// keeps them fresh, and tells the data path which roots the mesh trusts.
//
// The pieces, from the wire inwards:
//   - CAClient sends a CSR for one identity and turns the answer into a
//     Certificate (ParseCertChain checks it; it is a pure function).
//   - Manager holds one certificate per acquired identity, rotates it at
//     half life, keeps serving a still-valid one while the CA is down, and
//     drops it when the last pod using it is gone.
package identity

import (
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
)

// Identity is a workload's SPIFFE identity, as Istio issues them:
// spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
type Identity struct {
	TrustDomain    string
	Namespace      string
	ServiceAccount string
}

const spiffeScheme = "spiffe://"

// ErrBadIdentity is wrapped by every error of Parse and FromCertificate.
var ErrBadIdentity = errors.New("not an Istio SPIFFE identity")

// String is the SPIFFE URI.
func (id Identity) String() string {
	return spiffeScheme + id.TrustDomain + "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount
}

// Validate reports whether every part is non-empty and made of the
// characters SPIFFE allows (trust domain: lower-case letters, digits, '.',
// '-', '_'; path segments: letters, digits, '.', '-', '_', and not "." or
// "..").
func (id Identity) Validate() error {
	if !validTrustDomain(id.TrustDomain) {
		return fmt.Errorf("%w: trust domain %q", ErrBadIdentity, id.TrustDomain)
	}
	if !validSegment(id.Namespace) {
		return fmt.Errorf("%w: namespace %q", ErrBadIdentity, id.Namespace)
	}
	if !validSegment(id.ServiceAccount) {
		return fmt.Errorf("%w: service account %q", ErrBadIdentity, id.ServiceAccount)
	}
	return nil
}

// Parse reads a SPIFFE URI of exactly the form String produces. Anything
// else (other paths, query, fragment, port, user info, percent-encoding,
// upper-case scheme or trust domain) is refused rather than normalised: an
// identity compared against policy must have one spelling.
func Parse(s string) (Identity, error) {
	rest, ok := strings.CutPrefix(s, spiffeScheme)
	if !ok {
		return Identity{}, fmt.Errorf("%w: %q does not start with %s", ErrBadIdentity, s, spiffeScheme)
	}
	parts := strings.Split(rest, "/")
	if len(parts) != 5 || parts[1] != "ns" || parts[3] != "sa" {
		return Identity{}, fmt.Errorf("%w: %q is not spiffe://<trust domain>/ns/<namespace>/sa/<service account>", ErrBadIdentity, s)
	}
	id := Identity{TrustDomain: parts[0], Namespace: parts[2], ServiceAccount: parts[4]}
	if err := id.Validate(); err != nil {
		return Identity{}, fmt.Errorf("%q: %w", s, err)
	}
	return id, nil
}

// FromCertificate is the identity a workload certificate carries: it must
// have exactly one URI SAN, and that must parse. DNS and IP SANs are ignored.
func FromCertificate(c *x509.Certificate) (Identity, error) {
	if c == nil {
		return Identity{}, fmt.Errorf("%w: no certificate", ErrBadIdentity)
	}
	if len(c.URIs) != 1 {
		return Identity{}, fmt.Errorf("%w: certificate has %d URI SANs, want exactly one", ErrBadIdentity, len(c.URIs))
	}
	return Parse(c.URIs[0].String())
}

func validTrustDomain(s string) bool {
	if s == "" || len(s) > 255 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

func validSegment(s string) bool {
	if s == "" || s == "." || s == ".." {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}
