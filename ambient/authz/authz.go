// Package authz decides whether an inbound connection may reach its
// destination workload under the L4 AuthorizationPolicies istiod sends to
// node proxies, with the same semantics as ztunnel (src/rbac.rs for one
// policy, DemandProxyState::assert_rbac in src/state.rs for the set).
//
// The package is pure: no I/O, no locks, no clock, no logging. The inputs
// are the policies (state.Store.PoliciesFor already picked the global,
// namespace and selector-scoped ones for the destination) and what the
// tunnel knows about the connection; the output is a Decision. That keeps
// every rule testable in a table without sockets, and lets the caller decide
// how to log and count.
//
// The tunnel calls it on its inbound path, once it knows the destination
// workload and (over HBONE) has verified the peer certificate, and before it
// dials the application: a denied HBONE CONNECT is answered 401
// Unauthorized, a denied plaintext connection is reset. Compile the
// workload's policies once, cache the Set with the workload, and compile
// again when the state reports a change to that workload or to any policy;
// (*Set).Evaluate then runs per connection without allocating.
package authz

import (
	"net/netip"
	"strings"

	"kmesh.dev/kmesh/ambient/identity/spiffe"
	"kmesh.dev/kmesh/ambient/state"
)

// Conn is what the decision looks at. Addresses may be IPv4-mapped IPv6 (a
// dual-stack socket's view); they are compared as IPv4.
type Conn struct {
	SrcIP   netip.Addr
	DstIP   netip.Addr
	DstPort uint16
	// SrcIdentity is the peer's verified identity, nil for plaintext.
	SrcIdentity *spiffe.Identity
}

// Reason says which rule of the ALLOW/DENY algorithm decided.
type Reason uint8

const (
	// NoAllowPolicies: no DENY policy matched and no enforced ALLOW policy
	// applies to the destination, so the connection is allowed.
	NoAllowPolicies Reason = iota
	// AllowMatched: Decision.Policy allowed the connection.
	AllowMatched
	// DenyMatched: Decision.Policy denied the connection.
	DenyMatched
	// NoAllowMatched: ALLOW policies apply but none matched: denied.
	NoAllowMatched
)

func (r Reason) String() string {
	switch r {
	case NoAllowPolicies:
		return "no allow policies"
	case AllowMatched:
		return "allow policy matched"
	case DenyMatched:
		return "deny policy matched"
	case NoAllowMatched:
		return "no allow policy matched"
	}
	return "unknown"
}

// Decision is the verdict on one connection.
type Decision struct {
	Allow  bool
	Reason Reason
	// Policy is the deciding policy, "namespace/name", for AllowMatched and
	// DenyMatched; empty otherwise.
	Policy string
	// DryRun reports what the dry-run policies would have done.
	DryRun DryRun
}

// String is ztunnel's wording, for logs and the 401 body.
func (d Decision) String() string {
	switch d.Reason {
	case DenyMatched:
		return "explicitly denied by: " + d.Policy
	case NoAllowMatched:
		return "allow policies exist, but none allowed"
	case AllowMatched:
		return "allowed by: " + d.Policy
	}
	return "no allow policies"
}

// DryRun is the outcome of the policies marked dry-run (the istio.io/dry-run
// annotation). They are evaluated and reported but never enforced: they do
// not change Decision.Allow, and a dry-run ALLOW policy does not count as
// "an ALLOW policy applies".
type DryRun struct {
	// Applies is true when dry-run policies apply to the destination; the
	// other fields mean something only then.
	Applies bool
	// Deny is the first dry-run DENY policy that matched ("namespace/name").
	Deny string
	// Allow is the first dry-run ALLOW policy that matched. As in ztunnel,
	// dry-run ALLOW policies are not looked at once an enforced DENY matched.
	Allow string
	// WouldAllow is the decision had the dry-run policies been enforced
	// alongside the others. Applies && WouldAllow != Decision.Allow is the
	// case worth logging before an operator removes the annotation.
	WouldAllow bool
}

