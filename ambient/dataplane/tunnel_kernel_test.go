package dataplane_test

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/bpf"
)

// fakeOutbound stands in for the node proxy's outbound listener inside the
// client pod: it takes what the kernel recorded for every accepted
// connection and answers with it, so the client helper reports where the
// kernel sent it.
type fakeOutbound struct {
	mu   sync.Mutex
	seen []bpf.TunnelOrig
	miss int
}

func (o *fakeOutbound) serve(t testing.TB, l net.Listener, maps *bpf.Maps, cookie uint64) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		peer := c.RemoteAddr().(*net.TCPAddr).AddrPort()
		orig, ok, err := maps.TakeTunnel(cookie, peer)
		if err != nil {
			t.Errorf("TakeTunnel(%v): %v", peer, err)
		}
		o.mu.Lock()
		if ok {
			o.seen = append(o.seen, orig)
		} else {
			o.miss++
		}
		o.mu.Unlock()
		name := "tunnel:unknown"
		if ok {
			name = fmt.Sprintf("tunnel:%s>%s", orig.Dst, orig.Backend)
			if orig.Path == bpf.PathWaypoint {
				name = fmt.Sprintf("tunnel:%s>waypoint", orig.Dst)
			}
		}
		fmt.Fprintln(c, name)
		c.Close()
	}
}

// TestPrivilegedTunnelRedirect checks the kernel half of the HBONE path:
// which connections leave a pod through the node proxy, and that the proxy
// learns where each was meant to go.
func TestPrivilegedTunnelRedirect(t *testing.T) {
	f := newFixture(t, bpf.Config{})
	cookie, err := f.client.NS.Cookie()
	if err != nil {
		t.Fatal(err)
	}
	out := &fakeOutbound{}
	for _, addr := range []string{"127.0.0.1:15001", "[::1]:15001"} {
		l, err := f.client.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		go out.serve(t, l, f.env.DP.Maps, cookie)
	}
	remote := dataplane.Topology{Node: "n2", Cluster: "c1"}
	hbone := func(name string, topo dataplane.Topology) dataplane.Workload {
		w := f.workload(name, 1, true, topo)
		w.HBONE = true
		return w
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	a, b := f.backends["a"], f.backends["b"]
	a4, a6 := netip.AddrPortFrom(a.IPv4, 8080), netip.AddrPortFrom(a.IPv6, 8080)
	b4 := netip.AddrPortFrom(b.IPv4, 8080)

	t.Run("same-node HBONE workload: kernel path", func(t *testing.T) {
		must(f.dp.SetWorkload(hbone("a", f.node)))
		res := f.run(t, f.client, "tcp", "-addr", a4.String(), "-n", "5")
		expectOnly(t, res.Names, "a:8080", 5)
	})
	t.Run("remote HBONE workload by IP: tunnel", func(t *testing.T) {
		must(f.dp.SetWorkload(hbone("a", remote)))
		res := f.run(t, f.client, "tcp", "-addr", a4.String(), "-n", "5", "-network", "tcp4")
		expectOnly(t, res.Names, fmt.Sprintf("tunnel:%s>%s", a4, a4), 5)
		// The application still sees the peer it dialled.
		expectOnly(t, res.Peers, a4.String(), 5)
		res = f.run(t, f.client, "tcp", "-addr", a6.String(), "-n", "5", "-network", "tcp6")
		expectOnly(t, res.Names, fmt.Sprintf("tunnel:%s>%s", a6, a6), 5)
		expectOnly(t, res.Peers, a6.String(), 5)
	})
	t.Run("same-node workload with policies to enforce: tunnel", func(t *testing.T) {
		w := hbone("a", f.node)
		w.Policies = true
		must(f.dp.SetWorkload(w))
		res := f.run(t, f.client, "tcp", "-addr", a4.String(), "-n", "3")
		expectOnly(t, res.Names, fmt.Sprintf("tunnel:%s>%s", a4, a4), 3)
		must(f.dp.SetWorkload(hbone("a", remote)))
	})
	t.Run("the proxy's own sockets are left alone, a forged mark is not enough", func(t *testing.T) {
		// A pod with NET_ADMIN can set the proxy's mark on its sockets:
		// they are tunnelled like any other.
		res := f.run(t, f.client, "tcp", "-addr", a4.String(), "-n", "3", "-mark", fmt.Sprint(bpf.ProxyMark))
		expectOnly(t, res.Names, fmt.Sprintf("tunnel:%s>%s", a4, a4), 3)
		// What the daemon records in the socket's storage (a pod cannot
		// write that map) is what the kernel trusts.
		res = f.run(t, f.client, "tcp", "-addr", a4.String(), "-n", "3", "-own-pin", f.env.Config.PinRoot)
		expectOnly(t, res.Names, "a:8080", 3)
	})
	t.Run("HBONE port is never tunnelled twice", func(t *testing.T) {
		l, err := a.Listen("tcp", ":15008")
		must(err)
		defer l.Close()
		go serveName(l, "a:15008")
		res := f.run(t, f.client, "tcp", "-addr", netip.AddrPortFrom(a.IPv4, 15008).String(), "-n", "3")
		expectOnly(t, res.Names, "a:15008", 3)
	})
	t.Run("UDP to a remote HBONE workload is not tunnelled", func(t *testing.T) {
		res := f.run(t, f.client, "udp", "-addr", netip.AddrPortFrom(a.IPv4, 5353).String(), "-n", "3")
		expectOnly(t, res.Names, "a", 3)
	})
	t.Run("service VIP: the kernel picks, the proxy is told which", func(t *testing.T) {
		must(f.dp.SetWorkload(hbone("b", f.node)))
		must(f.dp.SetService(f.service(dataplane.LoadBalancing{}, web, "a", "b")))
		res := f.run(t, f.client, "tcp", "-addr", "10.96.0.10:80", "-n", "400", "-network", "tcp4")
		expectShares(t, res.Names, map[string]float64{fmt.Sprintf("tunnel:10.96.0.10:80>%s", a4): 0.5, "b:8080": 0.5})
		expectOnly(t, res.Peers, "10.96.0.10:80", 400)
	})
	t.Run("waypoint: every TCP connection goes to the proxy, no backend chosen", func(t *testing.T) {
		svc := f.service(dataplane.LoadBalancing{}, web, "a", "b")
		svc.Waypoint = true
		must(f.dp.SetService(svc))
		res := f.run(t, f.client, "tcp", "-addr", "[fd00:10:96::10]:80", "-n", "20", "-network", "tcp6")
		expectOnly(t, res.Names, "tunnel:[fd00:10:96::10]:80>waypoint", 20)
		w := hbone("b", f.node)
		w.Waypoint = true
		must(f.dp.SetWorkload(w))
		res = f.run(t, f.client, "tcp", "-addr", b4.String(), "-n", "3")
		expectOnly(t, res.Names, fmt.Sprintf("tunnel:%s>waypoint", b4), 3)
	})
	out.mu.Lock()
	defer out.mu.Unlock()
	if out.miss != 0 {
		t.Errorf("%d tunnelled connections arrived without a kernel record", out.miss)
	}
	st, err := f.env.DP.Maps.Stats()
	must(err)
	if st["tunnel"] == 0 || st["tunnel_record"] != st["tunnel"] || st["tunnel_record_fail"] != 0 || st["tunnel_no_orig"] != 0 {
		t.Errorf("tunnel counters: %v", st)
	}
}

func serveName(l net.Listener, name string) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		w := bufio.NewWriter(c)
		fmt.Fprintln(w, name)
		w.Flush()
		c.Close()
	}
}
