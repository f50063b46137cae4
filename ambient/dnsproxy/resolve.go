// Package dnsproxy is the node proxy's DNS server for enrolled pods (port
// 15053 inside each pod, as ztunnel's): names the mesh knows (services and
// ServiceEntries with VIPs, wildcard hosts, headless services and their pod
// hostnames) are answered from the control plane's state, everything else
// is forwarded to the node's upstream resolver.
//
// The decision — which mesh object a name stands for, from the querying
// pod's point of view — is Resolve, a pure function over the state; the
// server, the forwarder and its cache are the I/O around it.
package dnsproxy

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/miekg/dns"

	"kmesh.dev/kmesh/ambient/state"
)

// TTL of the records answered from the mesh's state (ztunnel's).
const TTL = 30

// View is the mesh state the resolver reads (*state.Store).
type View interface {
	ServicesByHostname(h string) []*state.Service
	Endpoints(key string) []state.Endpoint
}

// Client is the pod that asked.
type Client struct {
	Namespace string
	// Network is the client's network: only VIPs on it are answered.
	Network string
}

// Result is the resolver's answer for one question.
type Result struct {
	// Found: the mesh knows the name and the answer is authoritative
	// (possibly empty: the name exists without records of the type asked,
	// NOERROR and no data, never NXDOMAIN). Not found: forward upstream.
	Found   bool
	Answers []dns.RR
	// Service or Workload is what the name resolved to (for logs and tests).
	Service  *state.Service
	Workload *state.Workload
}

// alias is one name the requested name may stand for.
type alias struct {
	name     string // FQDN, lower case
	stripped string // non-empty: found by removing a search domain (CNAME to it)
	podHost  bool   // may be <pod>.<subdomain>.<ns>.svc.<domain>
}

// Resolve answers an A or AAAA question for name asked by client, from v,
// as ztunnel's DNS server does (src/dns/server.rs): the requested name, its
// Kubernetes expansions in the client's namespace (svc, svc.ns, svc.ns.svc,
// pod.subdomain[.ns[.svc]]) and the name with each of the client's search
// domains removed are tried in that order, each as written and then against
// wildcard hosts from the most specific; services in the client's namespace
// win over others with the same hostname. A name found by removing a
// search domain is answered with a CNAME to the shorter name. Other
// record types and unknown names are not found (forwarded). domain is the
// cluster's DNS domain ("cluster.local").
func Resolve(v View, domain string, c Client, name string, qtype uint16) Result {
	if qtype != dns.TypeA && qtype != dns.TypeAAAA {
		return Result{}
	}
	domain = strings.ToLower(dns.Fqdn(domain))
	requested := dns.Fqdn(name)
	svcDomain := "svc." + domain
	headlessSuffix := "." + strings.TrimSuffix(svcDomain, ".")
	for _, a := range aliases(strings.ToLower(requested), c.Namespace, domain) {
		for _, w := range wildcards(a.name) {
			host := strings.TrimSuffix(w, ".")
			svc := bestService(v.ServicesByHostname(host), c.Namespace, func(s *state.Service) bool {
				// Without a VIP only a Kubernetes headless service is
				// ours to answer; a DNS ServiceEntry is forwarded.
				return len(s.VIPs) > 0 || strings.HasSuffix(s.Hostname, headlessSuffix)
			})
			if svc != nil {
				r := Result{Found: true, Service: svc}
				r.Answers = records(requested, a, w, serviceAddrs(v, svc, c, qtype))
				return r
			}
		}
		if a.podHost {
			if wl := podHost(v, a.name, c.Namespace, headlessSuffix); wl != nil {
				r := Result{Found: true, Workload: wl}
				r.Answers = records(requested, a, a.name, family(wl.Addresses, qtype))
				return r
			}
		}
	}
	return Result{}
}

// records builds the answer: a CNAME from the requested name to the
// stripped one when a search domain was removed (and the match was not a
// wildcard), then the addresses under the name the client will use.
func records(requested string, a alias, matched string, addrs []netip.Addr) []dns.RR {
	var out []dns.RR
	owner := requested
	if a.stripped != "" && !strings.HasPrefix(matched, "*.") {
		out = append(out, &dns.CNAME{Hdr: dns.RR_Header{Name: requested, Rrtype: dns.TypeCNAME, Class: dns.ClassINET, Ttl: TTL}, Target: a.stripped})
		owner = a.stripped
	}
	for _, ip := range addrs {
		if ip.Is4() {
			out = append(out, &dns.A{Hdr: dns.RR_Header{Name: owner, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: TTL}, A: ip.AsSlice()})
		} else {
			out = append(out, &dns.AAAA{Hdr: dns.RR_Header{Name: owner, Rrtype: dns.TypeAAAA, Class: dns.ClassINET, Ttl: TTL}, AAAA: ip.AsSlice()})
		}
	}
	return out
}