// Evaluate compiles policies and evaluates one connection: for tests and
// one-off checks. The per-connection path should cache Compile's Set.
func Evaluate(policies []state.Policy, c Conn) Decision {
	return Compile(policies).Evaluate(c)
}

// Evaluate decides one connection: DENY policies first (any match denies),
// then allow when no ALLOW policy applies, allow when one matches, deny
// otherwise. A nil Set has no policies and allows everything.
func (s *Set) Evaluate(c Conn) Decision {
	if s == nil {
		return Decision{Allow: true, Reason: NoAllowPolicies}
	}
	c.SrcIP = c.SrcIP.Unmap().WithZone("")
	c.DstIP = c.DstIP.Unmap().WithZone("")

	dr := DryRun{Applies: len(s.dryDeny)+len(s.dryAllow) > 0}
	// ztunnel looks at dry-run DENY policies before the enforced ones so a
	// match is reported even when an enforced DENY decides.
	if p := firstMatch(s.dryDeny, &c); p != nil {
		dr.Deny = p.key
	}
	if p := firstMatch(s.deny, &c); p != nil {
		return Decision{Allow: false, Reason: DenyMatched, Policy: p.key, DryRun: dr}
	}
	if p := firstMatch(s.dryAllow, &c); p != nil {
		dr.Allow = p.key
	}

	var d Decision
	switch p := firstMatch(s.allow, &c); {
	case len(s.allow) == 0:
		d = Decision{Allow: true, Reason: NoAllowPolicies}
	case p != nil:
		d = Decision{Allow: true, Reason: AllowMatched, Policy: p.key}
	default:
		d = Decision{Allow: false, Reason: NoAllowMatched}
	}
	if dr.Applies {
		switch {
		case dr.Deny != "":
			dr.WouldAllow = false
		case len(s.allow)+len(s.dryAllow) == 0:
			dr.WouldAllow = true
		default:
			dr.WouldAllow = d.Reason == AllowMatched || dr.Allow != ""
		}
	}
	d.DryRun = dr
	return d
}

func firstMatch(ps []policy, c *Conn) *policy {
	for i := range ps {
		if ps[i].matches(c) {
			return &ps[i]
		}
	}
	return nil
}

// matches is ztunnel's Authorization::matches. A policy without groups
// matches nothing (so an ALLOW policy with an empty spec allows nothing);
// groups are ORed, a group's rules ANDed (an empty group matches
// everything), a rule's matches ORed (a rule without matches is satisfied,
// but a match with no conditions never matches).
func (p *policy) matches(c *Conn) bool {
	for gi := range p.groups {
		if p.groups[gi].matches(c) {
			return true
		}
	}
	return false
}

func (g *group) matches(c *Conn) bool {
	for ri := range g.rules {
		if !g.rules[ri].matches(c) {
			return false
		}
	}
	return true
}

func (r *rule) matches(c *Conn) bool {
	if r.always {
		return true
	}
	for mi := range r.oneOf {
		if r.oneOf[mi].matches(c) {
			return true
		}
	}
	return false
}

// matches: every field present must hold (ANDed); a field holds when any of
// its values matches (ORed) and none of its not_ values does. Cheap fields
// first; the result does not depend on the order.
func (m *match) matches(c *Conn) bool {
	return anyPort(m.ports, m.notPorts, c.DstPort) &&
		anyPrefix(m.dstIPs, m.notDstIPs, c.DstIP) &&
		anyPrefix(m.srcIPs, m.notSrcIPs, c.SrcIP) &&
		anySA(m.sas, m.notSAs, c.SrcIdentity) &&
		anyNamespace(m.namespaces, m.notNamespaces, c.SrcIdentity) &&
		anyPrincipal(m.principals, m.notPrincipals, c.SrcIdentity)
}

// Each field is ztunnel's matches_internal: an empty list holds, a
// positive list needs one hit, a negative list needs none.

func anyPort(pos, neg []uint32, port uint16) bool {
	return (len(pos) == 0 || hasPort(pos, port)) && (len(neg) == 0 || !hasPort(neg, port))
}

