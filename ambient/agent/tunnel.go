package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"sync"

	"istio.io/istio/pkg/zdsapi"

	"kmesh.dev/kmesh/ambient/dnsproxy"
	"kmesh.dev/kmesh/ambient/identity"
	"kmesh.dev/kmesh/ambient/tunnel"
)

// meshPods connects enrolment to the user-space side of the data path:
// each enrolled pod gets its service account's certificate (prefetched
// now, so the first HBONE connection does not wait for the CA) and its
// tunnel listeners inside its namespace.
type meshPods struct {
	proxy       *tunnel.Proxy
	dns         *dnsproxy.Server  // nil: the DNS proxy is off
	ids         *identity.Manager // nil without a CA
	trustDomain string

	mu   sync.Mutex
	pods map[string]identity.Identity
}

func (m *meshPods) podAdded(uid, workloadUID string, info *zdsapi.WorkloadInfo, netns *os.File, cookie uint64) error {
	sa := info.GetServiceAccount()
	if sa == "" {
		sa = "default"
	}
	id := identity.Identity{TrustDomain: m.trustDomain, Namespace: info.GetNamespace(), ServiceAccount: sa}
	if m.ids != nil {
		if err := m.ids.Acquire(id); err != nil {
			return fmt.Errorf("certificate for %s: %w", id, err)
		}
	}
	// DNS listeners first: once the tunnel's are open the pod is about to
	// be enrolled, and the kernel sends its DNS to 15053 from then on.
	if m.dns != nil {
		if err := m.dns.AddPod(dnsproxy.Pod{UID: uid, WorkloadUID: workloadUID, Namespace: info.GetNamespace(), Netns: netns, Cookie: cookie}); err != nil {
			if m.ids != nil {
				m.ids.Release(id)
			}
			return fmt.Errorf("pod %s: %w", uid, err)
		}
	}
	if err := m.proxy.AddPod(tunnel.Pod{UID: uid, WorkloadUID: workloadUID, Identity: id, Netns: netns, Cookie: cookie}); err != nil {
		if m.dns != nil {
			m.dns.RemovePod(uid)
		}
		if m.ids != nil {
			m.ids.Release(id)
		}
		return err
	}
	m.mu.Lock()
	old, had := m.pods[uid]
	m.pods[uid] = id
	m.mu.Unlock()
	if had && m.ids != nil {
		m.ids.Release(old) // re-enrolment of the same pod: one reference each
	}
	return nil
}

func (m *meshPods) podRemoved(uid string, _ *zdsapi.WorkloadInfo) {
	m.proxy.RemovePod(uid)
	if m.dns != nil {
		m.dns.RemovePod(uid)
	}
	m.mu.Lock()
	id, had := m.pods[uid]
	delete(m.pods, uid)
	m.mu.Unlock()
	if had && m.ids != nil {
		m.ids.Release(id)
	}
}

// noCA answers for certificates when the daemon has no CA configured: the
// tunnel then refuses HBONE (plain destinations still work).
type noCA struct{}

var errNoCA = errors.New("no CA configured (CA_ADDRESS): HBONE needs workload certificates")

func (noCA) Certificate(context.Context, identity.Identity) (*identity.Certificate, error) {
	return nil, errNoCA
}

func (noCA) Roots() *x509.CertPool { return x509.NewCertPool() }
