package controlplane

import "crypto/tls"

// IstiodName is the name istiod's serving certificate carries, as in a
// cluster: node proxies verify it (ALT_XDS_HOSTNAME in ztunnel's terms).
const IstiodName = "istiod.istio-system.svc"

// ServingTLS makes the mesh's PKI (NewPKI: an Istio CA root for
// cluster.local and istiod's serving certificate from it, for IstiodName
// and 127.0.0.1), writes the root to dir/root-cert.pem and returns the
// server's TLS configuration and the root file.
//
// The returned configuration stands for the PKI: a control plane started
// with it (Options.TLS) serves the CA from the same root, so one root file
// verifies xDS, the CA and workload certificates, and a control plane
// restarted with it keeps root and tokens.
func ServingTLS(dir string) (*tls.Config, string, error) {
	p, err := NewPKI(dir, "")
	if err != nil {
		return nil, "", err
	}
	return p.ServingTLS(), p.RootFile(), nil
}
