package authz

import (
	"net/netip"

	"istio.io/istio/pkg/workloadapi/security"

	"kmesh.dev/kmesh/ambient/state"
)

// Set is the compiled form of the policies applying to one destination
// workload: addresses parsed into prefixes, string matchers flattened,
// policies sorted by action and by dry-run. It is immutable and safe for
// concurrent use.
type Set struct {
	deny, allow       []policy
	dryDeny, dryAllow []policy
}

type policy struct {
	key    string // "namespace/name"
	groups []group
}

type group struct{ rules []rule }

type rule struct {
	// always: the rule had no matches at all, which ztunnel treats as
	// satisfied. Matches without any condition are dropped from oneOf
	// (they never match), so always is not the same as len(oneOf) == 0.
	always bool
	oneOf  []match
}

type match struct {
	ports, notPorts           []uint32
	dstIPs, notDstIPs         []netip.Prefix
	srcIPs, notSrcIPs         []netip.Prefix
	sas, notSAs               []saMatch
	namespaces, notNamespaces []strMatch
	principals, notPrincipals []strMatch
}

func (m *match) empty() bool {
	return len(m.ports)+len(m.notPorts)+len(m.dstIPs)+len(m.notDstIPs)+len(m.srcIPs)+len(m.notSrcIPs)+
		len(m.sas)+len(m.notSAs)+len(m.namespaces)+len(m.notNamespaces)+len(m.principals)+len(m.notPrincipals) == 0
}

type saMatch struct{ namespace, serviceAccount string }

type matchKind uint8

const (
	exact matchKind = iota
	prefix
	suffix
	presence
)

type strMatch struct {
	kind matchKind
	s    string
}

// Compile prepares the policies of one destination workload (as
// state.Store.PoliciesFor returns them) for Evaluate.
//
// Policies are expected to have passed state.ConvertPolicy. What it does
// not reject is handled as ztunnel's conversion does: a StringMatch with no
// match type and an address that is not an IPv4/IPv6 prefix are dropped
// (so a condition left with no values is treated as absent), extensions are
// ignored, and a policy with an action other than ALLOW or DENY is skipped,
// as ztunnel refuses it. A port above 65535 matches no connection.
func Compile(policies []state.Policy) *Set {
	s := &Set{}
	for _, p := range policies {
		a := p.Authorization
		if a == nil {
			continue
		}
		var list *[]policy
		switch a.GetAction() {
		case security.Action_ALLOW:
			list = &s.allow
			if a.GetDryRun() {
				list = &s.dryAllow
			}
		case security.Action_DENY:
			list = &s.deny
			if a.GetDryRun() {
				list = &s.dryDeny
			}
		default:
			continue
		}
		*list = append(*list, compilePolicy(p.Key(), a))
	}
	return s
}

func compilePolicy(key string, a *security.Authorization) policy {
	p := policy{key: key, groups: make([]group, 0, len(a.GetGroups()))}
	for _, g := range a.GetGroups() {
		cg := group{rules: make([]rule, 0, len(g.GetRules()))}
		for _, r := range g.GetRules() {
			cr := rule{always: len(r.GetMatches()) == 0}
			for _, m := range r.GetMatches() {
				if cm := compileMatch(m); !cm.empty() {
					cr.oneOf = append(cr.oneOf, cm)
				}
			}
			cg.rules = append(cg.rules, cr)
		}
		p.groups = append(p.groups, cg)
	}
	return p
}

func compileMatch(m *security.Match) match {
	return match{
		ports:         ports(m.GetDestinationPorts()),
		notPorts:      ports(m.GetNotDestinationPorts()),
		dstIPs:        prefixes(m.GetDestinationIps()),
		notDstIPs:     prefixes(m.GetNotDestinationIps()),
		srcIPs:        prefixes(m.GetSourceIps()),
		notSrcIPs:     prefixes(m.GetNotSourceIps()),
		sas:           serviceAccounts(m.GetServiceAccounts()),
		notSAs:        serviceAccounts(m.GetNotServiceAccounts()),
		namespaces:    strMatches(m.GetNamespaces()),
		notNamespaces: strMatches(m.GetNotNamespaces()),
		principals:    strMatches(m.GetPrincipals()),
		notPrincipals: strMatches(m.GetNotPrincipals()),
	}
}

func ports(l []uint32) []uint32 {
	if len(l) == 0 {
		return nil
	}
	return append([]uint32(nil), l...)
}

func prefixes(l []*security.Address) []netip.Prefix {
	var out []netip.Prefix
	for _, a := range l {
		if p, ok := addressPrefix(a); ok {
			out = append(out, p)
		}
	}
	return out
}

// addressPrefix turns istiod's (bytes, length) into a prefix with the host
// bits cleared, as ipnet's contains() ignores them. An IPv4-mapped address
// with a length of at least 96 is taken as the IPv4 prefix, since
// connections are compared unmapped.
func addressPrefix(a *security.Address) (netip.Prefix, bool) {
	ip, ok := netip.AddrFromSlice(a.GetAddress())
	if !ok {
		return netip.Prefix{}, false
	}
	bits := a.GetLength()
	if ip.Is4In6() && bits >= 96 {
		ip, bits = ip.Unmap(), bits-96
	}
	if bits > uint32(ip.BitLen()) {
		return netip.Prefix{}, false
	}
	p, err := ip.Prefix(int(bits))
	return p, err == nil
}

func serviceAccounts(l []*security.ServiceAccountMatch) []saMatch {
	var out []saMatch
	for _, s := range l {
		out = append(out, saMatch{namespace: s.GetNamespace(), serviceAccount: s.GetServiceAccount()})
	}
	return out
}

func strMatches(l []*security.StringMatch) []strMatch {
	var out []strMatch
	for _, m := range l {
		switch t := m.GetMatchType().(type) {
		case *security.StringMatch_Exact:
			out = append(out, strMatch{exact, t.Exact})
		case *security.StringMatch_Prefix:
			out = append(out, strMatch{prefix, t.Prefix})
		case *security.StringMatch_Suffix:
			out = append(out, strMatch{suffix, t.Suffix})
		case *security.StringMatch_Presence:
			out = append(out, strMatch{kind: presence})
		}
	}
	return out
}
