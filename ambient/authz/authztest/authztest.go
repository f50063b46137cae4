// Package authztest generates random authorization policies for tests that
// compare two evaluations of them (the kernel's same-node verdicts against
// ambient/authz's).
package authztest

import (
	"fmt"
	"math/rand/v2"
	"net/netip"

	"google.golang.org/protobuf/types/known/emptypb"
	"istio.io/istio/pkg/workloadapi/security"

	"kmesh.dev/kmesh/ambient/state"
)

// RandPolicies returns up to three policies (ALLOW, DENY, now and then an
// action ztunnel refuses) with random groups, rules and matches over the
// given addresses (as prefixes of /24../32, /120../128), namespaces, service
// accounts (and the principals they make in trust domain cluster.local)
// and ports, with every not-variant.
func RandPolicies(r *rand.Rand, ips []netip.Addr, namespaces, sas []string, ports []uint32) []state.Policy {
	var out []state.Policy
	for i := range r.IntN(4) {
		a := &security.Authorization{Name: fmt.Sprintf("p%d", i), Namespace: "ns", Scope: security.Scope_WORKLOAD_SELECTOR}
		switch r.IntN(10) {
		case 0:
			a.Action = security.Action(7) // unknown: skipped, as ztunnel refuses it
		case 1, 2, 3, 4:
			a.Action = security.Action_DENY
		default:
			a.Action = security.Action_ALLOW
		}
		for range r.IntN(3) {
			g := &security.Group{}
			for range r.IntN(3) {
				rule := &security.Rules{}
				for range r.IntN(3) {
					rule.Matches = append(rule.Matches, randMatch(r, ips, namespaces, sas, ports))
				}
				g.Rules = append(g.Rules, rule)
			}
			a.Groups = append(a.Groups, g)
		}
		out = append(out, state.Policy{Authorization: a})
	}
	return out
}

func randMatch(r *rand.Rand, ips []netip.Addr, namespaces, sas []string, ports []uint32) *security.Match {
	m := &security.Match{}
	pick := func(l []string) string { return l[r.IntN(len(l))] }
	strm := func(l []string) *security.StringMatch {
		s := pick(l)
		switch r.IntN(4) {
		case 0:
			return &security.StringMatch{MatchType: &security.StringMatch_Exact{Exact: s}}
		case 1:
			return &security.StringMatch{MatchType: &security.StringMatch_Prefix{Prefix: s[:r.IntN(len(s)+1)]}}
		case 2:
			return &security.StringMatch{MatchType: &security.StringMatch_Suffix{Suffix: s[r.IntN(len(s)+1):]}}
		}
		return &security.StringMatch{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}
	}
	addr := func() *security.Address {
		a := ips[r.IntN(len(ips))]
		bits := a.BitLen() - r.IntN(9)
		return &security.Address{Address: a.AsSlice(), Length: uint32(bits)}
	}
	principals := make([]string, 0, len(namespaces)*len(sas))
	for _, ns := range namespaces {
		for _, sa := range sas {
			principals = append(principals, "cluster.local/ns/"+ns+"/sa/"+sa)
		}
	}
	for range 1 + r.IntN(3) {
		switch r.IntN(12) {
		case 0:
			m.DestinationPorts = append(m.DestinationPorts, ports[r.IntN(len(ports))])
		case 1:
			m.NotDestinationPorts = append(m.NotDestinationPorts, ports[r.IntN(len(ports))])
		case 2:
			m.SourceIps = append(m.SourceIps, addr())
		case 3:
			m.NotSourceIps = append(m.NotSourceIps, addr())
		case 4:
			m.DestinationIps = append(m.DestinationIps, addr())
		case 5:
			m.NotDestinationIps = append(m.NotDestinationIps, addr())
		case 6:
			m.Principals = append(m.Principals, strm(principals))
		case 7:
			m.NotPrincipals = append(m.NotPrincipals, strm(principals))
		case 8:
			m.Namespaces = append(m.Namespaces, strm(namespaces))
		case 9:
			m.NotNamespaces = append(m.NotNamespaces, strm(namespaces))
		case 10:
			m.ServiceAccounts = append(m.ServiceAccounts, &security.ServiceAccountMatch{Namespace: pick(namespaces), ServiceAccount: pick(sas)})
		case 11:
			m.NotServiceAccounts = append(m.NotServiceAccounts, &security.ServiceAccountMatch{Namespace: pick(namespaces), ServiceAccount: pick(sas)})
		}
	}
	return m
}