// aliases lists the names requested may stand for, without duplicates.
func aliases(requested, ns, domain string) []alias {
	var out []alias
	seen := map[string]bool{}
	add := func(a alias) {
		if !seen[a.name] {
			seen[a.name] = true
			out = append(out, a)
		}
	}
	podHost := dns.CountLabel(requested) == 6
	add(alias{name: requested, podHost: podHost})
	nsDomain := ns + ".svc." + domain
	for _, k := range kubeFQDNs(requested, nsDomain, domain) {
		add(k)
	}
	for _, sd := range SearchDomains(ns, domain) {
		stripped, ok := trimDomain(requested, sd)
		if !ok {
			continue
		}
		add(alias{name: stripped, stripped: stripped, podHost: podHost})
		for _, k := range kubeFQDNs(stripped, nsDomain, domain) {
			k.stripped = stripped
			add(k)
		}
	}
	return out
}

// SearchDomains are the search domains of a pod in ns (Kubernetes'
// ClusterFirst resolv.conf): ztunnel assumes them rather than reading the
// pod's file.
func SearchDomains(ns, domain string) []string {
	domain = dns.Fqdn(domain)
	return []string{ns + ".svc." + domain, "svc." + domain, domain}
}

// kubeFQDNs expands name into the Kubernetes FQDNs it may abbreviate:
// <svc> → <svc>.<ns>.svc.<domain>; <svc>.<ns> → <svc>.<ns>.svc.<domain>;
// <pod>.<sub> → <pod>.<sub>.<ns>.svc.<domain>; <svc>.<ns>.svc →
// <svc>.<ns>.svc.<domain>; <pod>.<sub>.<ns>[.svc] → …svc.<domain>.
func kubeFQDNs(name, nsDomain, domain string) []alias {
	svcDomain := "svc." + domain
	switch dns.CountLabel(name) {
	case 1:
		return []alias{{name: name + nsDomain}}
	case 2:
		return []alias{{name: name + svcDomain}, {name: name + nsDomain, podHost: true}}
	case 3:
		var out []alias
		if dns.IsSubDomain("svc.", name) {
			out = append(out, alias{name: name + domain})
		}
		return append(out, alias{name: name + svcDomain, podHost: true})
	case 4:
		if dns.IsSubDomain("svc.", name) {
			return []alias{{name: name + domain, podHost: true}}
		}
	}
	return nil
}

// trimDomain removes suffix (a whole-label FQDN) from name; false when name
// does not end with it or is nothing more.
func trimDomain(name, suffix string) (string, bool) {
	if name == suffix || !dns.IsSubDomain(suffix, name) {
		return "", false
	}
	return name[:len(name)-len(suffix)], true
}

// wildcards returns name and the wildcards that match it, most specific
// first: a.b.c. → a.b.c., *.b.c., *.c.
func wildcards(name string) []string {
	out := []string{name}
	labels := dns.SplitDomainName(name)
	for i := 1; i < len(labels); i++ {
		out = append(out, "*."+strings.Join(labels[i:], ".")+".")
	}
	return out
}

// bestService is the service in the client's namespace among svcs (those
// ok accepts), else the first.
func bestService(svcs []*state.Service, ns string, ok func(*state.Service) bool) *state.Service {
	var first *state.Service
	for _, s := range svcs {
		if s == nil || !ok(s) {
			continue
		}
		if s.Namespace == ns {
			return s
		}
		if first == nil {
			first = s
		}
	}
	return first
}

// serviceAddrs are the addresses a service name resolves to for the
// client: its VIPs on the client's network, or for a headless service
// each endpoint's first address of the family.
func serviceAddrs(v View, s *state.Service, c Client, qtype uint16) []netip.Addr {
	if len(s.VIPs) > 0 {
		var out []netip.Addr
		for _, vip := range s.VIPs {
			if vip.Network == c.Network && isType(vip.Addr, qtype) {
				out = append(out, vip.Addr)
			}
		}
		return out
	}
	var out []netip.Addr
	for _, ep := range v.Endpoints(s.Key()) {
		if a := family(ep.Workload.Addresses, qtype); len(a) > 0 {
			out = append(out, a[0])
		}
	}
	return out
}

// podHost finds <pod>.<subdomain>.<ns>.svc.<domain>: a workload named (or
// with the hostname) <pod> among the endpoints of the headless service
// <subdomain>.<ns>.svc.<domain>, preferring the client's namespace.
func podHost(v View, name, ns, headlessSuffix string) *state.Workload {
	labels := dns.SplitDomainName(name)
	if len(labels) < 2 {
		return nil
	}
	pod, svcHost := labels[0], strings.Join(labels[1:], ".")
	if !strings.HasSuffix(svcHost, headlessSuffix) {
		return nil
	}
	var first *state.Workload
	for _, s := range v.ServicesByHostname(svcHost) {
		if s == nil || len(s.VIPs) > 0 {
			continue
		}
		for _, ep := range v.Endpoints(s.Key()) {
			w := ep.Workload
			host := w.Hostname
			if host == "" {
				host = w.Name
			}
			if !strings.EqualFold(host, pod) {
				continue
			}
			if w.Namespace() == ns {
				return w
			}
			if first == nil {
				first = w
			}
		}
	}
	return first
}

func isType(a netip.Addr, qtype uint16) bool {
	a = a.Unmap()
	return (qtype == dns.TypeA && a.Is4()) || (qtype == dns.TypeAAAA && a.Is6())
}

func family(addrs []netip.Addr, qtype uint16) []netip.Addr {
	return slices.DeleteFunc(slices.Clone(addrs), func(a netip.Addr) bool { return !isType(a, qtype) })
}
