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
	"fmt"

	"kmesh.dev/kmesh/ambient/identity/spiffe"
)

// Identity is a workload's SPIFFE identity (the same type as
// spiffe.Identity, named here for the many callers that deal in
// certificates).
type Identity = spiffe.Identity

// FromCertificate is the identity a workload certificate carries: it must
// have exactly one URI SAN, and that must parse. DNS and IP SANs are ignored.
func FromCertificate(c *x509.Certificate) (Identity, error) {
	if c == nil {
		return Identity{}, fmt.Errorf("%w: no certificate", spiffe.ErrBadIdentity)
	}
	if len(c.URIs) != 1 {
		return Identity{}, fmt.Errorf("%w: certificate has %d URI SANs, want exactly one", spiffe.ErrBadIdentity, len(c.URIs))
	}
	return spiffe.Parse(c.URIs[0].String())
}
