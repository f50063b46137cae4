package sim_test

import (
	"flag"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/integration/sim"
)

func init() {
	podnet.RegisterHelper("dnslookup", dnsLookupHelper)
	podnet.RegisterHelper("dnsloop", dnsLoopHelper)
}

// lookupResult is what a stub resolver in a pod got for one name.
type lookupResult struct {
	Asked  []string // the names asked, in order (search list)
	Rcode  string
	CNAME  []string // "owner target"
	A      []string // "owner address"
	Server string   // the answer's source as the application saw it
	Err    string
}

// dnsLookupHelper resolves a name as glibc's stub resolver does with a
// Kubernetes pod's resolv.conf (search <ns>.svc.cluster.local
// svc.cluster.local cluster.local, ndots 5): each search domain in turn,
// then the name as written, the first answer with records (or the last
// answer) wins. Over unconnected UDP to -server, like musl, so the
// reply's source address is checked as resolvers check it.
func dnsLookupHelper(args []string) (any, error) {
	fs := flag.NewFlagSet("dnslookup", flag.ContinueOnError)
	server := fs.String("server", "", "nameserver ip:port")
	ns := fs.String("ns", "", "the pod's namespace")
	name := fs.String("name", "", "name")
	proto := fs.String("proto", "udp", "udp or tcp")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	var candidates []string
	if strings.HasSuffix(*name, ".") {
		candidates = []string{*name}
	} else {
		if strings.Count(*name, ".") < 5 {
			for _, sd := range []string{*ns + ".svc.cluster.local.", "svc.cluster.local.", "cluster.local."} {
				candidates = append(candidates, *name+"."+sd)
			}
		}
		candidates = append(candidates, *name+".")
	}
	var res lookupResult
	for _, cand := range candidates {
		res = lookupResult{Asked: append(res.Asked, cand)}
		q := new(dns.Msg)
		q.SetQuestion(cand, dns.TypeA)
		var r *dns.Msg
		if *proto == "tcp" {
			c := &dns.Client{Net: "tcp", Timeout: 3 * time.Second}
			var err error
			if r, _, err = c.Exchange(q, *server); err != nil {
				res.Err = err.Error()
				return res, nil
			}
			res.Server = *server
		} else {
			pc, err := net.ListenUDP("udp", nil)
			if err != nil {
				return nil, err
			}
			out, _ := q.Pack()
			dst, _ := net.ResolveUDPAddr("udp", *server)
			if _, err := pc.WriteToUDP(out, dst); err != nil {
				pc.Close()
				res.Err = err.Error()
				return res, nil
			}
			pc.SetReadDeadline(time.Now().Add(3 * time.Second))
			buf := make([]byte, 4096)
			n, from, err := pc.ReadFromUDP(buf)
			pc.Close()
			if err != nil {
				res.Err = err.Error()
				return res, nil
			}
			res.Server = from.String()
			r = new(dns.Msg)
			if err := r.Unpack(buf[:n]); err != nil {
				return nil, err
			}
		}
		res.Rcode = dns.RcodeToString[r.Rcode]
		for _, rr := range r.Answer {
			switch rr := rr.(type) {
			case *dns.CNAME:
				res.CNAME = append(res.CNAME, rr.Hdr.Name+" "+rr.Target)
			case *dns.A:
				res.A = append(res.A, rr.Hdr.Name+" "+rr.A.String())
			}
		}
		if r.Rcode == dns.RcodeSuccess && len(r.Answer) > 0 {
			break
		}
	}
	return res, nil
}

// loopResult counts a dnsloop's questions.
type loopResult struct {
	Asked, Answered int
	Errors          []string
}

// dnsLoopHelper asks one question every -every for -for over UDP, each with
// a fresh socket, -timeout per question and no retry, and counts answers
// with the expected address.
func dnsLoopHelper(args []string) (any, error) {
	fs := flag.NewFlagSet("dnsloop", flag.ContinueOnError)
	server := fs.String("server", "", "nameserver")
	name := fs.String("name", "", "name")
	want := fs.String("want", "", "address expected")
	every := fs.Duration("every", 20*time.Millisecond, "pause")
	dur := fs.Duration("for", 10*time.Second, "duration")
	timeout := fs.Duration("timeout", time.Second, "per question")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	var res loopResult
	end := time.Now().Add(*dur)
	for time.Now().Before(end) {
		res.Asked++
		c := &dns.Client{Net: "udp", Timeout: *timeout}
		q := new(dns.Msg)
		q.SetQuestion(*name, dns.TypeA)
		r, _, err := c.Exchange(q, *server)
		switch {
		case err != nil:
			res.Errors = append(res.Errors, time.Now().Format("15:04:05.000")+" "+err.Error())
		case len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != *want:
			res.Errors = append(res.Errors, time.Now().Format("15:04:05.000")+" answer "+fmt.Sprint(r.Answer))
		default:
			res.Answered++
		}
		time.Sleep(*every)
	}
	return res, nil
}

