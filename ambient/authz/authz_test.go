package authz

import (
	"net/netip"
	"strings"
	"testing"

	"google.golang.org/protobuf/types/known/emptypb"
	"istio.io/istio/pkg/workloadapi/security"

	"kmesh.dev/kmesh/ambient/identity/spiffe"
	"kmesh.dev/kmesh/ambient/state"
)

// --- building policies the way istiod sends them ---

func mkPolicy(name string, action security.Action, groups ...*security.Group) state.Policy {
	return state.Policy{Authorization: &security.Authorization{
		Name: name, Namespace: "ns", Scope: security.Scope_NAMESPACE, Action: action, Groups: groups,
	}}
}

func allowP(name string, groups ...*security.Group) state.Policy {
	return mkPolicy(name, security.Action_ALLOW, groups...)
}

func denyP(name string, groups ...*security.Group) state.Policy {
	return mkPolicy(name, security.Action_DENY, groups...)
}

func dryRun(p state.Policy) state.Policy { p.DryRun = true; return p }

func grp(rules ...*security.Rules) *security.Group { return &security.Group{Rules: rules} }
func rules(ms ...*security.Match) *security.Rules  { return &security.Rules{Matches: ms} }
func one(m *security.Match) *security.Group        { return grp(rules(m)) }
func exactM(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Exact{Exact: s}}
}
func prefixM(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Prefix{Prefix: s}}
}
func suffixM(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Suffix{Suffix: s}}
}
func presenceM() *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}
}
func sa(ns, name string) *security.ServiceAccountMatch {
	return &security.ServiceAccountMatch{Namespace: ns, ServiceAccount: name}
}

// cidr is istiod's stringToIP: a bare address gets the full length.
func cidr(s string) *security.Address {
	if p, err := netip.ParsePrefix(s); err == nil {
		return &security.Address{Address: p.Addr().AsSlice(), Length: uint32(p.Bits())}
	}
	a := netip.MustParseAddr(s)
	return &security.Address{Address: a.AsSlice(), Length: uint32(a.BitLen())}
}

func sms(ms ...*security.StringMatch) []*security.StringMatch { return ms }
func addrs(as ...string) []*security.Address {
	var out []*security.Address
	for _, a := range as {
		out = append(out, cidr(a))
	}
	return out
}

// --- connections, as in ztunnel's rbac.rs tests ---

// peer is a verified peer identity.
func peer(td, ns, sa string) *spiffe.Identity {
	return &spiffe.Identity{TrustDomain: td, Namespace: ns, ServiceAccount: sa}
}

func conn(src, dst string, port uint16, id *spiffe.Identity) Conn {
	return Conn{SrcIP: netip.MustParseAddr(src), DstIP: netip.MustParseAddr(dst), DstPort: port, SrcIdentity: id}
}

var (
	plaintext = conn("127.0.0.1", "127.0.0.2", 8080, nil)
	tls       = conn("127.0.0.1", "127.0.0.2", 8080, peer("td", "namespace", "account"))
	tlsAlt    = conn("127.0.0.3", "127.0.0.4", 9090, peer("td-alt", "ns-alt", "sa-alt"))
	plain6    = conn("fd00::1", "fd00:1::2", 8080, nil)
	tls6      = conn("fd00::1", "fd00:1::2", 8080, peer("td", "namespace", "account"))
	mapped    = conn("::ffff:127.0.0.1", "::ffff:127.0.0.2", 8080, nil)
)

// matches reports whether one ALLOW policy made of m lets c through, which
// with no other policy is exactly whether m matches c.
func matches(t *testing.T, m *security.Match, c Conn) bool {
	t.Helper()
	return Evaluate([]state.Policy{allowP("p", one(m))}, c).Allow
}

