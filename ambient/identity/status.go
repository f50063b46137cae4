package identity

import (
	"slices"
	"strings"
)

// Held is one identity as the manager holds it, for the admin dump
// (ztunnel's "certificates": istioctl ztunnel-config certificates).
type Held struct {
	Identity Identity
	// Cert is the latest certificate issued (it may have expired); nil
	// before the first one arrives. Certificates are never modified once
	// issued, so it is shared, not copied.
	Cert *Certificate
	// Err is the last attempt's error; nil after a success and before
	// the first answer.
	Err error
	// Refs is how many pods on the node use the identity.
	Refs int
}

// Held returns every identity the manager holds, sorted by identity. It
// is a read-only view: nothing a caller does with it reaches the manager.
func (m *Manager) Held() []Held {
	m.mu.Lock()
	out := make([]Held, 0, len(m.entries))
	for id, e := range m.entries {
		out = append(out, Held{Identity: id, Cert: e.cert, Err: e.err, Refs: e.refs})
	}
	m.mu.Unlock()
	slices.SortFunc(out, func(a, b Held) int { return strings.Compare(a.Identity.String(), b.Identity.String()) })
	return out
}