const dnsObjects = `
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: web, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Namespace
metadata: {name: infra}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  clusterIP: 10.96.1.10
  selector: {app: cart}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: web}
spec:
  clusterIP: 10.96.1.20
  selector: {app: cart}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: tcp, port: 5432, targetPort: 5432, protocol: TCP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [240.240.0.10]
  ports: [{number: 80, name: http, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.80}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: shop}
spec:
  hosts: ["*.wild.example.com"]
  addresses: [240.240.0.11]
  ports: [{number: 80, name: http, protocol: TCP}]
  resolution: NONE
`

// resolverHost is the host number of the cluster resolver pod in the first
// node's prefix (the daemons' resolv.conf names it).
const resolverHost = 250

// TestPrivilegedSimDNS: pods resolve through the DNS proxy on 15053, their
// queries to the cluster resolver captured by the kernel: short names, the
// namespace-qualified and full forms (a CNAME where the search list was
// removed), the client's namespace first, a ServiceEntry host, a wildcard
// host, a headless service and a pod hostname; external names are
// forwarded to the cluster's resolver (a pod of the simulator); a pod not
// in the mesh is left alone; the DNS metrics move; and a rolling upgrade of
// the daemon loses no query.
func TestPrivilegedSimDNS(t *testing.T) {
	c := startClusterWith(t, sim.Options{Nodes: 1, Objects: dnsObjects, DNSUpstreamHost: resolverHost})
	resolverIP := c.DNSUpstream()
	node := c.Nodes[0].Name
	resolver := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "coredns", Namespace: "infra"},
		Spec:   corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "dns", Command: []string{"dnsresolver"}}}},
		Status: corev1.PodStatus{PodIPs: []corev1.PodIP{{IP: resolverIP.String()}}}}
	db0 := clientPod("shop", "db-0", node)
	db0.Labels = map[string]string{"app": "db"}
	create(t, c, resolver, clientPod("shop", "client", node), clientPod("web", "client", node), clientPod("legacy", "outsider", node), db0)
	rp, _ := c.Pod("infra", "coredns")
	if got := rp.IPs()[0]; got != resolverIP {
		t.Fatalf("resolver pod at %s, want %s", got, resolverIP)
	}
	shopClient, _ := c.Pod("shop", "client")
	webClient, _ := c.Pod("web", "client")
	outsider, _ := c.Pod("legacy", "outsider")
	dbPod, _ := c.Pod("shop", "db-0")
	eventually(t, "clients enrolled", func() (bool, string) {
		return enrolled(c.Nodes[0], shopClient.UID) && enrolled(c.Nodes[0], webClient.UID), fmt.Sprint(c.Nodes[0].ZDS.Enrolled())
	})
	server := resolverIP.String() + ":53"
	lookup := func(t *testing.T, p *sim.Pod, name, proto string) lookupResult {
		t.Helper()
		var r lookupResult
		if err := p.Helper(&r, "dnslookup", "-server", server, "-ns", p.Namespace, "-name", name, "-proto", proto); err != nil {
			t.Fatal(err)
		}
		if r.Err != "" {
			t.Fatalf("%s from %s: %s (asked %v)", name, p.Key(), r.Err, r.Asked)
		}
		if r.Server != server {
			t.Fatalf("%s from %s: the answer came from %s, not the resolver asked (%s)", name, p.Key(), r.Server, server)
		}
		return r
	}
	db0IP := dbPod.IPs()[0].String()
	for _, proto := range []string{"udp", "tcp"} {
		for _, tc := range []struct {
			what  string
			pod   *sim.Pod
			name  string
			cname []string
			a     []string
		}{
			{"short name", shopClient, "cart", nil, []string{"cart.shop.svc.cluster.local. 10.96.1.10"}},
			{"short name: the client's own namespace first", webClient, "cart", nil, []string{"cart.web.svc.cluster.local. 10.96.1.20"}},
			{"name.namespace: CNAME from the search-list form", webClient, "cart.shop",
				[]string{"cart.shop.web.svc.cluster.local. cart.shop."}, []string{"cart.shop. 10.96.1.10"}},
			{"full name", webClient, "cart.shop.svc.cluster.local.", nil, []string{"cart.shop.svc.cluster.local. 10.96.1.10"}},
			{"ServiceEntry host", webClient, "api.example.com",
				[]string{"api.example.com.web.svc.cluster.local. api.example.com."}, []string{"api.example.com. 240.240.0.10"}},
			{"wildcard host", shopClient, "x.wild.example.com.", nil, []string{"x.wild.example.com. 240.240.0.11"}},
			{"headless service", shopClient, "db", nil, []string{"db.shop.svc.cluster.local. " + db0IP}},
			{"pod hostname", webClient, "db-0.db.shop.svc.cluster.local.", nil, []string{"db-0.db.shop.svc.cluster.local. " + db0IP}},
			{"external name, forwarded", shopClient, "www.example.org", nil, []string{"www.example.org. 192.0.2.7"}},
		} {
			t.Run(proto+"/"+tc.what, func(t *testing.T) {
				var r lookupResult
				// The daemon may still be receiving the first state.
				eventually(t, tc.name, func() (bool, string) {
					r = lookup(t, tc.pod, tc.name, proto)
					return strings.Join(r.A, ",") == strings.Join(tc.a, ","), fmt.Sprintf("%+v", r)
				})
				if strings.Join(r.CNAME, ",") != strings.Join(tc.cname, ",") {
					t.Fatalf("CNAME %v, want %v", r.CNAME, tc.cname)
				}
			})
		}
	}
	t.Run("a pod outside the mesh asks the resolver itself", func(t *testing.T) {
		r := lookup(t, outsider, "cart.shop.svc.cluster.local.", "udp")
		if r.Rcode != "NXDOMAIN" || len(r.A) != 0 {
			t.Fatalf("outsider got %+v, want the resolver's NXDOMAIN", r)
		}
	})
	t.Run("metrics", func(t *testing.T) {
		requireMetric(t, c.Nodes[0].Daemon, "istio_dns_requests_total", `request_query_type="a"`, `request_protocol="udp"`)
		requireMetric(t, c.Nodes[0].Daemon, "istio_dns_requests_total", `request_protocol="tcp"`)
		requireMetric(t, c.Nodes[0].Daemon, "istio_dns_upstream_requests_total", `request_query_type="a"`)
		requireMetric(t, c.Nodes[0].Daemon, "istio_dns_upstream_request_duration_seconds_count")
	})
	t.Run("rolling upgrade loses no query", func(t *testing.T) {
		var wg sync.WaitGroup
		var res loopResult
		var herr error
		wg.Add(1)
		go func() {
			defer wg.Done()
			herr = shopClient.Helper(&res, "dnsloop", "-server", server, "-name", "cart.shop.svc.cluster.local.", "-want", "10.96.1.10",
				"-for", "12s", "-every", "10ms", "-timeout", "2s")
		}()
		time.Sleep(2 * time.Second)
		if err := c.Nodes[0].UpgradeDaemon(); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		if herr != nil {
			t.Fatal(herr)
		}
		t.Logf("%d questions during the upgrade, %d answered", res.Asked, res.Answered)
		if res.Answered != res.Asked || res.Asked < 100 {
			t.Fatalf("%d of %d questions not answered: %v", res.Asked-res.Answered, res.Asked, res.Errors)
		}
	})
	// The listener holder keeps the pods' DNS sockets while no daemon
	// runs: a question asked meanwhile waits in the socket's buffer and is
	// answered by the next daemon (within glibc's 5 s timeout, no retry).
	t.Run("SIGKILL and restart loses no query", func(t *testing.T) {
		var wg sync.WaitGroup
		var res loopResult
		var herr error
		wg.Add(1)
		go func() {
			defer wg.Done()
			herr = shopClient.Helper(&res, "dnsloop", "-server", server, "-name", "cart.shop.svc.cluster.local.", "-want", "10.96.1.10",
				"-for", "10s", "-every", "10ms", "-timeout", "5s")
		}()
		time.Sleep(2 * time.Second)
		n := c.Nodes[0]
		n.KillDaemon()
		time.Sleep(500 * time.Millisecond)
		if err := n.StartDaemon(); err != nil {
			t.Fatal(err)
		}
		if err := n.WaitReady(30 * time.Second); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		if herr != nil {
			t.Fatal(herr)
		}
		t.Logf("%d questions across the crash, %d answered", res.Asked, res.Answered)
		if res.Answered != res.Asked || res.Asked < 100 {
			t.Fatalf("%d of %d questions not answered: %v", res.Asked-res.Answered, res.Asked, res.Errors)
		}
		requireMetric(t, n.Daemon, "kmesh_dns_listeners_total", `how="reused"`)
	})
}
