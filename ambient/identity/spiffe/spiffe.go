// Package spiffe is a workload's identity as Istio issues it, a SPIFFE ID
// of the form spiffe://<trust domain>/ns/<namespace>/sa/<service account>:
// the one Identity type the CA client, the tunnel and authorization share.
// It imports nothing beyond errors, fmt and strings, so pure decision code
// (ambient/authz) can use it without the CA client's gRPC, Prometheus and
// crypto.
package spiffe

import (
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

// ErrBadIdentity is wrapped by every error of Parse (and of
// identity.FromCertificate).
var ErrBadIdentity = errors.New("not an Istio SPIFFE identity")

// String is the SPIFFE URI.
func (id Identity) String() string {
	return spiffeScheme + id.TrustDomain + "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount
}

// Principal is the identity the way Istio writes principals in policies:
// "<td>/ns/<ns>/sa/<sa>", without the "spiffe://" scheme.
func (id Identity) Principal() string {
	return id.TrustDomain + "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount
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
