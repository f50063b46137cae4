package tunnel

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/net/http2"
	securityapi "istio.io/istio/pkg/workloadapi/security"

	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/ambient/identity"
	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/istioapps"
	"kmesh.dev/kmesh/integration/kerneltest"
	"kmesh.dev/kmesh/integration/podnet"
)

func TestMain(m *testing.M) {
	podnet.MaybeRunHelper()
	os.Exit(m.Run())
}

// tunnelFixture: one bridge, four pods. The kernel is told "echo" and
// "istio-peer" run on another node (so connections to them need HBONE),
// "near" on this one. The proxy serves sleep, echo and near as a node
// daemon would; istio-peer runs Istio's own HBONE server instead.
type tunnelFixture struct {
	env                        *kerneltest.Env
	sleep, echo, near, istioPd *podnet.Pod
	// outsider is a pod outside the mesh (not enrolled).
	outsider *podnet.Pod
	dir      *state.Store
	dp       *dataplane.Dataplane
	ca       *testCA
	proxy    *Proxy
	// logs is what the proxy logged (JSON lines).
	logs *lockedBuffer
}

// lockedBuffer is a bytes.Buffer the proxy's goroutines write to while the
// test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// logsMatching returns the proxy's log lines containing any of subs.
func (f *tunnelFixture) logsMatching(subs ...string) string {
	var b strings.Builder
	for _, line := range strings.Split(f.logs.String(), "\n") {
		for _, s := range subs {
			if strings.Contains(line, s) {
				b.WriteString(line + "\n")
				break
			}
		}
	}
	return b.String()
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func podWorkload(p *podnet.Pod, sa, node string) *state.Workload {
	w := workload(p.Name, "app", sa, true, p.IPv4.String(), p.IPv6.String())
	m := w.Meta()
	m.Node = node
	w.SetMeta(m)
	return w
}

// newTunnelFixture builds the fixture; opts adjust the proxy's Config.
func newTunnelFixture(t *testing.T, opts ...func(*Config)) *tunnelFixture {
	env := kerneltest.New(t, bpf.Config{})
	node, err := podnet.NewNode("n1", netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("fd00:10:244:1::/64"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { node.Close() })
	f := &tunnelFixture{env: env, dir: state.NewStore(), ca: newTestCA(t, "cluster.local"), logs: &lockedBuffer{}}
	add := func(name string, host int) *podnet.Pod {
		p, err := node.AddPod(name, netip.MustParseAddr(fmt.Sprintf("10.244.1.%d", host)), netip.MustParseAddr(fmt.Sprintf("fd00:10:244:1::%d", host)))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	f.sleep, f.echo, f.near, f.istioPd = add("sleep", 2), add("echo", 11), add("near", 12), add("istio-peer", 13)
	f.outsider = add("outsider", 14)
	for _, s := range []struct {
		p    *podnet.Pod
		name string
	}{{f.echo, "echo"}, {f.near, "near"}, {f.istioPd, "istio-peer"}} {
		l, err := s.p.Listen("tcp", ":9090")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		go podnet.ServeTCPName(l, s.name+":9090")
	}
	echoL, err := f.echo.Listen("tcp", ":7000")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { echoL.Close() })
	go serveEcho(echoL)

	wls := []*state.Workload{podWorkload(f.sleep, "sleep", "n1"), podWorkload(f.echo, "echo", "n2"),
		podWorkload(f.near, "near", "n1"), podWorkload(f.istioPd, "istio-peer", "n2")}
	wls[1].Services = []state.ServicePorts{{Service: "app/echo.app.svc.cluster.local", Ports: []state.Port{{ServicePort: 80, TargetPort: 9090}}}}
	f.dir.Apply(state.Update{Workloads: wls, Services: []*state.Service{{Name: "echo", Namespace: "app",
		Hostname: "echo.app.svc.cluster.local", VIPs: []state.NetworkAddr{{Addr: netip.MustParseAddr("10.96.0.10")}},
		Ports: []state.Port{{ServicePort: 80, TargetPort: 9090}}}}})

	dp := dataplane.New(env.DP.Maps, dataplane.Options{Node: dataplane.Topology{Node: "n1"}})
	f.dp = dp
	for _, w := range wls {
		if err := dp.SetWorkload(dataplane.Workload{UID: w.UID, Addrs: w.Addresses, Capacity: 1, Healthy: true, HBONE: true,
			Topology: dataplane.Topology{Node: w.Meta().Node}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := dp.SetService(dataplane.Service{Key: "app/echo.app.svc.cluster.local", VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.10")},
		Ports: []dataplane.Port{{ServicePort: 80, TargetPort: 9090}}, Endpoints: []dataplane.Endpoint{{WorkloadUID: "echo"}}}); err != nil {
		t.Fatal(err)
	}
	f.proxy, err = New(f.proxyConfig(opts...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		f.proxy.Close(ctx, 0)
	})
	for _, p := range []*podnet.Pod{f.sleep, f.echo, f.near} {
		cookie, err := p.NS.Cookie()
		if err != nil {
			t.Fatal(err)
		}
		if err := dp.Enroll(cookie, p.Name); err != nil {
			t.Fatal(err)
		}
		nsf, err := p.NS.File()
		if err != nil {
			t.Fatal(err)
		}
		sa := map[string]string{"sleep": "sleep", "echo": "echo", "near": "near"}[p.Name]
		err = f.proxy.AddPod(Pod{UID: p.Name, WorkloadUID: p.Name, Netns: nsf, Cookie: cookie,
			Identity: identity.Identity{TrustDomain: "cluster.local", Namespace: "app", ServiceAccount: sa}})
		if err == nil {
			// As the daemon's enrolment does: inbound enforcement once the
			// proxy's 15006 is there.
			err = env.DP.AttachInbound(int(nsf.Fd()), cookie)
		}
		nsf.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// proxyConfig is the fixture's proxy configuration (a new proxy built
// with it serves the same pods as a restarted daemon would).
func (f *tunnelFixture) proxyConfig(opts ...func(*Config)) Config {
	cfg := Config{TrustDomain: "cluster.local", Dir: f.dir, Certs: f.ca, Tunnels: f.env.DP.Maps, Picker: f.dp, Inbound: f.env.DP.Maps,
		OwnSockets: f.env.DP.Maps, Log: slog.New(slog.NewJSONHandler(f.logs, nil))}
	for _, o := range opts {
		o(&cfg)
	}
	return cfg
}

// addPods adds the fixture's enrolled pods (sleep, echo, near) to p, as a
// daemon's enrolment does.
func (f *tunnelFixture) addPods(t *testing.T, p *Proxy) {
	t.Helper()
	for _, pod := range []*podnet.Pod{f.sleep, f.echo, f.near} {
		cookie, err := pod.NS.Cookie()
		if err != nil {
			t.Fatal(err)
		}
		nsf, err := pod.NS.File()
		if err != nil {
			t.Fatal(err)
		}
		err = p.AddPod(Pod{UID: pod.Name, WorkloadUID: pod.Name, Netns: nsf, Cookie: cookie,
			Identity: identity.Identity{TrustDomain: "cluster.local", Namespace: "app", ServiceAccount: pod.Name}})
		nsf.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
}

func serveEcho(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			_, _ = io.Copy(c, c)
			_ = c.(*net.TCPConn).CloseWrite()
		}()
	}
}

func (f *tunnelFixture) run(t *testing.T, out any, helper string, args ...string) {
	t.Helper()
	if err := f.sleep.Helper(f.env.Cgroup, out, helper, args...); err != nil {
		t.Fatal(err)
	}
}

func counter(t *testing.T, p *Proxy, dir, reason string) float64 {
	t.Helper()
	return testutil.ToFloat64(p.m.refused.WithLabelValues(dir, reason))
}

func TestPrivilegedTunnel(t *testing.T) {
	f := newTunnelFixture(t)
	echo9090 := netip.AddrPortFrom(f.echo.IPv4, 9090)
	hs := func(dir string) float64 { return testutil.ToFloat64(f.proxy.m.handshakes.WithLabelValues(dir)) }

	t.Run("the wire between nodes carries TLS on 15008 only", func(t *testing.T) {
		capt := startCapture(t, f.echo)
		var res podnet.StreamResult
		f.run(t, &res, "stream", "-addr", netip.AddrPortFrom(f.echo.IPv4, 7000).String(), "-duration", "300ms", "-interval", "20ms")
		capt.stop()
		if res.Error != "" || res.Exchanges == 0 {
			t.Fatalf("stream through the tunnel: %+v", res)
		}
		var tlsStart, hbonePayload int
		for _, s := range capt.segments() {
			if s.dst.Port() == 7000 || s.src.Port() == 7000 {
				t.Fatalf("plaintext port 7000 on the wire: %v -> %v", s.src, s.dst)
			}
			if bytes.Contains(s.payload, []byte("ping-")) {
				t.Fatalf("application bytes visible on the wire: %q", s.payload)
			}
			if s.dst.Port() == 15008 && len(s.payload) > 0 {
				hbonePayload++
				if hbonePayload == 1 && len(s.payload) > 2 && s.payload[0] == 0x16 && s.payload[1] == 0x03 {
					tlsStart++
				}
			}
		}
		if hbonePayload == 0 || tlsStart != 1 {
			t.Fatalf("want TLS handshake records to :15008, saw %d payload segments (TLS start %d)", hbonePayload, tlsStart)
		}
	})

	t.Run("cross-node: HBONE, pooled, the application sees its peer", func(t *testing.T) {
		before := hs("outbound")
		var res podnet.ClientResult
		f.run(t, &res, "tcp", "-addr", echo9090.String(), "-n", "20")
		if res.Names["echo:9090"] != 20 || res.Peers[echo9090.String()] != 20 {
			t.Fatalf("20 connections to echo: %+v", res)
		}
		f.run(t, &res, "tcp", "-addr", "10.96.0.10:80", "-n", "10")
		if res.Names["echo:9090"] != 10 || res.Peers["10.96.0.10:80"] != 10 {
			t.Fatalf("10 connections to the echo VIP: %+v", res)
		}
		v6 := netip.AddrPortFrom(f.echo.IPv6, 9090)
		f.run(t, &res, "tcp", "-addr", v6.String(), "-n", "5", "-network", "tcp6")
		if res.Names["echo:9090"] != 5 || res.Peers[v6.String()] != 5 {
			t.Fatalf("5 IPv6 connections to echo: %+v", res)
		}
		if got := hs("outbound") - before; got > 2 { // at most one per address family
			t.Errorf("%v new HBONE handshakes for 35 connections: the pool is not reused", got)
		}
	})

	t.Run("same node: the kernel path, no tunnel", func(t *testing.T) {
		before := hs("outbound") + hs("inbound")
		var res podnet.ClientResult
		f.run(t, &res, "tcp", "-addr", netip.AddrPortFrom(f.near.IPv4, 9090).String(), "-n", "5")
		if res.Names["near:9090"] != 5 {
			t.Fatalf("5 connections to near: %+v", res)
		}
		if after := hs("outbound") + hs("inbound"); after != before {
			t.Errorf("same-node connections went through the tunnel (%v handshakes)", after-before)
		}
	})

	t.Run("large transfer, 1000 concurrent streams, half-close: no corruption", func(t *testing.T) {
		addr := netip.AddrPortFrom(f.echo.IPv4, 7000).String()
		var big podnet.BlastResult
		f.run(t, &big, "blast", "-addr", addr, "-conns", "1", "-bytes", fmt.Sprint(64<<20))
		if big.OK != 1 {
			t.Fatalf("64 MiB echoed through the tunnel: %+v", big)
		}
		t.Logf("64 MiB echoed in %.2fs (%.0f Mbit/s each way)", big.Seconds, float64(big.Bytes)*8/big.Seconds/1e6)
		var many podnet.BlastResult
		f.run(t, &many, "blast", "-addr", addr, "-conns", "1000", "-bytes", fmt.Sprint(64<<10))
		if many.OK != 1000 {
			t.Fatalf("1000 concurrent connections: %+v\nproxy log (warnings and refusals):\n%s", many, f.logsMatching("WARN", "ERROR", "refused", "failed"))
		}
		t.Logf("1000 × 64 KiB echoed in %.2fs", many.Seconds)
	})

	t.Run("the server closes first: the client sees EOF at once", func(t *testing.T) {
		// HTTP/1.0-style: the client waits for the server's close to end
		// the exchange, without closing its own side first.
		var res podnet.ClientResult
		start := time.Now()
		f.run(t, &res, "tcp", "-addr", echo9090.String(), "-n", "5", "-until-eof", "-timeout", "2s")
		if res.Names["echo:9090"] != 5 || time.Since(start) > 2*time.Second {
			t.Fatalf("5 exchanges ended by the server: %+v in %v", res, time.Since(start))
		}
	})

	t.Run("iperf3 through the tunnel", func(t *testing.T) {
		if _, err := exec.LookPath("iperf3"); err != nil {
			t.Fatal("iperf3 is not installed (make bench-tools / .ci/run installs it)")
		}
		srv := exec.Command("iperf3", "-s", "-1", "-p", "5201")
		if err := f.echo.Start(srv, nil); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()
		time.Sleep(200 * time.Millisecond)
		var out bytes.Buffer
		cli := exec.Command("iperf3", "-c", f.echo.IPv4.String(), "-p", "5201", "-t", "2", "-J")
		cli.Stdout = &out
		if err := f.sleep.Start(cli, f.env.Cgroup); err != nil {
			t.Fatal(err)
		}
		if err := cli.Wait(); err != nil {
			t.Fatalf("iperf3: %v\n%s", err, out.String())
		}
		var rep struct {
			End struct {
				SumReceived struct {
					Bytes         float64 `json:"bytes"`
					BitsPerSecond float64 `json:"bits_per_second"`
				} `json:"sum_received"`
			} `json:"end"`
		}
		if err := json.Unmarshal(out.Bytes(), &rep); err != nil || rep.End.SumReceived.Bytes == 0 {
			t.Fatalf("iperf3 report: %v\n%s", err, out.String())
		}
		t.Logf("iperf3 through the tunnel: %.2f Gbit/s", rep.End.SumReceived.BitsPerSecond/1e9)
	})

	t.Run("Istio's HBONE client to our server", func(t *testing.T) {
		sleepCert, _ := f.ca.Certificate(t.Context(), identity.Identity{TrustDomain: "cluster.local", Namespace: "app", ServiceAccount: "sleep"})
		cf, kf := writeCert(t, sleepCert)
		var line string
		if err := f.istioPd.Helper(nil, &line, istioapps.Dial, "-proxy", netip.AddrPortFrom(f.echo.IPv4, 15008).String(),
			"-target", echo9090.String(), "-cert", cf, "-key", kf); err != nil || line != "echo:9090" {
			t.Fatalf("Istio's dialer through our inbound: %q, %v", line, err)
		}
	})

	t.Run("our client to Istio's HBONE server", func(t *testing.T) {
		peerCert, _ := f.ca.Certificate(t.Context(), identity.Identity{TrustDomain: "cluster.local", Namespace: "app", ServiceAccount: "istio-peer"})
		startIstioHBONEServer(t, f.istioPd, peerCert)
		var res podnet.ClientResult
		f.run(t, &res, "tcp", "-addr", netip.AddrPortFrom(f.istioPd.IPv4, 9090).String(), "-n", "3")
		if res.Names["istio-peer:9090"] != 3 {
			t.Fatalf("through Istio's HBONE server: %+v", res)
		}
	})

	t.Run("istio-cni iptables redirection (coexistence): 15001 and 15006", func(t *testing.T) {
		for _, port := range []string{":7001", ":7002"} {
			l, err := f.echo.Listen("tcp", port)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			go serveRemoteAddr(l)
		}
		iptables(t, f.sleep, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", f.echo.IPv4.String(), "--dport", "7002", "-j", "REDIRECT", "--to-ports", "15001")
		iptables(t, f.echo, "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "7001", "-j", "REDIRECT", "--to-ports", "15006")
		// Outside the kernel path's cgroup: only iptables redirects these.
		var res podnet.ClientResult
		if err := f.sleep.Helper(nil, &res, "tcp", "-addr", netip.AddrPortFrom(f.echo.IPv4, 7002).String(), "-n", "3"); err != nil {
			t.Fatal(err)
		}
		// The application sees the proxy's inbound leg (from the pod's own
		// address), not the client: the connection went through the tunnel.
		if res.Names["from "+f.echo.IPv4.String()] != 3 {
			t.Fatalf("REDIRECT to 15001 then HBONE (SO_ORIGINAL_DST): %+v", res)
		}
		if err := f.istioPd.Helper(nil, &res, "tcp", "-addr", netip.AddrPortFrom(f.echo.IPv4, 7001).String(), "-n", "3"); err != nil {
			t.Fatal(err)
		}
		if res.Names["from "+f.echo.IPv4.String()] != 3 {
			t.Fatalf("plaintext REDIRECT to 15006: %+v", res)
		}
	})

	t.Run("refusals", func(t *testing.T) {
		f.refusals(t)
	})
}

// h2To opens an HBONE connection from the sleep pod to echo:15008 with the
// given client certificate (nil: none) and returns an HTTP/2 client on it.
func (f *tunnelFixture) h2To(t *testing.T, cert *identity.Certificate) (*http2.ClientConn, error) {
	t.Helper()
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"}, InsecureSkipVerify: true}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{cert.TLS}
	}
	var tc *tls.Conn
	var probe []byte
	err := f.sleep.NS.Do(func() error {
		raw, err := net.DialTimeout("tcp", netip.AddrPortFrom(f.echo.IPv4, 15008).String(), 3*time.Second)
		if err != nil {
			return err
		}
		tc = tls.Client(raw, cfg)
		if err := tc.HandshakeContext(t.Context()); err != nil {
			raw.Close()
			return err
		}
		// TLS 1.3: the server's verdict on our certificate arrives with
		// the first read; a 1-byte probe with a deadline surfaces it.
		_ = tc.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		var b [1]byte
		n, err := tc.Read(b[:])
		if err != nil && !os.IsTimeout(err) {
			raw.Close()
			return err
		}
		probe = b[:n] // the server's SETTINGS frame begins here
		_ = tc.SetReadDeadline(time.Time{})
		return nil
	})
	if err != nil {
		return nil, err
	}
	t2 := &http2.Transport{}
	return t2.NewClientConn(&prefixed{Conn: tc, head: probe})
}

// prefixed gives back the bytes the probe read before the rest of the conn.
type prefixed struct {
	net.Conn
	head []byte
}

func (p *prefixed) Read(b []byte) (int, error) {
	if len(p.head) > 0 {
		n := copy(b, p.head)
		p.head = p.head[n:]
		return n, nil
	}
	return p.Conn.Read(b)
}

func (f *tunnelFixture) refusals(t *testing.T) {
	now := time.Now()
	sleepID := identity.Identity{TrustDomain: "cluster.local", Namespace: "app", ServiceAccount: "sleep"}
	good, _ := f.ca.Certificate(t.Context(), sleepID)
	for _, tc := range []struct {
		name, reason string
		cert         *identity.Certificate
	}{
		{"no client certificate", reasonNoCertificate, nil},
		{"foreign trust domain", reasonTrustDomain, f.ca.issue(t, "spiffe://evil.example/ns/app/sa/sleep", now.Add(-time.Minute), now.Add(time.Hour))},
		{"expired", reasonUntrusted, f.ca.issue(t, sleepID.String(), now.Add(-2*time.Hour), now.Add(-time.Hour))},
		{"another root", reasonUntrusted, newTestCA(t, "other").issue(t, sleepID.String(), now.Add(-time.Minute), now.Add(time.Hour))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := counter(t, f.proxy, "inbound", tc.reason)
			if _, err := f.h2To(t, tc.cert); err == nil {
				t.Fatal("handshake accepted")
			}
			waitFor(t, func() bool { return counter(t, f.proxy, "inbound", tc.reason) == before+1 })
		})
	}

	cc, err := f.h2To(t, good)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	do := func(method, authority string) int {
		req, _ := http.NewRequest(method, "https://"+authority+"/", nil)
		if method == http.MethodConnect {
			req = &http.Request{Method: method, URL: req.URL, Host: authority, Header: http.Header{}}
		}
		resp, err := cc.RoundTrip(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, authority, err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	echoAt := func(port uint16) string { return netip.AddrPortFrom(f.echo.IPv4, port).String() }
	for _, tc := range []struct {
		name, method, authority string
		status                  int
		reason                  string
	}{
		{"not a CONNECT", http.MethodGet, echoAt(9090), 400, reasonNotConnect},
		{"CONNECT to another pod", http.MethodConnect, netip.AddrPortFrom(f.near.IPv4, 9090).String(), 400, reasonNotThisPod},
		{"CONNECT to the proxy's own port", http.MethodConnect, echoAt(15001), 400, reasonProxyPort},
		{"nothing listens", http.MethodConnect, echoAt(9999), 503, reasonUpstream},
		{"allowed", http.MethodConnect, echoAt(9090), 200, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := 0.0
			if tc.reason != "" {
				before = counter(t, f.proxy, "inbound", tc.reason)
			}
			if got := do(tc.method, tc.authority); got != tc.status {
				t.Fatalf("status %d, want %d", got, tc.status)
			}
			if tc.reason != "" && counter(t, f.proxy, "inbound", tc.reason) != before+1 {
				t.Fatalf("refusal %s not counted", tc.reason)
			}
		})
	}

	t.Run("authorization policy denies: 401", func(t *testing.T) {
		deny := state.Policy{Authorization: &securityapi.Authorization{Name: "deny-sleep", Namespace: "app",
			Scope: securityapi.Scope_NAMESPACE, Action: securityapi.Action_DENY,
			Groups: []*securityapi.Group{{Rules: []*securityapi.Rules{{Matches: []*securityapi.Match{{
				Principals: []*securityapi.StringMatch{{MatchType: &securityapi.StringMatch_Exact{Exact: "cluster.local/ns/app/sa/sleep"}}},
			}}}}}}}}
		f.dir.Apply(state.Update{Policies: []state.Policy{deny}})
		defer f.dir.Apply(state.Update{RemovedPolicies: []string{"app/deny-sleep"}})
		before := counter(t, f.proxy, "inbound", reasonDenied)
		if got := do(http.MethodConnect, echoAt(9090)); got != 401 {
			t.Fatalf("status %d, want 401", got)
		}
		if counter(t, f.proxy, "inbound", reasonDenied) != before+1 {
			t.Fatal("denial not counted")
		}
		// Through the kernel path and the proxy, the application's connect
		// is refused: the outbound side resets it.
		var res podnet.ClientResult
		f.run(t, &res, "tcp", "-addr", echoAt(9090), "-n", "2")
		if res.Names["echo:9090"] != 0 {
			t.Fatalf("denied connection got through: %+v", res)
		}
	})

	t.Run("outbound refuses a server with the wrong identity", func(t *testing.T) {
		want := identity.Identity{TrustDomain: "cluster.local", Namespace: "app", ServiceAccount: "not-echo"}
		err := f.sleep.NS.Do(func() error {
			raw, err := net.DialTimeout("tcp", netip.AddrPortFrom(f.echo.IPv4, 15008).String(), 3*time.Second)
			if err != nil {
				return err
			}
			defer raw.Close()
			return tls.Client(raw, clientTLS(good, f.ca.Roots, want)).HandshakeContext(t.Context())
		})
		if err == nil || !strings.Contains(err.Error(), "expected "+want.String()) {
			t.Fatalf("handshake with the wrong SAN: %v", err)
		}
	})
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatal("condition not reached in 3s")
}

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

// serveRemoteAddr answers every connection with the address it came from.
func serveRemoteAddr(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		fmt.Fprintf(c, "from %s\n", addrPortOf(c.RemoteAddr()).Addr())
		c.Close()
	}
}