// TestFields is ztunnel's rbac_test! table for every Match field, plus the
// IPv6 and mapped-address cases.
func TestFields(t *testing.T) {
	for _, tc := range []struct {
		name  string
		m     *security.Match
		conns []Conn
		want  []bool
	}{
		{"namespaces", &security.Match{Namespaces: sms(exactM("namespace"))},
			[]Conn{plaintext, tls, tlsAlt}, []bool{false, true, false}},
		{"not_namespaces", &security.Match{NotNamespaces: sms(exactM("namespace"))},
			[]Conn{plaintext, tls, tlsAlt}, []bool{true, false, true}},
		{"service_accounts", &security.Match{ServiceAccounts: []*security.ServiceAccountMatch{sa("namespace", "account")}},
			[]Conn{plaintext, tls, tlsAlt}, []bool{false, true, false}},
		{"not_service_accounts", &security.Match{NotServiceAccounts: []*security.ServiceAccountMatch{sa("namespace", "account")}},
			[]Conn{plaintext, tls, tlsAlt}, []bool{true, false, true}},
		{"service account ignores trust domain",
			&security.Match{ServiceAccounts: []*security.ServiceAccountMatch{sa("ns-alt", "sa-alt")}},
			[]Conn{conn("127.0.0.1", "127.0.0.2", 80, peer("other-td", "ns-alt", "sa-alt"))}, []bool{true}},
		{"service account needs both parts",
			&security.Match{ServiceAccounts: []*security.ServiceAccountMatch{sa("namespace", "sa-alt")}},
			[]Conn{tls, tlsAlt}, []bool{false, false}},
		{"principals", &security.Match{Principals: sms(exactM("td/ns/namespace/sa/account"))},
			[]Conn{plaintext, tls, tlsAlt}, []bool{false, true, false}},
		{"principals are written without spiffe://", &security.Match{Principals: sms(exactM("spiffe://td/ns/namespace/sa/account"))},
			[]Conn{tls}, []bool{false}},
		{"not_principals", &security.Match{NotPrincipals: sms(exactM("td/ns/namespace/sa/account"))},
			[]Conn{plaintext, tls, tlsAlt}, []bool{true, false, true}},
		{"source_ips", &security.Match{SourceIps: addrs("127.0.0.1")},
			[]Conn{plaintext, tls, tlsAlt}, []bool{true, true, false}},
		{"not_source_ips", &security.Match{NotSourceIps: addrs("127.0.0.1")},
			[]Conn{plaintext, tls, tlsAlt}, []bool{false, false, true}},
		{"destination_ips", &security.Match{DestinationIps: addrs("127.0.0.2")},
			[]Conn{plaintext, tls, tlsAlt}, []bool{true, true, false}},
		{"not_destination_ips", &security.Match{NotDestinationIps: addrs("127.0.0.2")},
			[]Conn{plaintext, tls, tlsAlt}, []bool{false, false, true}},
		{"cidr range, host bits ignored", &security.Match{DestinationIps: []*security.Address{
			{Address: netip.MustParseAddr("127.0.0.1").AsSlice(), Length: 24}}},
			[]Conn{plaintext, tls, tlsAlt, conn("127.0.0.1", "127.0.1.2", 8080, nil)}, []bool{true, true, true, false}},
		{"destination_ports", &security.Match{DestinationPorts: []uint32{8080}},
			[]Conn{plaintext, tls, tlsAlt}, []bool{true, true, false}},
		{"not_destination_ports", &security.Match{NotDestinationPorts: []uint32{8080}},
			[]Conn{plaintext, tls, tlsAlt}, []bool{false, false, true}},
		{"port above 65535 matches nothing", &security.Match{DestinationPorts: []uint32{8080 + 65536}},
			[]Conn{plaintext}, []bool{false}},
		{"IPv6 source prefix", &security.Match{SourceIps: addrs("fd00::/64")},
			[]Conn{plain6, tls6, plaintext, conn("fd00:0:0:1::1", "fd00:1::2", 8080, nil)}, []bool{true, true, false, false}},
		{"IPv6 destination address", &security.Match{DestinationIps: addrs("fd00:1::2")},
			[]Conn{plain6, conn("fd00::1", "fd00:1::3", 8080, nil)}, []bool{true, false}},
		{"IPv6 not_source_ips", &security.Match{NotSourceIps: addrs("fd00::/16")},
			[]Conn{plain6, plaintext}, []bool{false, true}},
		{"IPv4 prefix never holds an IPv6 address", &security.Match{SourceIps: addrs("0.0.0.0/0")},
			[]Conn{plain6, plaintext}, []bool{false, true}},
		{"IPv4-mapped connection compared as IPv4", &security.Match{SourceIps: addrs("127.0.0.0/8"), DestinationIps: addrs("127.0.0.2")},
			[]Conn{mapped}, []bool{true}},
		{"IPv4-mapped policy address compared as IPv4", &security.Match{SourceIps: addrs("::ffff:127.0.0.0/104")},
			[]Conn{plaintext, mapped, plain6}, []bool{true, true, false}},
		{"zoned address", &security.Match{SourceIps: addrs("fe80::/10")},
			[]Conn{conn("fe80::1%eth0", "fd00::2", 8080, nil)}, []bool{true}},
		{"OR within a field", &security.Match{DestinationPorts: []uint32{80, 8080}, Namespaces: sms(exactM("x"), exactM("namespace"))},
			[]Conn{tls, tlsAlt}, []bool{true, false}},
		{"AND between fields", &security.Match{Namespaces: sms(exactM("namespace")), DestinationPorts: []uint32{9090}},
			[]Conn{tls, tlsAlt}, []bool{false, false}},
		{"field and its not_ together", &security.Match{Namespaces: sms(prefixM("ns-")), NotNamespaces: sms(exactM("ns-alt"))},
			[]Conn{tlsAlt, conn("127.0.0.1", "127.0.0.2", 1, peer("td", "ns-b", "sa"))}, []bool{false, true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for i, c := range tc.conns {
				if got := matches(t, tc.m, c); got != tc.want[i] {
					t.Errorf("conn %d (%v→%v:%d id=%v): matched=%v, want %v", i, c.SrcIP, c.DstIP, c.DstPort, c.SrcIdentity, got, tc.want[i])
				}
			}
		})
	}
}

