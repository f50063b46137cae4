package dnsproxy

import (
	"fmt"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// BenchmarkDNS compares one client asking questions one after the other
// over UDP on loopback: straight to a resolver (direct), to the proxy for a
// mesh name (answered from the state), and to the proxy for an external
// name (forwarded to that resolver, with and without the cache), in four
// rounds that each run every arm (interleaved: the machine's noise falls on
// all arms alike). Reports
// p50/p99 latency besides ns/op (= mean; qps = 1e9 / ns/op).
func BenchmarkDNS(b *testing.B) {
	f := startUpstream(b)
	cached, _ := NewUpstream(UpstreamConfig{Servers: []string{f.addr}})
	uncached, _ := NewUpstream(UpstreamConfig{Servers: []string{f.addr}, CacheEntries: -1})
	_, withCache, _, _ := testServer(b, cached, Config{})
	_, noCache, _, _ := testServer(b, uncached, Config{})
	arms := []struct{ name, addr, q string }{
		{"direct", f.addr, "www.example.org."},
		{"proxy-mesh", withCache, "cart.shop.svc.cluster.local."},
		{"proxy-forward-cached", withCache, "www.example.org."},
		{"proxy-forward-uncached", noCache, "www.example.org."},
	}
	for round := range 4 {
		for _, arm := range arms {
			benchArm(b, fmt.Sprintf("round%d/%s", round, arm.name), arm.addr, arm.q)
		}
	}
}

func benchArm(b *testing.B, name, addr, question string) {
	{
		arm := struct{ name, addr, q string }{name, addr, question}
		b.Run(arm.name, func(b *testing.B) {
			c, err := net.Dial("udp", arm.addr)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			q := new(dns.Msg)
			q.SetQuestion(arm.q, dns.TypeA)
			out, _ := q.Pack()
			buf := make([]byte, 1500)
			lat := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for range b.N {
				start := time.Now()
				if _, err := c.Write(out); err != nil {
					b.Fatal(err)
				}
				c.SetReadDeadline(time.Now().Add(2 * time.Second))
				if _, err := c.Read(buf); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(start))
			}
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
		})
	}
}
