package dnsproxy

import (
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/kerneltest"
	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/kernel"
)

func TestMain(m *testing.M) {
	podnet.MaybeRunHelper()
	os.Exit(m.Run())
}

func init() { podnet.RegisterHelper("dnsq", dnsqHelper) }

// dnsAnswer is what a dnsq helper saw.
type dnsAnswer struct {
	Rcode string
	A     []string
	// From is the address the answer came from as the application sees
	// it: recvfrom's source (unconnected UDP) or getpeername (connected).
	From string
	Err  string
}

// dnsqHelper asks one question from inside a pod as an application would:
// -mode udp (unconnected: sendto/recvfrom), connected (connected UDP) or
// tcp.
func dnsqHelper(args []string) (any, error) {
	fs := flag.NewFlagSet("dnsq", flag.ContinueOnError)
	mode := fs.String("mode", "udp", "udp, connected or tcp")
	server := fs.String("server", "", "resolver host:port")
	name := fs.String("name", "", "name")
	aaaa := fs.Bool("aaaa", false, "ask AAAA")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	q := new(dns.Msg)
	qt := dns.TypeA
	if *aaaa {
		qt = dns.TypeAAAA
	}
	q.SetQuestion(*name, qt)
	out, _ := q.Pack()
	var res dnsAnswer
	var reply []byte
	buf := make([]byte, 4096)
	dst, err := netip.ParseAddrPort(*server)
	if err != nil {
		return nil, err
	}
	switch *mode {
	case "udp":
		c, err := net.ListenUDP("udp", nil)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		if _, err := c.WriteToUDPAddrPort(out, dst); err != nil {
			res.Err = err.Error()
			return res, nil
		}
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			res.Err = err.Error()
			return res, nil
		}
		reply, res.From = buf[:n], netip.AddrPortFrom(from.Addr().Unmap(), from.Port()).String()
	case "connected", "tcp":
		network := "udp"
		if *mode == "tcp" {
			network = "tcp"
		}
		c, err := net.DialTimeout(network, dst.String(), 3*time.Second)
		if err != nil {
			res.Err = err.Error()
			return res, nil
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		dc := &dns.Conn{Conn: c}
		if err := dc.WriteMsg(q); err != nil {
			res.Err = err.Error()
			return res, nil
		}
		r, err := dc.ReadMsg()
		if err != nil {
			res.Err = err.Error()
			return res, nil
		}
		reply, _ = r.Pack()
		// getpeername, through the kernel's hook.
		sa, err := getpeername(c)
		if err != nil {
			return nil, err
		}
		res.From = sa
	}
	r := new(dns.Msg)
	if err := r.Unpack(reply); err != nil {
		return nil, err
	}
	res.Rcode = dns.RcodeToString[r.Rcode]
	for _, rr := range r.Answer {
		switch rr := rr.(type) {
		case *dns.A:
			res.A = append(res.A, rr.A.String())
		case *dns.AAAA:
			res.A = append(res.A, rr.AAAA.String())
		}
	}
	return res, nil
}

func getpeername(c net.Conn) (string, error) {
	f, err := c.(interface{ File() (*os.File, error) }).File()
	if err != nil {
		return "", err
	}
	defer f.Close()
	sa, err := unix.Getpeername(int(f.Fd()))
	if err != nil {
		return "", err
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)).String(), nil
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port)).String(), nil
	}
	return "", nil
}

// resolverAnswer is what the "cluster resolver" pod answers for any A or
// AAAA question: whoever gets it has not been captured.
const resolverAnswer = "192.0.2.53"

