package dnsproxy

import (
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// fakeUpstream is a resolver on loopback: external names get an A record
// (TTL 60), big.example.org. a TXT answer too large for 512 bytes, slow.
// names wait for release.
type fakeUpstream struct {
	addr    string
	queries atomic.Int64
	release chan struct{}
	slow    atomic.Int64
	udp     *dns.Server
	tcp     *dns.Server
}

func startUpstream(t testing.TB) *fakeUpstream {
	t.Helper()
	f := &fakeUpstream{release: make(chan struct{})}
	h := dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		f.queries.Add(1)
		m := new(dns.Msg)
		m.SetReply(q)
		name := q.Question[0].Name
		switch {
		case strings.HasPrefix(name, "slow."):
			f.slow.Add(1)
			<-f.release
			f.slow.Add(-1)
		case name == "big.example.org.":
			for i := range 40 {
				m.Answer = append(m.Answer, &dns.TXT{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: 60},
					Txt: []string{fmt.Sprintf("record %02d %s", i, strings.Repeat("x", 40))}})
			}
		case strings.HasSuffix(name, ".example.org."):
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(192, 0, 2, 7)})
		default:
			m.Rcode = dns.RcodeNameError
		}
		_ = w.WriteMsg(m)
	})
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.addr = pc.LocalAddr().String()
	l, err := net.Listen("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	f.udp = &dns.Server{PacketConn: pc, Handler: h}
	f.tcp = &dns.Server{Listener: l, Handler: h}
	go f.udp.ActivateAndServe()
	go f.tcp.ActivateAndServe()
	t.Cleanup(func() {
		close(f.release)
		f.udp.Shutdown()
		f.tcp.Shutdown()
	})
	return f
}

// testServer serves pod "shop/client" on loopback sockets of its own (no
// network namespace needed).
func testServer(t testing.TB, up *Upstream, cfg Config) (*Server, string, string, *Metrics) {
	t.Helper()
	u, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	m := NewMetrics(prometheus.NewRegistry())
	cfg.View, cfg.Upstream, cfg.Metrics = mesh(t), up, m
	cfg.Source = func(string) (string, string) { return "client", "v1" }
	s := New(cfg)
	s.Serve(Pod{UID: "pod-1", WorkloadUID: "Kubernetes//Pod/shop/client", Namespace: "shop"}, &Sockets{UDP: []*net.UDPConn{u}, TCP: []*net.TCPListener{l}})
	t.Cleanup(s.Close)
	return s, u.LocalAddr().String(), l.Addr().String(), m
}

func ask(t testing.TB, proto, addr, name string, qtype uint16) *dns.Msg {
	t.Helper()
	c := &dns.Client{Net: proto, Timeout: 3 * time.Second}
	q := new(dns.Msg)
	q.SetQuestion(name, qtype)
	r, _, err := c.Exchange(q, addr)
	if err != nil {
		t.Fatalf("%s %s: %v", proto, name, err)
	}
	return r
}

func TestServerAnswersAndForwards(t *testing.T) {
	f := startUpstream(t)
	up, err := NewUpstream(UpstreamConfig{Servers: []string{f.addr}})
	if err != nil {
		t.Fatal(err)
	}
	_, udp, tcp, m := testServer(t, up, Config{})
	for _, c := range []struct{ proto, addr string }{{"udp", udp}, {"tcp", tcp}} {
		r := ask(t, c.proto, c.addr, "cart.", dns.TypeA)
		if r.Rcode != dns.RcodeSuccess || !r.Authoritative || len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != "10.96.0.10" {
			t.Fatalf("%s cart: %v", c.proto, r)
		}
	}
	if f.queries.Load() != 0 {
		t.Fatalf("mesh names went upstream")
	}
	r := ask(t, "udp", udp, "www.example.org.", dns.TypeA)
	if r.Rcode != dns.RcodeSuccess || r.Authoritative || len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != "192.0.2.7" {
		t.Fatalf("forwarded: %v", r)
	}
	r = ask(t, "udp", udp, "nope.invalid.", dns.TypeA)
	if r.Rcode != dns.RcodeNameError {
		t.Fatalf("NXDOMAIN not passed through: %v", r)
	}
	// Cached: the upstream sees the name once.
	n := f.queries.Load()
	r = ask(t, "tcp", tcp, "www.example.org.", dns.TypeA)
	if f.queries.Load() != n || len(r.Answer) != 1 || r.Answer[0].Header().Ttl > 60 {
		t.Fatalf("second ask went upstream (%d → %d) or wrong TTL: %v", n, f.queries.Load(), r)
	}
	// Other record types of a mesh name are forwarded too.
	if r := ask(t, "udp", udp, "cart.shop.svc.cluster.local.", dns.TypeMX); r.Rcode != dns.RcodeNameError {
		t.Fatalf("MX for a mesh name: %v", r)
	}
	if got := testutil.ToFloat64(m.Requests.WithLabelValues("a", "udp", "client", "v1")); got != 3 {
		t.Errorf("istio_dns_requests_total{a,udp} = %v, want 3", got)
	}
	if got := testutil.ToFloat64(m.Requests.WithLabelValues("a", "tcp", "client", "v1")); got != 2 {
		t.Errorf("istio_dns_requests_total{a,tcp} = %v, want 2", got)
	}
	if got := testutil.ToFloat64(m.UpstreamRequests.WithLabelValues("a", "udp", "client", "v1")); got != 2 {
		t.Errorf("istio_dns_upstream_requests_total{a,udp} = %v, want 2", got)
	}
	if got := testutil.CollectAndCount(m.UpstreamDuration); got != 3 {
		t.Errorf("duration series = %d, want 3", got)
	}
}

