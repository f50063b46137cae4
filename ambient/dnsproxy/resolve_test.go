package dnsproxy

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/miekg/dns"

	"kmesh.dev/kmesh/ambient/state"
)

// mesh builds a store like the one the simulator's tests resolve against.
func mesh(t testing.TB) *state.Store {
	t.Helper()
	s := state.NewStore()
	svc := func(ns, host string, vips ...string) *state.Service {
		out := &state.Service{Name: strings.Split(host, ".")[0], Namespace: ns, Hostname: host}
		for _, v := range vips {
			out.VIPs = append(out.VIPs, state.NetworkAddr{Addr: netip.MustParseAddr(v)})
		}
		return out
	}
	wl := func(ns, name string, svcs []string, addrs ...string) *state.Workload {
		w := &state.Workload{UID: "Kubernetes//Pod/" + ns + "/" + name, Name: name, HBONE: true, Healthy: true, Capacity: 1}
		w.SetMeta(state.WorkloadMeta{Namespace: ns})
		for _, a := range addrs {
			w.Addresses = append(w.Addresses, netip.MustParseAddr(a))
		}
		for _, sv := range svcs {
			w.Services = append(w.Services, state.ServicePorts{Service: sv, Ports: []state.Port{{ServicePort: 80, TargetPort: 8080}}})
		}
		return w
	}
	s.Apply(state.Update{
		Services: []*state.Service{
			svc("shop", "cart.shop.svc.cluster.local", "10.96.0.10", "fd00::10"),
			svc("web", "cart.web.svc.cluster.local", "10.96.0.20"),
			svc("shop", "db.shop.svc.cluster.local"), // headless
			// ServiceEntries: one in each of two namespaces with the same host.
			svc("shop", "api.example.com", "240.240.0.1"),
			svc("web", "api.example.com", "240.240.0.2"),
			svc("shop", "*.wild.example.com", "240.240.0.3"),
			svc("shop", "dnsonly.example.com"), // resolution DNS, no VIP: forwarded
			{Name: "remote", Namespace: "shop", Hostname: "remote.shop.svc.cluster.local",
				VIPs: []state.NetworkAddr{{Network: "other", Addr: netip.MustParseAddr("10.96.0.30")}}},
		},
		Workloads: []*state.Workload{
			wl("shop", "db-0", []string{"shop/db.shop.svc.cluster.local"}, "10.244.1.5", "fd00:10:244:1::5"),
			wl("shop", "db-1", []string{"shop/db.shop.svc.cluster.local"}, "10.244.1.6"),
		},
	})
	return s
}

