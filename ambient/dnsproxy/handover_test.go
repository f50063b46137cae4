package dnsproxy

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"

	"kmesh.dev/kmesh/ambient/podsock"
	"kmesh.dev/kmesh/integration/kerneltest"
)

// reuseSockets opens a pod's sockets on addr beside any already there (as a
// second daemon does in the pod's namespace; here on the test's loopback).
func reuseSockets(t *testing.T, addr string) *Sockets {
	t.Helper()
	lc := net.ListenConfig{Control: podsock.Control()}
	u, err := lc.ListenPacket(context.Background(), "udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	l, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return &Sockets{UDP: []*net.UDPConn{u.(*net.UDPConn)}, TCP: []*net.TCPListener{l.(*net.TCPListener)}}
}

// TestPrivilegedDNSHandover: while clients ask without pause, an old server
// hands over to a new one listening beside it (SO_REUSEPORT) and stops;
// every question is answered, none waits for a retry.
func TestPrivilegedDNSHandover(t *testing.T) {
	kerneltest.RequireRoot(t)
	probe, _ := net.ListenPacket("udp", "127.0.0.1:0")
	addr := probe.LocalAddr().String()
	probe.Close()
	pod := Pod{UID: "p", Namespace: "shop"}
	old := New(Config{View: mesh(t)})
	old.Serve(pod, reuseSockets(t, addr))
	next := New(Config{View: mesh(t)})
	next.Serve(pod, reuseSockets(t, addr))
	defer next.Close()

	var asked, lost atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// A socket of its own per question: the kernel hashes each
			// source port to one of the two servers.
			for j := 0; ; j++ {
				select {
				case <-stop:
					return
				default:
				}
				c := &dns.Client{Net: "udp", Timeout: time.Second}
				q := new(dns.Msg)
				q.SetQuestion("cart.", dns.TypeA)
				asked.Add(1)
				if r, _, err := c.Exchange(q, addr); err != nil || len(r.Answer) != 1 {
					lost.Add(1)
					t.Logf("client %d question %d: %v", i, j, err)
				}
			}
		}()
	}
	time.Sleep(200 * time.Millisecond)
	old.Shutdown(100 * time.Millisecond)
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wg.Wait()
	if lost.Load() > 0 || asked.Load() < 100 {
		t.Fatalf("%d of %d questions lost across the handover", lost.Load(), asked.Load())
	}
	t.Log(fmt.Sprintf("%d questions, none lost", asked.Load()))
}