func TestServerTruncatesAndTCPCarriesAll(t *testing.T) {
	f := startUpstream(t)
	up, _ := NewUpstream(UpstreamConfig{Servers: []string{f.addr}})
	_, udp, tcp, _ := testServer(t, up, Config{})
	// Over UDP without EDNS0 the client takes 512 bytes: TC.
	c := &dns.Client{Net: "udp", Timeout: 3 * time.Second}
	q := new(dns.Msg)
	q.SetQuestion("big.example.org.", dns.TypeTXT)
	r, _, err := c.Exchange(q, udp)
	if err != nil {
		t.Fatal(err)
	}
	r.Compress = true
	if !r.Truncated || r.Len() > 512 {
		t.Fatalf("UDP answer of %d bytes, TC=%v", r.Len(), r.Truncated)
	}
	// The forwarder itself got it whole (its own TCP retry) and TCP
	// clients get all of it.
	r = ask(t, "tcp", tcp, "big.example.org.", dns.TypeTXT)
	if r.Truncated || len(r.Answer) != 40 {
		t.Fatalf("TCP answer: TC=%v, %d records", r.Truncated, len(r.Answer))
	}
	// With EDNS0 4096 it fits over UDP.
	q.SetEdns0(4096, false)
	if r, _, err = c.Exchange(q, udp); err != nil || r.Truncated || len(r.Answer) != 40 {
		t.Fatalf("EDNS0 UDP answer: %v TC=%v", err, r != nil && r.Truncated)
	}
}

func TestServerUpstreamDownIsQuickSERVFAIL(t *testing.T) {
	// A port nothing listens on (refused at once), and a socket that
	// never answers (the timeout).
	dead, _ := net.ListenPacket("udp", "127.0.0.1:0")
	deadAddr := dead.LocalAddr().String()
	dead.Close()
	hole, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hole.Close()
	for _, c := range []struct {
		name   string
		server string
		within time.Duration
	}{{"refused", deadAddr, 500 * time.Millisecond}, {"black hole", hole.LocalAddr().String(), 1500 * time.Millisecond}} {
		t.Run(c.name, func(t *testing.T) {
			up, _ := NewUpstream(UpstreamConfig{Servers: []string{c.server}, Timeout: time.Second})
			_, udp, _, m := testServer(t, up, Config{})
			start := time.Now()
			r := ask(t, "udp", udp, "www.example.org.", dns.TypeA)
			if el := time.Since(start); r.Rcode != dns.RcodeServerFailure || el > c.within {
				t.Fatalf("rcode %s after %v, want SERVFAIL within %v", dns.RcodeToString[r.Rcode], el, c.within)
			}
			if got := testutil.ToFloat64(m.UpstreamFailures.WithLabelValues("a", "udp", "client", "v1")); got != 1 {
				t.Errorf("istio_dns_upstream_failures_total = %v", got)
			}
			// Mesh names still answer with the upstream down.
			if r := ask(t, "udp", udp, "cart.", dns.TypeA); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
				t.Fatalf("mesh name with upstream down: %v", r)
			}
		})
	}
}

func TestServerMalformed(t *testing.T) {
	_, udp, tcp, m := testServer(t, nil, Config{})
	c, err := net.Dial("udp", udp)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// A header and garbage: FORMERR with the query's ID.
	msg := []byte{0xbe, 0xef, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xff, 0xff}
	c.Write(msg)
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 512)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	r := new(dns.Msg)
	if err := r.Unpack(buf[:n]); err != nil || r.Id != 0xbeef || r.Rcode != dns.RcodeFormatError || !r.Response {
		t.Fatalf("answer to garbage: %v %v", r, err)
	}
	// Shorter than a header, or an answer: nothing back.
	c.Write([]byte{1, 2, 3})
	r.Response = true
	out, _ := r.Pack()
	c.Write(out)
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, err := c.Read(buf); err == nil {
		t.Fatalf("answered %d bytes to a runt or an answer", n)
	}
	// Two questions: FORMERR too.
	q := new(dns.Msg)
	q.SetQuestion("cart.", dns.TypeA)
	q.Question = append(q.Question, q.Question[0])
	if r, _, err := (&dns.Client{Net: "tcp"}).Exchange(q, tcp); err != nil || r.Rcode != dns.RcodeFormatError {
		t.Fatalf("two questions: %v %v", r, err)
	}
	if got := testutil.ToFloat64(m.Refused.WithLabelValues("formerr")); got != 2 {
		t.Errorf("formerr count %v, want 2", got)
	}
	// Still serving.
	if r := ask(t, "udp", udp, "cart.", dns.TypeA); len(r.Answer) != 1 {
		t.Fatal("not answering after bad input")
	}
}

