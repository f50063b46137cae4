package tunnel

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"kmesh.dev/kmesh/ambient/hbone"
	"kmesh.dev/kmesh/ambient/identity"
	"kmesh.dev/kmesh/ambient/state"
)

// frames builds a client's bytes: preface, SETTINGS, then one HEADERS
// frame per request (and DATA, when given), as a seed for the fuzzer.
func frames(reqs ...[][2]string) []byte {
	var b bytes.Buffer
	b.WriteString(http2.ClientPreface)
	fr := http2.NewFramer(&b, nil)
	_ = fr.WriteSettings()
	for i, hdrs := range reqs {
		var hb bytes.Buffer
		enc := hpack.NewEncoder(&hb)
		for _, h := range hdrs {
			_ = enc.WriteField(hpack.HeaderField{Name: h[0], Value: h[1]})
		}
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: uint32(2*i + 1), BlockFragment: hb.Bytes(), EndHeaders: true})
		_ = fr.WriteData(uint32(2*i+1), true, []byte("hello"))
	}
	return b.Bytes()
}

// FuzzHBONEServer feeds arbitrary HTTP/2 traffic to the inbound HBONE
// handler (behind TLS in production; the peer is authenticated by then,
// but its requests are still untrusted input). Whatever arrives, the proxy
// must not panic, and must only ever dial this pod, never its own ports.
func FuzzHBONEServer(f *testing.F) {
	f.Add(frames([][2]string{{":method", "CONNECT"}, {":authority", "10.244.1.5:8080"}}))
	f.Add(frames([][2]string{{":method", "CONNECT"}, {":authority", "10.244.1.6:8080"}}))
	f.Add(frames([][2]string{{":method", "GET"}, {":scheme", "https"}, {":path", "/"}, {":authority", "10.244.1.5:8080"}}))
	f.Add(frames([][2]string{{":method", "CONNECT"}, {":authority", "[fd00:10:244:1::5]:15008"}}, [][2]string{{":method", "CONNECT"}, {":authority", "10.244.1.5:1"}, {"baggage", "k8s.namespace.name=%zz,,=="}}))
	f.Add([]byte(http2.ClientPreface))
	f.Add([]byte("garbage"))

	dir := state.NewStore()
	w := workload("echo", "app", "echo", true, "10.244.1.5", "fd00:10:244:1::5")
	dir.Apply(state.Update{Workloads: []*state.Workload{w}})
	pod := []netip.Addr{netip.MustParseAddr("10.244.1.5"), netip.MustParseAddr("fd00:10:244:1::5")}

	p, err := New(Config{Dir: dir, Certs: newTestCA(f, "cluster.local")})
	if err != nil {
		f.Fatal(err)
	}
	defer p.Close(context.Background(), 0)
	var mu sync.Mutex
	var bad []netip.AddrPort
	p.dialApp = func(_ context.Context, _ *podProxy, target netip.AddrPort) (*net.TCPConn, error) {
		ok := false
		for _, a := range pod {
			ok = ok || a == target.Addr()
		}
		if !ok || target.Port() == 15008 || target.Port() == 15001 || target.Port() == 15006 || target.Port() == 0 {
			mu.Lock()
			bad = append(bad, target)
			mu.Unlock()
		}
		return nil, errors.New("fuzz: no application")
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		ctx, cancel := context.WithCancel(context.Background())
		pp := &podProxy{pod: Pod{UID: "echo", WorkloadUID: "echo", Addrs: pod}, ctx: ctx, cancel: cancel, refs: 1}
		defer cancel()
		peer := identity.Identity{TrustDomain: "cluster.local", Namespace: "app", ServiceAccount: "sleep"}
		server, client := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			_ = hbone.Serve(server, p.h2, p.hboneHandler(pp, &peer, netip.MustParseAddrPort("10.244.2.9:40000"), netip.MustParseAddrPort("10.244.1.5:15008")))
		}()
		go func() { _, _ = io.Copy(io.Discard, client) }()
		_ = client.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = client.Write(data)
		time.Sleep(time.Millisecond)
		client.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			buf := make([]byte, 1<<20)
			t.Fatalf("the HTTP/2 server did not return after the peer left:\n%s", buf[:runtime.Stack(buf, true)])
		}
		mu.Lock()
		defer mu.Unlock()
		if len(bad) > 0 {
			t.Fatalf("dialled %v", bad)
		}
	})
}
