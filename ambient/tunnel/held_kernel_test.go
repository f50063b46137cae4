package tunnel

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	securityapi "istio.io/istio/pkg/workloadapi/security"

	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/ambient/holder"
	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/integration/podnet"
)

func startTestHolder(t *testing.T) (*holder.Server, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "holder.sock")
	l, err := holder.Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	s := &holder.Server{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Serve(ctx, l) }()
	t.Cleanup(func() { cancel(); <-done; s.Close() })
	return s, path
}

// TestPrivilegedHeldListenersOutliveProxy: the proxy's in-pod listeners are
// given to a listener holder. The proxy then goes away as a crashing daemon
// does (its listening descriptors close); connections made meanwhile —
// outbound through the kernel's redirect to 15001, inbound plaintext steered
// by the kernel to 15006 — wait in the held accept queues instead of being
// refused, and are served once a new proxy takes the held listeners. Without
// the holder the same connection is refused.
func TestPrivilegedHeldListenersOutliveProxy(t *testing.T) {
	srv, sock := startTestHolder(t)
	k1 := holder.Open(context.Background(), sock, nil)
	f := newTunnelFixture(t, func(c *Config) { c.Listeners = k1 })
	var res podnet.ClientResult
	f.run(t, &res, "tcp", "-addr", "10.96.0.10:80", "-n", "3")
	if res.Names["echo:9090"] != 3 {
		t.Fatalf("through the tunnel before the crash: %+v", res)
	}
	// sleep, echo, near: 15001 (v4 and v6), 15006, 15008 each.
	if n := srv.Len(); n != 12 {
		t.Fatalf("holder holds %d sockets, want 12", n)
	}
	// near has policies (an ALLOW of the outsider): plaintext to it is
	// steered by the kernel (kmesh_inproxy) to its 15006.
	w := f.dir.Workload("near")
	if err := f.dp.SetWorkload(dataplane.Workload{UID: "near", Addrs: w.Addresses, Capacity: 1, Healthy: true, HBONE: true,
		Policies: true, Topology: dataplane.Topology{Node: "n1"}}); err != nil {
		t.Fatal(err)
	}
	f.dir.Apply(state.Update{Policies: []state.Policy{{Authorization: &securityapi.Authorization{Name: "allow-outsider", Namespace: "app",
		Scope: securityapi.Scope_NAMESPACE, Action: securityapi.Action_ALLOW, Groups: []*securityapi.Group{
			{Rules: []*securityapi.Rules{{Matches: []*securityapi.Match{{SourceIps: []*securityapi.Address{{Address: f.outsider.IPv4.AsSlice(), Length: 32}}}}}}},
			// and every mesh identity (sleep's HBONE to echo)
			{Rules: []*securityapi.Rules{{Matches: []*securityapi.Match{{Principals: []*securityapi.StringMatch{{MatchType: &securityapi.StringMatch_Presence{}}}}}}}},
		}}}}})
	near := netip.AddrPortFrom(f.near.IPv4, 9090).String()
	if err := f.outsider.Helper(f.env.Cgroup, &res, "tcp", "-addr", near, "-n", "2"); err != nil || res.Names["near:9090"] != 2 {
		t.Fatalf("plaintext through 15006 before the crash: %+v %v", res, err)
	}

	// A connection through the tunnel, open when the daemon dies.
	ready := filepath.Join(t.TempDir(), "ready")
	held := make(chan podnet.StreamResult, 1)
	go func() {
		var r podnet.StreamResult
		if err := f.sleep.Helper(f.env.Cgroup, &r, "stream", "-addr", netip.AddrPortFrom(f.echo.IPv4, 7000).String(),
			"-duration", "30s", "-interval", "20ms", "-ready", ready); err != nil {
			r.Error = err.Error()
		}
		held <- r
	}()
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(ready); err == nil {
			break
		}
		if time.Now().After(end) {
			t.Fatal("the held connection made no exchange")
		}
	}

	// The crash: the daemon's descriptors close as the kernel closes a
	// dead process's (no graceful code runs first); the holder's stay.
	crashed := time.Now()
	f.proxy.mu.Lock()
	for c := range f.proxy.active {
		c.Close()
	}
	f.proxy.mu.Unlock()
	k1.Close(false)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	f.proxy.Close(ctx, 0)
	cancel()

	select {
	case r := <-held:
		if !strings.Contains(r.Error, "ECONNRESET") {
			t.Errorf("the connection the tunnel carried at the crash ended with %q, want a reset", r.Error)
		}
		t.Logf("held connection ended %v after the crash: %s", time.Since(crashed).Round(time.Millisecond), r.Error)
	case <-time.After(2 * time.Second):
		t.Error("the connection the tunnel carried at the crash hangs")
	}

	type outcome struct {
		what string
		res  podnet.ClientResult
		err  error
	}
	results := make(chan outcome, 3)
	start := time.Now()
	go func() {
		var r podnet.ClientResult
		err := f.sleep.Helper(f.env.Cgroup, &r, "tcp", "-addr", "10.96.0.10:80", "-n", "1", "-timeout", "10s")
		results <- outcome{"outbound (15001)", r, err}
	}()
	go func() {
		var r podnet.ClientResult
		err := f.sleep.Helper(f.env.Cgroup, &r, "tcp", "-addr", netip.AddrPortFrom(f.echo.IPv6, 9090).String(), "-network", "tcp6", "-n", "1", "-timeout", "10s")
		results <- outcome{"outbound IPv6 (15001 on ::1)", r, err}
	}()
	go func() {
		var r podnet.ClientResult
		err := f.outsider.Helper(f.env.Cgroup, &r, "tcp", "-addr", near, "-n", "1", "-timeout", "10s")
		results <- outcome{"inbound plaintext (15006)", r, err}
	}()
	// No daemon for 500 ms: nothing may fail meanwhile.
	select {
	case o := <-results:
		t.Fatalf("%s ended while no proxy ran (after %v): %+v %v", o.what, time.Since(start), o.res, o.err)
	case <-time.After(500 * time.Millisecond):
	}

	// The next daemon.
	k2 := holder.Open(context.Background(), sock, nil)
	t.Cleanup(func() { k2.Close(false) })
	p2, err := New(f.proxyConfig(func(c *Config) { c.Listeners = k2 }))
	if err != nil {
		t.Fatal(err)
	}
	f.proxy = p2 // the fixture's cleanup closes it
	f.addPods(t, p2)
	for range 3 {
		o := <-results
		if o.err != nil || o.res.Errors.Total() != 0 || o.res.Names.Total() != 1 {
			t.Errorf("%s made during the gap: %+v %v\n%s", o.what, o.res, o.err, f.logsMatching("WARN", "ERROR", "refused", "failed"))
		}
	}
	if got := testutil.ToFloat64(p2.m.listeners.WithLabelValues("reused")); got != 12 {
		t.Errorf("the new proxy reused %v listeners, want 12", got)
	}
	if got := testutil.ToFloat64(p2.m.listeners.WithLabelValues("opened")); got != 0 {
		t.Errorf("the new proxy opened %v listeners, want 0 (all held)", got)
	}
	if n := k2.ReleaseInherited(); n != 0 {
		t.Errorf("%d held sockets unclaimed", n)
	}

	t.Run("a pod that leaves: its listeners are dropped from the holder", func(t *testing.T) {
		p2.RemovePod("near")
		for end := time.Now().Add(2 * time.Second); srv.Len() != 8 && time.Now().Before(end); {
			time.Sleep(10 * time.Millisecond)
		}
		if n := srv.Len(); n != 8 {
			t.Fatalf("holder holds %d sockets after near left, want 8", n)
		}
	})

	t.Run("control: without the holder the same gap refuses", func(t *testing.T) {
		// A stop on purpose releases the holder's copies; then nothing
		// keeps the listeners.
		k2.Close(true)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		p2.Close(ctx, 0)
		cancel()
		var r podnet.ClientResult
		f.run(t, &r, "tcp", "-addr", "10.96.0.10:80", "-n", "1", "-timeout", "2s")
		if r.Errors["ECONNREFUSED"] != 1 {
			t.Fatalf("with no listener held, want ECONNREFUSED: %+v", r)
		}
		if n := srv.Len(); n != 0 {
			t.Fatalf("holder holds %d sockets after a stop on purpose, want 0", n)
		}
	})
}