func TestResolve(t *testing.T) {
	s := mesh(t)
	shop := Client{Namespace: "shop"}
	web := Client{Namespace: "web"}
	type rr struct{ name, kind, value string }
	a := func(n, v string) rr { return rr{n, "A", v} }
	aaaa := func(n, v string) rr { return rr{n, "AAAA", v} }
	cname := func(n, v string) rr { return rr{n, "CNAME", v} }
	for _, c := range []struct {
		name   string
		client Client
		q      string
		qtype  uint16
		found  bool
		want   []rr
	}{
		{"short name in own namespace", shop, "cart.", dns.TypeA, true, []rr{a("cart.", "10.96.0.10")}},
		{"short name, AAAA", shop, "cart", dns.TypeAAAA, true, []rr{aaaa("cart.", "fd00::10")}},
		{"name.namespace", web, "cart.shop.", dns.TypeA, true, []rr{a("cart.shop.", "10.96.0.10")}},
		{"name.namespace.svc", web, "cart.shop.svc.", dns.TypeA, true, []rr{a("cart.shop.svc.", "10.96.0.10")}},
		{"fqdn", web, "cart.shop.svc.cluster.local.", dns.TypeA, true, []rr{a("cart.shop.svc.cluster.local.", "10.96.0.10")}},
		{"fqdn, case folded", web, "Cart.Shop.svc.cluster.local.", dns.TypeA, true, []rr{a("Cart.Shop.svc.cluster.local.", "10.96.0.10")}},
		// What a client's resolver asks first for "cart.shop" (search
		// list, ndots 5): answered at once with a CNAME to the name the
		// client meant.
		{"search domain removed: CNAME", web, "cart.shop.web.svc.cluster.local.", dns.TypeA, true,
			[]rr{cname("cart.shop.web.svc.cluster.local.", "cart.shop."), a("cart.shop.", "10.96.0.10")}},
		{"search domain removed, own namespace", shop, "cart.shop.shop.svc.cluster.local.", dns.TypeA, true,
			[]rr{cname("cart.shop.shop.svc.cluster.local.", "cart.shop."), a("cart.shop.", "10.96.0.10")}},
		{"client's own namespace first", web, "cart.", dns.TypeA, true, []rr{a("cart.", "10.96.0.20")}},
		{"client's own namespace first (2)", shop, "cart.", dns.TypeA, true, []rr{a("cart.", "10.96.0.10")}},
		{"IPv4-only service, AAAA: found, no records", web, "cart.", dns.TypeAAAA, true, nil},
		{"ServiceEntry host prefers the client's namespace", web, "api.example.com.", dns.TypeA, true, []rr{a("api.example.com.", "240.240.0.2")}},
		{"ServiceEntry host prefers the client's namespace (2)", shop, "api.example.com.", dns.TypeA, true, []rr{a("api.example.com.", "240.240.0.1")}},
		{"ServiceEntry host from a third namespace: the first", Client{Namespace: "other"}, "api.example.com.", dns.TypeA, true, []rr{a("api.example.com.", "240.240.0.1")}},
		{"ServiceEntry via search domain: CNAME", web, "api.example.com.web.svc.cluster.local.", dns.TypeA, true,
			[]rr{cname("api.example.com.web.svc.cluster.local.", "api.example.com."), a("api.example.com.", "240.240.0.2")}},
		{"wildcard host", web, "x.wild.example.com.", dns.TypeA, true, []rr{a("x.wild.example.com.", "240.240.0.3")}},
		{"wildcard host, deeper", web, "a.b.wild.example.com.", dns.TypeA, true, []rr{a("a.b.wild.example.com.", "240.240.0.3")}},
		{"wildcard via search domain: no CNAME", web, "x.wild.example.com.web.svc.cluster.local.", dns.TypeA, true,
			[]rr{a("x.wild.example.com.web.svc.cluster.local.", "240.240.0.3")}},
		{"wildcard does not match its own base", web, "wild.example.com.", dns.TypeA, false, nil},
		{"headless service: endpoint addresses", shop, "db.", dns.TypeA, true, []rr{a("db.", "10.244.1.5"), a("db.", "10.244.1.6")}},
		{"headless service AAAA", web, "db.shop.svc.cluster.local.", dns.TypeAAAA, true, []rr{aaaa("db.shop.svc.cluster.local.", "fd00:10:244:1::5")}},
		{"pod hostname fqdn", web, "db-0.db.shop.svc.cluster.local.", dns.TypeA, true, []rr{a("db-0.db.shop.svc.cluster.local.", "10.244.1.5")}},
		{"pod hostname pod.subdomain", shop, "db-1.db.", dns.TypeA, true, []rr{a("db-1.db.", "10.244.1.6")}},
		{"pod hostname pod.subdomain.ns", web, "db-1.db.shop.", dns.TypeA, true, []rr{a("db-1.db.shop.", "10.244.1.6")}},
		{"pod hostname via search domain", shop, "db-0.db.shop.svc.cluster.local.", dns.TypeAAAA, true, []rr{aaaa("db-0.db.shop.svc.cluster.local.", "fd00:10:244:1::5")}},
		{"unknown pod of a headless service", shop, "db-9.db.shop.svc.cluster.local.", dns.TypeA, false, nil},
		{"VIP on another network: found, nothing answered", shop, "remote.", dns.TypeA, true, nil},
		{"ServiceEntry without VIP: forwarded", shop, "dnsonly.example.com.", dns.TypeA, false, nil},
		{"short name from another namespace: forwarded", Client{Namespace: "other"}, "db.", dns.TypeA, false, nil},
		{"unknown name: forwarded", shop, "www.example.org.", dns.TypeA, false, nil},
		{"other types: forwarded", shop, "cart.shop.svc.cluster.local.", dns.TypeMX, false, nil},
		{"TXT: forwarded", shop, "cart.", dns.TypeTXT, false, nil},
		{"root", shop, ".", dns.TypeA, false, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			res := Resolve(s, "cluster.local", c.client, c.q, c.qtype)
			if res.Found != c.found {
				t.Fatalf("found = %v, want %v", res.Found, c.found)
			}
			var got []rr
			for _, r := range res.Answers {
				switch r := r.(type) {
				case *dns.A:
					got = append(got, a(r.Hdr.Name, r.A.String()))
				case *dns.AAAA:
					got = append(got, aaaa(r.Hdr.Name, r.AAAA.String()))
				case *dns.CNAME:
					got = append(got, cname(r.Hdr.Name, r.Target))
				}
				if r.Header().Ttl != TTL {
					t.Errorf("TTL %d, want %d", r.Header().Ttl, TTL)
				}
			}
			if !slices.Equal(got, c.want) {
				t.Errorf("answers = %v, want %v", got, c.want)
			}
		})
	}
}

func TestAliases(t *testing.T) {
	for _, c := range []struct {
		host string
		want []string
	}{
		{"name.", []string{"name.", "name.ns1.svc.cluster.local."}},
		{"name.ns2.", []string{"name.ns2.", "name.ns2.svc.cluster.local.", "name.ns2.ns1.svc.cluster.local."}},
		{"name.ns2.svc.", []string{"name.ns2.svc.", "name.ns2.svc.cluster.local.", "name.ns2.svc.svc.cluster.local."}},
		{"pod.sub.ns.svc.", []string{"pod.sub.ns.svc.", "pod.sub.ns.svc.cluster.local."}},
		{"pod.sub.ns.not-svc.", []string{"pod.sub.ns.not-svc."}},
		// An FQDN: no expansion; the search domains removed give the
		// shorter forms (svc.cluster.local → name.ns2, cluster.local →
		// name.ns2.svc) and their expansions.
		{"name.ns2.svc.cluster.local.", []string{"name.ns2.svc.cluster.local.", "name.ns2.", "name.ns2.ns1.svc.cluster.local.", "name.ns2.svc.", "name.ns2.svc.svc.cluster.local."}},
	} {
		var got []string
		for _, a := range aliases(c.host, "ns1", "cluster.local.") {
			got = append(got, a.name)
		}
		// ztunnel's expansions come first in the same order; what the
		// search domains add follows.
		if !slices.Equal(got[:min(len(got), len(c.want))], c.want[:min(len(got), len(c.want))]) {
			t.Errorf("%s: aliases %v, want prefix %v", c.host, got, c.want)
		}
	}
	if got := wildcards("svc1.ns1.svc.cluster.local."); !slices.Equal(got, []string{"svc1.ns1.svc.cluster.local.", "*.ns1.svc.cluster.local.", "*.svc.cluster.local.", "*.cluster.local.", "*.local."}) {
		t.Errorf("wildcards: %v", got)
	}
}