// TestPrivilegedDNSCapture: an enrolled pod's DNS to any resolver on port 53
// reaches the node proxy's DNS server in the pod, over unconnected UDP,
// connected UDP and TCP, IPv4 and IPv6, and the application sees the answer
// come from the resolver it asked. A pod not enrolled, the proxy's own
// sockets and capture switched off all reach the real resolver.
func TestPrivilegedDNSCapture(t *testing.T) {
	env := kerneltest.New(t, bpf.Config{})
	node, err := podnet.NewNode("n1", netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("fd00:10:244:1::/64"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { node.Close() })
	addPod := func(name string, host int) *podnet.Pod {
		p, err := node.AddPod(name, netip.AddrFrom4([4]byte{10, 244, 1, byte(host)}), netip.MustParseAddr("fd00:10:244:1::"+itoa(host)))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	client, outsider, resolver := addPod("client", 2), addPod("outsider", 3), addPod("resolver", 53)

	// The cluster's resolver: a pod answering everything with resolverAnswer.
	var sources sync.Map // who asked the resolver what
	h := dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		from, _ := netip.ParseAddrPort(w.RemoteAddr().String())
		sources.Store(q.Question[0].Name, from.Addr().Unmap().String())
		m := new(dns.Msg)
		m.SetReply(q)
		qq := q.Question[0]
		if qq.Qtype == dns.TypeA {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: qq.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 5}, A: net.ParseIP(resolverAnswer)})
		}
		_ = w.WriteMsg(m)
	})
	for _, a := range []string{"[::]:53"} { // dual-stack
		pc, err := resolver.ListenPacket("udp", a)
		if err != nil {
			t.Fatal(err)
		}
		l, err := resolver.Listen("tcp", a)
		if err != nil {
			t.Fatal(err)
		}
		us, ts := &dns.Server{PacketConn: pc, Handler: h}, &dns.Server{Listener: l, Handler: h}
		go us.ActivateAndServe()
		go ts.ActivateAndServe()
		t.Cleanup(func() { us.Shutdown(); ts.Shutdown() })
	}

	// The proxy: mesh names from the state, the rest to the cluster's
	// resolver, asked from inside the pod as ztunnel does (its sockets
	// recorded as the proxy's own, or they would be captured back to it).
	upstream, err := NewUpstream(UpstreamConfig{Servers: []string{netip.AddrPortFrom(resolver.IPv4, 53).String()}})
	if err != nil {
		t.Fatal(err)
	}
	srv := New(Config{View: mesh(t), Upstream: upstream, UpstreamFromPod: true, OwnSockets: env.DP.Maps})
	t.Cleanup(srv.Close)
	nsFile, err := client.NS.File()
	if err != nil {
		t.Fatal(err)
	}
	defer nsFile.Close()
	if err := srv.AddPod(Pod{UID: "client", Namespace: "shop", Netns: nsFile}); err != nil {
		t.Fatal(err)
	}
	cookie, err := client.NS.Cookie()
	if err != nil {
		t.Fatal(err)
	}
	if err := env.DP.Maps.SetManaged(cookie, 1); err != nil {
		t.Fatal(err)
	}
	if err := env.DP.Maps.SetDNSCapture(true, Port); err != nil {
		t.Fatal(err)
	}

	r4 := netip.AddrPortFrom(resolver.IPv4, 53).String()
	r6 := netip.AddrPortFrom(resolver.IPv6, 53).String()
	ask := func(t *testing.T, p *podnet.Pod, mode, server, name string, aaaa bool) dnsAnswer {
		t.Helper()
		var a dnsAnswer
		args := []string{"-mode", mode, "-server", server, "-name", name}
		if aaaa {
			args = append(args, "-aaaa")
		}
		if err := p.Helper(env.Cgroup, &a, "dnsq", args...); err != nil {
			t.Fatal(err)
		}
		if a.Err != "" {
			t.Fatalf("%s %s via %s: %s", mode, name, server, a.Err)
		}
		return a
	}
	expect := func(t *testing.T, a dnsAnswer, ip, from string) {
		t.Helper()
		if len(a.A) != 1 || a.A[0] != ip || a.From != from {
			t.Fatalf("answer %v from %s, want %s from %s", a.A, a.From, ip, from)
		}
	}
	for _, mode := range []string{"udp", "connected", "tcp"} {
		t.Run(mode, func(t *testing.T) {
			expect(t, ask(t, client, mode, r4, "cart.shop.svc.cluster.local.", false), "10.96.0.10", r4)
			expect(t, ask(t, client, mode, r6, "cart.", true), "fd00::10", r6)
			// Forwarded by the proxy to the resolver, from the pod.
			name := mode + ".example.org."
			expect(t, ask(t, client, mode, r4, name, false), resolverAnswer, r4)
			if from, _ := sources.Load(name); from != client.IPv4.String() {
				t.Fatalf("the resolver was asked %s from %v, want the pod's %s", name, from, client.IPv4)
			}
			// A pod that is not enrolled reaches the resolver itself.
			expect(t, ask(t, outsider, mode, r4, "cart.shop.svc.cluster.local.", false), resolverAnswer, r4)
		})
	}
	st, err := env.DP.Maps.Stats()
	if err != nil || st["dns_captured"] < 9 {
		t.Fatalf("dns_captured = %d (%v), want every enrolled query", st["dns_captured"], err)
	}

	t.Run("the proxy's own sockets", func(t *testing.T) {
		// A socket of the daemon's in the pod (recorded in kmesh_proxy_sk)
		// asking port 53 reaches the resolver, not itself.
		var fd int
		err := kernel.InNetns(client.NS.Fd(), func() (err error) {
			fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		f := os.NewFile(uintptr(fd), "udp")
		defer f.Close()
		if err := env.DP.Maps.MarkProxySocket(uintptr(fd)); err != nil {
			t.Fatal(err)
		}
		pc, err := net.FilePacketConn(f)
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		conn := &dns.Conn{Conn: &packetConnTo{pc.(*net.UDPConn), net.UDPAddrFromAddrPort(netip.MustParseAddrPort(r4))}}
		q := new(dns.Msg)
		q.SetQuestion("cart.shop.svc.cluster.local.", dns.TypeA)
		pc.SetDeadline(time.Now().Add(3 * time.Second))
		if err := conn.WriteMsg(q); err != nil {
			t.Fatal(err)
		}
		r, err := conn.ReadMsg()
		if err != nil {
			t.Fatal(err)
		}
		if len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != resolverAnswer {
			t.Fatalf("proxy's own query was answered %v", r.Answer)
		}
	})
	t.Run("capture off", func(t *testing.T) {
		if err := env.DP.Maps.SetDNSCapture(false, Port); err != nil {
			t.Fatal(err)
		}
		for _, mode := range []string{"udp", "connected", "tcp"} {
			expect(t, ask(t, client, mode, r4, "cart.shop.svc.cluster.local.", false), resolverAnswer, r4)
		}
		if err := env.DP.Maps.SetDNSCapture(true, Port); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("istio-cni's iptables DNS capture", func(t *testing.T) {
		// istio-cni's in-pod rules redirect port 53 to 15053 unless the
		// packet carries the proxy's mark (its upstream sockets do). With
		// the kernel's capture off, they alone bring the pod's DNS here;
		// with it on, the kernel redirects first and the rules see 15053.
		for _, rule := range [][]string{
			{"-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-m", "mark", "!", "--mark", "0x539/0xfff", "-j", "REDIRECT", "--to-ports", "15053"},
			{"-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "53", "!", "-d", "127.0.0.1/32", "-m", "mark", "!", "--mark", "0x539/0xfff", "-j", "REDIRECT", "--to-ports", "15053"},
		} {
			iptables(t, client, rule...)
		}
		defer iptables(t, client, "-t", "nat", "-F", "OUTPUT")
		for _, kernelCapture := range []bool{false, true} {
			if err := env.DP.Maps.SetDNSCapture(kernelCapture, Port); err != nil {
				t.Fatal(err)
			}
			before, _ := env.DP.Maps.Stats()
			for _, mode := range []string{"udp", "connected", "tcp"} {
				expect(t, ask(t, client, mode, r4, "cart.shop.svc.cluster.local.", false), "10.96.0.10", r4)
				name := fmt.Sprintf("iptables-%v-%s.example.org.", kernelCapture, mode)
				expect(t, ask(t, client, mode, r4, name, false), resolverAnswer, r4)
				if from, _ := sources.Load(name); from != client.IPv4.String() {
					t.Fatalf("the resolver was asked %s from %v, want the pod's %s", name, from, client.IPv4)
				}
			}
			after, _ := env.DP.Maps.Stats()
			if captured := after["dns_captured"] - before["dns_captured"]; (captured > 0) != kernelCapture {
				t.Fatalf("kernel capture %v: %d queries captured by the kernel", kernelCapture, captured)
			}
		}
	})
	t.Run("a resolver on the pod's loopback is left alone", func(t *testing.T) {
		// Nothing listens on 127.0.0.1:53 in the pod: left alone, the
		// query is refused rather than answered by the proxy.
		var a dnsAnswer
		if err := client.Helper(env.Cgroup, &a, "dnsq", "-mode", "tcp", "-server", "127.0.0.1:53", "-name", "cart."); err != nil {
			t.Fatal(err)
		}
		if a.Err == "" {
			t.Fatalf("a query to the pod's own 127.0.0.1:53 was answered: %v", a)
		}
	})
}

// packetConnTo is an unconnected UDP socket used as a connection to one
// address (dns.Conn wants a net.Conn).
type packetConnTo struct {
	*net.UDPConn
	to *net.UDPAddr
}

func (p *packetConnTo) Write(b []byte) (int, error) { return p.WriteToUDP(b, p.to) }
func (p *packetConnTo) Read(b []byte) (int, error) {
	n, _, err := p.ReadFromUDP(b)
	return n, err
}

func itoa(i int) string { return strconv.Itoa(i) }

func iptables(t *testing.T, pod *podnet.Pod, args ...string) {
	t.Helper()
	var out []byte
	err := pod.NS.Do(func() (err error) {
		out, err = exec.Command("iptables", args...).CombinedOutput()
		return err
	})
	if err != nil {
		t.Fatalf("iptables %v in %s: %v: %s", args, pod.Name, err, out)
	}
}