// TestStringMatch covers every StringMatch kind on namespaces (plain
// strings) and principals (matched in pieces), including what plaintext
// looks like to each.
func TestStringMatch(t *testing.T) {
	id := peer("cluster.local", "default", "sleep")
	for _, tc := range []struct {
		name      string
		m         *security.StringMatch
		ns        bool // namespace "default" matches
		principal bool // principal "cluster.local/ns/default/sa/sleep" matches
		plainNS   bool // plaintext's namespace "" matches (ztunnel: unwrap_or_default)
	}{
		{"exact", exactM("default"), true, false, false},
		{"exact principal", exactM("cluster.local/ns/default/sa/sleep"), false, true, false},
		{"exact mismatch", exactM("defaul"), false, false, false},
		{"exact empty", exactM(""), false, false, true},
		{"prefix", prefixM("def"), true, false, false},
		{"prefix principal", prefixM("cluster.local/ns/default/"), false, true, false},
		{"prefix across pieces", prefixM("cluster.local/ns/def"), false, true, false},
		{"prefix mismatch", prefixM("fault"), false, false, false},
		{"prefix longer than value", prefixM("cluster.local/ns/default/sa/sleepy"), false, false, false},
		{"empty prefix", prefixM(""), true, true, true},
		{"suffix", suffixM("ault"), true, false, false},
		{"suffix principal", suffixM("/sa/sleep"), false, true, false},
		{"suffix across pieces", suffixM("default/sa/sleep"), false, true, false},
		{"suffix mismatch", suffixM("defaul"), false, false, false},
		{"suffix longer than value", suffixM("xcluster.local/ns/default/sa/sleep"), false, false, false},
		{"presence", presenceM(), true, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := conn("10.0.0.1", "10.0.0.2", 80, id)
			if got := matches(t, &security.Match{Namespaces: sms(tc.m)}, c); got != tc.ns {
				t.Errorf("namespace: %v, want %v", got, tc.ns)
			}
			if got := matches(t, &security.Match{Principals: sms(tc.m)}, c); got != tc.principal {
				t.Errorf("principal: %v, want %v", got, tc.principal)
			}
			c.SrcIdentity = nil
			if got := matches(t, &security.Match{Namespaces: sms(tc.m)}, c); got != tc.plainNS {
				t.Errorf("plaintext namespace: %v, want %v", got, tc.plainNS)
			}
			if matches(t, &security.Match{Principals: sms(tc.m)}, c) {
				t.Error("plaintext matched a principal")
			}
			if !matches(t, &security.Match{NotPrincipals: sms(tc.m)}, c) {
				t.Error("plaintext failed not_principals")
			}
		})
	}
}