func hasPort(l []uint32, port uint16) bool {
	for _, p := range l {
		if p == uint32(port) {
			return true
		}
	}
	return false
}

func anyPrefix(pos, neg []netip.Prefix, a netip.Addr) bool {
	return (len(pos) == 0 || hasPrefix(pos, a)) && (len(neg) == 0 || !hasPrefix(neg, a))
}

func hasPrefix(l []netip.Prefix, a netip.Addr) bool {
	for _, p := range l {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// anySA matches namespace and service account exactly, ignoring the trust
// domain. Plaintext has no service account: it never matches.
func anySA(pos, neg []saMatch, id *spiffe.Identity) bool {
	return (len(pos) == 0 || hasSA(pos, id)) && (len(neg) == 0 || !hasSA(neg, id))
}

func hasSA(l []saMatch, id *spiffe.Identity) bool {
	if id == nil {
		return false
	}
	for _, s := range l {
		if s.namespace == id.Namespace && s.serviceAccount == id.ServiceAccount {
			return true
		}
	}
	return false
}

// anyNamespace: plaintext's namespace is "" (ztunnel's unwrap_or_default),
// which presence never matches but exact "" and empty prefixes do.
func anyNamespace(pos, neg []strMatch, id *spiffe.Identity) bool {
	if len(pos)+len(neg) == 0 {
		return true
	}
	ns := ""
	if id != nil {
		ns = id.Namespace
	}
	return (len(pos) == 0 || hasString(pos, ns)) && (len(neg) == 0 || !hasString(neg, ns))
}

func hasString(l []strMatch, s string) bool {
	for _, m := range l {
		if m.matches(s) {
			return true
		}
	}
	return false
}

// anyPrincipal: plaintext has no principal, so no principal matcher (not
// even presence) matches it — a plaintext connection fails "principals" and
// passes "not_principals".
func anyPrincipal(pos, neg []strMatch, id *spiffe.Identity) bool {
	return (len(pos) == 0 || hasPrincipal(pos, id)) && (len(neg) == 0 || !hasPrincipal(neg, id))
}

func hasPrincipal(l []strMatch, id *spiffe.Identity) bool {
	if id == nil {
		return false
	}
	pr := principal{id.TrustDomain, "/ns/", id.Namespace, "/sa/", id.ServiceAccount}
	for _, m := range l {
		if m.matchesPrincipal(&pr) {
			return true
		}
	}
	return false
}

func (m strMatch) matches(s string) bool {
	switch m.kind {
	case exact:
		return s == m.s
	case prefix:
		return strings.HasPrefix(s, m.s)
	case suffix:
		return strings.HasSuffix(s, m.s)
	default: // presence
		return s != ""
	}
}

// principal is "<td>/ns/<ns>/sa/<sa>" in pieces: matching against the
// pieces spares building the string for every connection.
type principal [5]string

func (m strMatch) matchesPrincipal(p *principal) bool {
	switch m.kind {
	case exact:
		return p.len() == len(m.s) && p.hasPrefix(m.s)
	case prefix:
		return p.hasPrefix(m.s)
	case suffix:
		return p.hasSuffix(m.s)
	default: // presence: the principal always holds "/ns/"
		return true
	}
}

func (p *principal) len() int {
	n := 0
	for _, s := range p {
		n += len(s)
	}
	return n
}

func (p *principal) hasPrefix(pre string) bool {
	for _, s := range p {
		if len(pre) <= len(s) {
			return strings.HasPrefix(s, pre)
		}
		if pre[:len(s)] != s {
			return false
		}
		pre = pre[len(s):]
	}
	return false
}

func (p *principal) hasSuffix(suf string) bool {
	for i := len(p) - 1; i >= 0; i-- {
		s := p[i]
		if len(suf) <= len(s) {
			return strings.HasSuffix(s, suf)
		}
		if suf[len(suf)-len(s):] != s {
			return false
		}
		suf = suf[:len(suf)-len(s)]
	}
	return false
}
