package tunnel

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/kerneltest"
	"kmesh.dev/kmesh/integration/podnet"
)

// blackholeNetns is a namespace in which 192.0.2.0/24 (TEST-NET-1) is routed
// over a veth pair whose far end is in the same namespace, and 192.0.2.2
// has a permanent neighbour entry with a MAC nobody owns: SYNs sent there
// are dropped as another host's frames, so a connect waits out its timeout
// (no ARP failure, no ICMP). The namespace has no other link, so nothing
// leaves it.
func blackholeNetns(t *testing.T) (*podnet.Netns, netip.Addr) {
	t.Helper()
	kerneltest.RequireRoot(t)
	ns, err := podnet.NewNetns("dial-" + podnet.RandomSuffix())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	void := netip.MustParseAddr("192.0.2.2")
	err = ns.Do(func() error {
		h, err := netlink.NewHandle()
		if err != nil {
			return err
		}
		defer h.Close()
		v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "void0"}, PeerName: "void1"}
		if err := h.LinkAdd(v); err != nil {
			return err
		}
		for _, name := range []string{"void0", "void1"} {
			l, err := h.LinkByName(name)
			if err != nil {
				return err
			}
			if err := h.LinkSetUp(l); err != nil {
				return err
			}
			if name != "void0" {
				continue
			}
			a, _ := netlink.ParseAddr("192.0.2.1/24")
			if err := h.AddrAdd(l, a); err != nil {
				return err
			}
			mac, _ := net.ParseMAC("02:00:00:00:00:02")
			if err := h.NeighAdd(&netlink.Neigh{LinkIndex: l.Attrs().Index, Family: unix.AF_INET,
				State: netlink.NUD_PERMANENT, IP: void.AsSlice(), HardwareAddr: mac}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return ns, void
}

// osThreads is the process's OS thread count (/proc/self/status Threads).
func osThreads(t testing.TB) int {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if v, ok := bytes.CutPrefix(sc.Bytes(), []byte("Threads:")); ok {
			n, err := strconv.Atoi(string(bytes.TrimSpace(v)))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no Threads line in /proc/self/status")
	return 0
}

// TestPrivilegedDialInPod: a dial from a pod's namespace is made there, keeps
// the proxy mark and the options net.Dialer sets, and reports the right
// addresses; refusals and cancellations come back as such.
func TestPrivilegedDialInPod(t *testing.T) {
	ns, void := blackholeNetns(t)
	var l net.Listener
	if err := ns.Do(func() (err error) { l, err = net.Listen("tcp", "127.0.0.1:0"); return err }); err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			_, _ = c.Write([]byte("hi"))
			c.Close()
		}
	}()
	pn := podNetns{fd: ns.Fd()}
	dst := l.Addr().(*net.TCPAddr).AddrPort()

	c, err := pn.dial(context.Background(), dst, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := addrPortOf(c.RemoteAddr()); got != dst {
		t.Errorf("RemoteAddr = %v, want %v", got, dst)
	}
	if got := addrPortOf(c.LocalAddr()); got.Addr() != dst.Addr() || got.Port() == 0 {
		t.Errorf("LocalAddr = %v", got)
	}
	b := make([]byte, 2)
	if _, err := c.Read(b); err != nil || string(b) != "hi" {
		t.Fatalf("read %q, %v", b, err)
	}
	rc, _ := c.SyscallConn()
	_ = rc.Control(func(fd uintptr) {
		for _, o := range []struct {
			level, opt, want int
			name             string
		}{
			{unix.SOL_SOCKET, unix.SO_MARK, bpf.ProxyMark, "SO_MARK"},
			{unix.IPPROTO_TCP, unix.TCP_NODELAY, 1, "TCP_NODELAY"},
			{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1, "SO_KEEPALIVE"},
		} {
			if v, err := unix.GetsockoptInt(int(fd), o.level, o.opt); err != nil || v != o.want {
				t.Errorf("%s = %d, %v; want %d", o.name, v, err, o.want)
			}
		}
		// The socket lives in the pod's namespace, not the test's.
		v, err := unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		want, _ := ns.Cookie()
		if err != nil || v != want {
			t.Errorf("socket's netns cookie %d (%v), want the pod's %d", v, err, want)
		}
	})

	// Nothing listens on port 1 there: refused at once, as ECONNREFUSED.
	if _, err := pn.dial(context.Background(), netip.AddrPortFrom(dst.Addr(), 1), time.Second); !errors.Is(err, unix.ECONNREFUSED) {
		t.Errorf("dial to a closed port: %v, want ECONNREFUSED", err)
	}
	// A dial cancelled by its context ends when the context does.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = pn.dial(ctx, netip.AddrPortFrom(void, 80), 10*time.Second)
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 2*time.Second {
		t.Errorf("dial under a 100ms context: %v after %v", err, time.Since(start))
	}
	ctx2, cancel2 := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel2)
	start = time.Now()
	if _, err = pn.dial(ctx2, netip.AddrPortFrom(void, 80), 10*time.Second); !errors.Is(err, context.Canceled) || time.Since(start) > 2*time.Second {
		t.Errorf("dial cancelled after 100ms: %v after %v", err, time.Since(start))
	}
}

// TestPrivilegedDialsDoNotPinThreads: 10,000 concurrent dials to a
// black-holed address each wait out the configured timeout in the runtime's
// poller, not on an OS thread locked into the namespace: the process's
// thread count stays bounded (a dial that connected on its locked thread
// would take one thread each, and Go aborts the process at 10,000).
func TestPrivilegedDialsDoNotPinThreads(t *testing.T) {
	ns, void := blackholeNetns(t)
	pn := podNetns{fd: ns.Fd()}
	const (
		dials   = 10000
		timeout = 2 * time.Second
		// Threads beyond the starting count: Go's own (GC workers, sysmon,
		// threads parked in syscalls such as setns) — a few dozen at most.
		bound = 64
	)
	base := osThreads(t)
	var maxThreads atomic.Int64
	done := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tk := time.NewTicker(10 * time.Millisecond)
		defer tk.Stop()
		for {
			if n := int64(osThreads(t)); n > maxThreads.Load() {
				maxThreads.Store(n)
			}
			select {
			case <-done:
				return
			case <-tk.C:
			}
		}
	}()

	var wg sync.WaitGroup
	var timedOut, other atomic.Int64
	var early, late atomic.Int64
	var firstErr atomic.Value
	start := time.Now()
	for i := range dials {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t0 := time.Now()
			c, err := pn.dial(context.Background(), netip.AddrPortFrom(void, uint16(1000+i%5000)), timeout)
			el := time.Since(t0)
			if err == nil {
				c.Close()
				other.Add(1)
				return
			}
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				other.Add(1)
				firstErr.CompareAndSwap(nil, err)
				return
			}
			timedOut.Add(1)
			if el < timeout {
				early.Add(1)
			}
			if el > timeout+5*time.Second {
				late.Add(1)
			}
		}()
	}
	wg.Wait()
	close(done)
	<-sampled
	wall := time.Since(start)
	t.Logf("%d dials in %v: %d timed out, %d otherwise; OS threads %d at start, %d at most",
		dials, wall.Round(time.Millisecond), timedOut.Load(), other.Load(), base, maxThreads.Load())
	if other.Load() != 0 {
		t.Errorf("%d dials did not time out (first error: %v)", other.Load(), firstErr.Load())
	}
	if early.Load() != 0 || late.Load() != 0 {
		t.Errorf("dials ended before the %v timeout: %d; more than 5 s after it: %d", timeout, early.Load(), late.Load())
	}
	if m := int(maxThreads.Load()); m > base+bound {
		t.Errorf("OS threads rose from %d to %d during the dials (bound %d more)", base, m, bound)
	}
}