// TestPrincipalPieces checks the allocation-free principal matching against
// the plain string functions for every prefix and suffix of the principal.
func TestPrincipalPieces(t *testing.T) {
	for _, id := range []*spiffe.Identity{peer("cluster.local", "default", "sleep"), peer("", "", ""), peer("a", "b", "c")} {
		p := principal{id.TrustDomain, "/ns/", id.Namespace, "/sa/", id.ServiceAccount}
		full := id.Principal()
		if p.len() != len(full) {
			t.Fatalf("%q: len %d", full, p.len())
		}
		cands := []string{"", "x", full + "x", "x" + full, strings.ToUpper(full)}
		for i := 0; i <= len(full); i++ {
			cands = append(cands, full[:i], full[i:], full[:i]+"?"+full[min(i+1, len(full)):])
		}
		for _, s := range cands {
			if got, want := p.hasPrefix(s), strings.HasPrefix(full, s); got != want {
				t.Errorf("%q hasPrefix(%q) = %v", full, s, got)
			}
			if got, want := p.hasSuffix(s), strings.HasSuffix(full, s); got != want {
				t.Errorf("%q hasSuffix(%q) = %v", full, s, got)
			}
			if got, want := (strMatch{exact, s}).matchesPrincipal(&p), s == full; got != want {
				t.Errorf("%q exact(%q) = %v", full, s, got)
			}
		}
	}
}

// TestStructure is ztunnel's rbac_empty_policy, rbac_nesting and
// rbac_multi_rule: how groups, rules and matches combine, and what empty
// ones mean.
func TestStructure(t *testing.T) {
	nsA := &security.Match{Namespaces: sms(exactM("a"))}
	nsB := &security.Match{Namespaces: sms(exactM("b"))}
	port80 := &security.Match{DestinationPorts: []uint32{80}}
	from := func(ns string, port uint16) Conn {
		return conn("10.0.0.1", "10.0.0.2", port, peer("td", ns, "account"))
	}
	for _, tc := range []struct {
		name   string
		groups []*security.Group
		conns  []Conn
		want   []bool
	}{
		{"no groups matches nothing (allow-nothing policy)", nil, []Conn{plaintext, tls}, []bool{false, false}},
		{"group without rules matches everything (rules: [{}])", []*security.Group{grp()},
			[]Conn{plaintext, tls}, []bool{true, true}},
		{"rule without matches is satisfied", []*security.Group{grp(rules())},
			[]Conn{plaintext, tls}, []bool{true, true}},
		{"match without conditions never matches", []*security.Group{one(&security.Match{})},
			[]Conn{plaintext, tls}, []bool{false, false}},
		{"nil match never matches", []*security.Group{grp(rules(nil))}, []Conn{plaintext}, []bool{false}},
		{"an empty match beside a real one is ignored", []*security.Group{grp(rules(&security.Match{}, nsA))},
			[]Conn{from("a", 1), from("b", 1)}, []bool{true, false}},
		{"matches in a rule are ORed, rules in a group ANDed",
			[]*security.Group{grp(rules(nsA, nsB), rules(port80))},
			[]Conn{from("a", 80), from("b", 80), from("bad", 80), from("b", 12345)}, []bool{true, true, false, false}},
		{"groups are ORed", []*security.Group{one(nsA), one(nsB)},
			[]Conn{from("a", 1), from("b", 1), from("bad", 1)}, []bool{true, true, false}},
		{"an empty group among others matches everything", []*security.Group{one(nsA), grp()},
			[]Conn{from("bad", 1)}, []bool{true}},
		{"a rule with only an empty match fails its group", []*security.Group{grp(rules(port80), rules(&security.Match{}))},
			[]Conn{from("a", 80)}, []bool{false}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			set := Compile([]state.Policy{allowP("p", tc.groups...)})
			for i, c := range tc.conns {
				if got := set.Evaluate(c).Allow; got != tc.want[i] {
					t.Errorf("conn %d: matched=%v, want %v", i, got, tc.want[i])
				}
			}
		})
	}
}