// A pod flooding questions the upstream is slow to answer never has more
// than InFlight of them in progress; the rest are dropped and counted, and
// TCP connections beyond the bound are refused.
func TestServerFloodIsBounded(t *testing.T) {
	f := startUpstream(t)
	up, _ := NewUpstream(UpstreamConfig{Servers: []string{f.addr}, Timeout: 5 * time.Second})
	_, udp, tcp, m := testServer(t, up, Config{InFlight: 8, TCPConns: 4, TCPIdle: 500 * time.Millisecond})
	c, err := net.Dial("udp", udp)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range 200 {
		q := new(dns.Msg)
		q.SetQuestion(fmt.Sprintf("slow.%d.example.org.", i), dns.TypeA)
		out, _ := q.Pack()
		c.Write(out)
	}
	deadline := time.Now().Add(3 * time.Second)
	for f.slow.Load() < 8 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	if got := f.slow.Load(); got != 8 {
		t.Fatalf("%d questions in progress upstream, want the bound 8", got)
	}
	if got := testutil.ToFloat64(m.Refused.WithLabelValues("overload")); got < 150 {
		t.Fatalf("dropped %v of 200, want the ones beyond the bound", got)
	}
	// TCP: 4 connections held open, the 5th is refused.
	var conns []net.Conn
	for range 4 {
		cc, err := net.Dial("tcp", tcp)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, cc)
	}
	time.Sleep(100 * time.Millisecond)
	extra, err := net.Dial("tcp", tcp)
	if err == nil {
		extra.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := extra.Read(make([]byte, 1)); err == nil {
			t.Fatal("5th TCP connection was served")
		}
		extra.Close()
	}
	// Idle connections are closed after TCPIdle, and free their places.
	for _, cc := range conns {
		cc.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := cc.Read(make([]byte, 1)); err == nil {
			t.Fatal("idle TCP connection got data")
		}
		cc.Close()
	}
	if r := ask(t, "tcp", tcp, "cart.", dns.TypeA); len(r.Answer) != 1 {
		t.Fatal("TCP not served after idle connections closed")
	}
}

func TestCacheBoundedAndTTL(t *testing.T) {
	c := newCache(3)
	now := time.Now()
	msg := func(name string, ttl uint32) *dns.Msg {
		m := new(dns.Msg)
		m.SetQuestion(name, dns.TypeA)
		m.Response = true
		m.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: ttl}, A: net.IPv4(192, 0, 2, 1)}}
		return m
	}
	for i := range 10 {
		m := msg(fmt.Sprintf("n%d.", i), 60)
		c.put(cacheKey(m), m, now)
		if c.len() > 3 {
			t.Fatalf("cache holds %d > 3", c.len())
		}
	}
	m := msg("ttl.", 10)
	c.put(cacheKey(m), m, now)
	if r := c.get(cacheKey(m), now.Add(4*time.Second)); r == nil || r.Answer[0].Header().Ttl != 6 {
		t.Fatalf("aged TTL: %v", r)
	}
	if r := c.get(cacheKey(m), now.Add(10*time.Second)); r != nil {
		t.Fatal("expired answer served")
	}
	// Not cached: SERVFAIL, truncated, TTL 0.
	for _, m := range []*dns.Msg{msg("zero.", 0), func() *dns.Msg { m := msg("tc.", 60); m.Truncated = true; return m }(),
		func() *dns.Msg { m := msg("sf.", 60); m.Rcode = dns.RcodeServerFailure; return m }()} {
		c.put(cacheKey(m), m, now)
		if c.get(cacheKey(m), now) != nil {
			t.Fatalf("cached %v", m.Question)
		}
	}
	// Negative answers: the SOA's minimum.
	neg := new(dns.Msg)
	neg.SetQuestion("nx.", dns.TypeA)
	neg.Rcode = dns.RcodeNameError
	neg.Ns = []dns.RR{&dns.SOA{Hdr: dns.RR_Header{Name: ".", Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: 300}, Minttl: 5}}
	if got := ttlOf(neg); got != 5*time.Second {
		t.Fatalf("negative TTL %v, want 5s", got)
	}
}

// A server whose state is not there yet leaves questions queued in the
// socket and answers them once it is (a restarted daemon must not forward
// mesh names upstream from an empty state).
func TestServerWaitsForState(t *testing.T) {
	ready := make(chan struct{})
	_, udp, _, _ := testServer(t, nil, Config{Ready: ready})
	c := &dns.Client{Net: "udp", Timeout: 3 * time.Second}
	q := new(dns.Msg)
	q.SetQuestion("cart.", dns.TypeA)
	done := make(chan *dns.Msg, 1)
	go func() {
		r, _, _ := c.Exchange(q, udp)
		done <- r
	}()
	select {
	case r := <-done:
		t.Fatalf("answered before the state was there: %v", r)
	case <-time.After(300 * time.Millisecond):
	}
	close(ready)
	if r := <-done; r == nil || len(r.Answer) != 1 {
		t.Fatalf("queued question: %v", r)
	}
}