// TestDecision is assert_rbac: DENY first, then no-ALLOW-means-allow, then
// any ALLOW match.
func TestDecision(t *testing.T) {
	fromNS := func(ns string) *security.Group { return one(&security.Match{Namespaces: sms(exactM(ns))}) }
	denyAlt := denyP("deny-alt", fromNS("ns-alt"))
	denyNone := denyP("deny-none", fromNS("nobody"))
	allowNS := allowP("allow-ns", fromNS("namespace"))
	allowAll := allowP("allow-all", grp())
	allowNothing := allowP("allow-nothing")
	for _, tc := range []struct {
		name     string
		policies []state.Policy
		c        Conn
		want     Decision
	}{
		{"no policies", nil, plaintext, Decision{Allow: true, Reason: NoAllowPolicies}},
		{"deny policy not matching, no allow policies", []state.Policy{denyNone}, tlsAlt,
			Decision{Allow: true, Reason: NoAllowPolicies}},
		{"deny policy matching", []state.Policy{denyNone, denyAlt}, tlsAlt,
			Decision{Allow: false, Reason: DenyMatched, Policy: "ns/deny-alt"}},
		{"deny overrides allow", []state.Policy{allowAll, denyAlt}, tlsAlt,
			Decision{Allow: false, Reason: DenyMatched, Policy: "ns/deny-alt"}},
		{"allow matching", []state.Policy{allowNothing, allowNS, denyAlt}, tls,
			Decision{Allow: true, Reason: AllowMatched, Policy: "ns/allow-ns"}},
		{"allow policies, none matching", []state.Policy{allowNS, denyNone}, tlsAlt,
			Decision{Allow: false, Reason: NoAllowMatched}},
		{"allow-nothing denies everything", []state.Policy{allowNothing}, tls,
			Decision{Allow: false, Reason: NoAllowMatched}},
		{"first matching deny in order is reported", []state.Policy{denyP("a", grp()), denyP("b", grp())}, tls,
			Decision{Allow: false, Reason: DenyMatched, Policy: "ns/a"}},
		{"policy with an unknown action is skipped", []state.Policy{mkPolicy("future", security.Action(7), grp())}, tls,
			Decision{Allow: true, Reason: NoAllowPolicies}},
		{"nil authorization skipped", []state.Policy{{}}, tls, Decision{Allow: true, Reason: NoAllowPolicies}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Evaluate(tc.policies, tc.c); got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// TestPeerAuthentication evaluates the DENY policies istiod derives from
// PeerAuthentication (convertPeerAuthentication): STRICT is "deny when there
// is no principal", a PERMISSIVE port exempts that port.
func TestPeerAuthentication(t *testing.T) {
	noPrincipal := &security.Match{NotPrincipals: sms(presenceM())}
	strict := denyP("istio_converted_static_strict", one(noPrincipal))
	strictButPort8080 := denyP("pa", grp(rules(noPrincipal), rules(&security.Match{NotDestinationPorts: []uint32{8080}})))
	for _, tc := range []struct {
		name string
		p    state.Policy
		c    Conn
		want bool
	}{
		{"strict refuses plaintext", strict, plaintext, false},
		{"strict accepts mTLS", strict, tls, true},
		{"permissive port accepts plaintext", strictButPort8080, plaintext, true},
		{"other port refuses plaintext", strictButPort8080, conn("127.0.0.1", "127.0.0.2", 9090, nil), false},
		{"other port accepts mTLS", strictButPort8080, tlsAlt, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Evaluate([]state.Policy{tc.p}, tc.c).Allow; got != tc.want {
				t.Errorf("allow=%v, want %v", got, tc.want)
			}
		})
	}
}

// TestDryRun: dry-run policies (ztunnel #1659, #1745) are reported, never
// enforced, and a dry-run ALLOW does not make "an ALLOW policy applies".
func TestDryRun(t *testing.T) {
	fromNS := func(ns string) *security.Group { return one(&security.Match{Namespaces: sms(exactM(ns))}) }
	for _, tc := range []struct {
		name     string
		policies []state.Policy
		c        Conn
		want     Decision
	}{
		{"dry-run deny matching does not deny",
			[]state.Policy{dryRun(denyP("dd", grp()))}, tls,
			Decision{Allow: true, Reason: NoAllowPolicies, DryRun: DryRun{Applies: true, Deny: "ns/dd"}}},
		{"dry-run deny reported beside an enforced deny",
			[]state.Policy{dryRun(denyP("dd", grp())), denyP("d", grp()), dryRun(allowP("da", grp()))}, tls,
			Decision{Allow: false, Reason: DenyMatched, Policy: "ns/d", DryRun: DryRun{Applies: true, Deny: "ns/dd"}}},
		{"dry-run allow-nothing: allowed now, would deny",
			[]state.Policy{dryRun(allowP("nothing"))}, tls,
			Decision{Allow: true, Reason: NoAllowPolicies, DryRun: DryRun{Applies: true}}},
		{"dry-run allow matching, no enforced allow",
			[]state.Policy{dryRun(allowP("da", fromNS("namespace")))}, tls,
			Decision{Allow: true, Reason: NoAllowPolicies, DryRun: DryRun{Applies: true, Allow: "ns/da", WouldAllow: true}}},
		{"dry-run allow matching where enforced allows do not: denied now, would allow",
			[]state.Policy{allowP("a", fromNS("other")), dryRun(allowP("da", fromNS("namespace")))}, tls,
			Decision{Allow: false, Reason: NoAllowMatched, DryRun: DryRun{Applies: true, Allow: "ns/da", WouldAllow: true}}},
		{"enforced allow matches, dry-run allow does not",
			[]state.Policy{allowP("a", fromNS("namespace")), dryRun(allowP("da", fromNS("other")))}, tls,
			Decision{Allow: true, Reason: AllowMatched, Policy: "ns/a", DryRun: DryRun{Applies: true, WouldAllow: true}}},
		{"dry-run deny and dry-run allow both matching: deny would win",
			[]state.Policy{dryRun(denyP("dd", grp())), dryRun(allowP("da", grp()))}, tls,
			Decision{Allow: true, Reason: NoAllowPolicies, DryRun: DryRun{Applies: true, Deny: "ns/dd", Allow: "ns/da"}}},
		{"dry-run deny not matching",
			[]state.Policy{dryRun(denyP("dd", fromNS("other")))}, tls,
			Decision{Allow: true, Reason: NoAllowPolicies, DryRun: DryRun{Applies: true, WouldAllow: true}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Evaluate(tc.policies, tc.c); got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// TestDroppedValues: what state.ConvertPolicy lets through but cannot be
// matched is dropped as ztunnel's conversion drops it (filter_map), so a
// condition left without values is absent.
func TestDroppedValues(t *testing.T) {
	unset := &security.StringMatch{}
	bad := &security.Address{Address: []byte{1, 2, 3}, Length: 8}
	tooLong := &security.Address{Address: []byte{10, 0, 0, 0}, Length: 33}
	for _, tc := range []struct {
		name string
		m    *security.Match
		c    Conn
		want bool
	}{
		{"unset string match beside a real one", &security.Match{Namespaces: sms(unset, exactM("namespace"))}, tls, true},
		{"only unset string matches: match is empty, never matches", &security.Match{NotNamespaces: sms(unset)}, tls, false},
		{"only unset string matches beside a port: port alone decides", &security.Match{Principals: sms(unset), DestinationPorts: []uint32{8080}}, plaintext, true},
		{"bad address dropped", &security.Match{SourceIps: []*security.Address{bad, cidr("127.0.0.1")}}, plaintext, true},
		{"prefix longer than the address dropped", &security.Match{SourceIps: []*security.Address{tooLong}, DestinationPorts: []uint32{8080}}, plaintext, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := matches(t, tc.m, tc.c); got != tc.want {
				t.Errorf("matched=%v, want %v", got, tc.want)
			}
		})
	}
}

func TestNilSetAllows(t *testing.T) {
	var s *Set
	if d := s.Evaluate(plaintext); !d.Allow || d.Reason != NoAllowPolicies {
		t.Errorf("got %+v", d)
	}
}

func TestDecisionString(t *testing.T) {
	for d, want := range map[Decision]string{
		{Reason: DenyMatched, Policy: "ns/p"}:               "explicitly denied by: ns/p",
		{Reason: NoAllowMatched}:                            "allow policies exist, but none allowed",
		{Allow: true, Reason: AllowMatched, Policy: "ns/p"}: "allowed by: ns/p",
		{Allow: true, Reason: NoAllowPolicies}:              "no allow policies",
	} {
		if got := d.String(); got != want {
			t.Errorf("%+v: %q, want %q", d, got, want)
		}
	}
}

// TestEvaluateDoesNotAllocate holds the per-connection path to zero
// allocations, identity and all.
func TestEvaluateDoesNotAllocate(t *testing.T) {
	set := Compile(benchPolicies())
	c := benchConn()
	if n := testing.AllocsPerRun(1000, func() { _ = set.Evaluate(c) }); n != 0 {
		t.Errorf("%v allocations per Evaluate", n)
	}
}

// Policies a namespace might realistically carry: PeerAuthentication
// STRICT, a DENY for a blocked namespace, and three ALLOWs of which the last
// one matches.
func benchPolicies() []state.Policy {
	return []state.Policy{
		denyP("istio_converted_static_strict", one(&security.Match{NotPrincipals: sms(presenceM())})),
		denyP("deny-blocked", one(&security.Match{Namespaces: sms(exactM("blocked"), prefixM("quarantine-"))})),
		allowP("allow-monitoring", grp(
			rules(&security.Match{DestinationPorts: []uint32{9090, 15020}}),
			rules(&security.Match{Namespaces: sms(exactM("monitoring"))}))),
		allowP("allow-cidr", one(&security.Match{SourceIps: addrs("192.168.0.0/16", "fd00:aa::/48")})),
		allowP("allow-frontend", grp(
			rules(&security.Match{DestinationPorts: []uint32{8080, 8443}}),
			rules(&security.Match{Principals: sms(exactM("cluster.local/ns/web/sa/frontend"), suffixM("/sa/gateway"))},
				&security.Match{ServiceAccounts: []*security.ServiceAccountMatch{sa("web", "frontend")}}))),
	}
}

func benchConn() Conn {
	return conn("10.1.2.3", "10.4.5.6", 8080, peer("cluster.local", "web", "frontend"))
}

func BenchmarkEvaluate(b *testing.B) {
	set := Compile(benchPolicies())
	c := benchConn()
	if d := set.Evaluate(c); d.Policy != "ns/allow-frontend" {
		b.Fatalf("%+v", d)
	}
	b.ReportAllocs()
	for b.Loop() {
		_ = set.Evaluate(c)
	}
}

func BenchmarkEvaluateDenied(b *testing.B) {
	set := Compile(benchPolicies())
	c := benchConn()
	c.SrcIdentity = peer("cluster.local", "quarantine-7", "x")
	if d := set.Evaluate(c); d.Policy != "ns/deny-blocked" {
		b.Fatalf("%+v", d)
	}
	b.ReportAllocs()
	for b.Loop() {
		_ = set.Evaluate(c)
	}
}

func BenchmarkEvaluateNoPolicies(b *testing.B) {
	set := Compile(nil)
	c := benchConn()
	b.ReportAllocs()
	for b.Loop() {
		_ = set.Evaluate(c)
	}
}

// BenchmarkCompileAndEvaluate is the cost of not caching the Set.
func BenchmarkCompileAndEvaluate(b *testing.B) {
	ps := benchPolicies()
	c := benchConn()
	b.ReportAllocs()
	for b.Loop() {
		_ = Evaluate(ps, c)
	}
}
