package bpf_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/kerneltest"
	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/kernel"
)

// The splice tests run both ends of each connection in one helper process
// inside the test's cgroup (sockops sees only sockets of processes there):
// the client in its own pod's namespace, the server in the namespace passed
// as fd 3 (or the same one, for in-pod legs).

func init() {
	podnet.RegisterHelper("splice-pair", splicePair)
	podnet.RegisterHelper("echo-server", echoServer)
}

// echoServer echoes every connection on args[0] with read/write calls.
func echoServer(args []string) (any, error) {
	l, err := net.Listen("tcp", args[0])
	if err != nil {
		return nil, err
	}
	for {
		c, err := l.Accept()
		if err != nil {
			return nil, err
		}
		go func() {
			defer c.Close()
			_ = echo(c.(*net.TCPConn))
		}()
	}
}

// pair is one connection with both ends in this process.
type pair struct {
	c, s *net.TCPConn
	l    net.Listener
}

func (p *pair) close() {
	p.c.Close()
	p.s.Close()
	p.l.Close()
}

// dialPair listens on laddr inside the namespace serverNS (-1: our own) and
// connects to it from our namespace.
func dialPair(serverNS int, laddr string) (*pair, error) {
	var l net.Listener
	listen := func() (err error) { l, err = net.Listen("tcp", laddr); return err }
	var err error
	if serverNS >= 0 {
		err = kernel.InNetns(serverNS, listen)
	} else {
		err = listen()
	}
	if err != nil {
		return nil, err
	}
	c, err := net.DialTimeout("tcp", l.Addr().String(), 3*time.Second)
	if err != nil {
		l.Close()
		return nil, err
	}
	s, err := l.Accept()
	if err != nil {
		l.Close()
		c.Close()
		return nil, err
	}
	return &pair{c: c.(*net.TCPConn), s: s.(*net.TCPConn), l: l}, nil
}

// readAll reads to EOF with plain read(2) calls (not splice), hashing.
func readAll(c net.Conn, deadline time.Duration) ([]byte, int64, error) {
	_ = c.SetReadDeadline(time.Now().Add(deadline))
	h := sha256.New()
	buf := make([]byte, 64<<10)
	var n int64
	for {
		k, err := c.Read(buf)
		h.Write(buf[:k])
		n += int64(k)
		if errors.Is(err, io.EOF) {
			return h.Sum(nil), n, nil
		}
		if err != nil {
			return h.Sum(nil), n, err
		}
	}
}

// writeRandom writes total bytes from seed in chunks of random size up to
// maxChunk, and returns their hash.
func writeRandom(c io.Writer, seed uint64, total, maxChunk int) ([]byte, error) {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b9))
	h := sha256.New()
	buf := make([]byte, maxChunk)
	for sent := 0; sent < total; {
		k := 1 + r.IntN(maxChunk)
		if k > total-sent {
			k = total - sent
		}
		for i := range buf[:k] {
			buf[i] = byte(r.Uint32())
		}
		if _, err := c.Write(buf[:k]); err != nil {
			return nil, fmt.Errorf("write after %d bytes: %w", sent, err)
		}
		h.Write(buf[:k])
		sent += k
	}
	return h.Sum(nil), nil
}

// spliceWrite sends total random bytes from seed through a pipe with
// splice(2) into c, and returns their hash.
func spliceWrite(c *net.TCPConn, seed uint64, total int) ([]byte, error) {
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer pr.Close()
	sum := make(chan []byte, 1)
	go func() {
		defer pw.Close()
		s, _ := writeRandom(pw, seed, total, 64<<10)
		sum <- s
	}()
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	for sent := 0; sent < total; {
		var n int64
		var serr error
		werr := raw.Write(func(fd uintptr) bool {
			n, serr = unix.Splice(int(pr.Fd()), nil, int(fd), nil, 64<<10, unix.SPLICE_F_MOVE)
			return serr != unix.EAGAIN
		})
		if werr != nil || serr != nil {
			return nil, fmt.Errorf("splice after %d bytes: %v %v", sent, werr, serr)
		}
		if n == 0 {
			return nil, fmt.Errorf("pipe ended after %d bytes", sent)
		}
		sent += int(n)
	}
	return <-sum, nil
}

// echo copies s back to itself with read/write calls until EOF, then
// half-closes.
func echo(s *net.TCPConn) error {
	buf := make([]byte, 128<<10)
	for {
		n, err := s.Read(buf)
		if n > 0 {
			if _, werr := s.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if errors.Is(err, io.EOF) {
			return s.CloseWrite()
		}
		if err != nil {
			return err
		}
	}
}

// splicePair runs args[0] (a scenario) over connections to args[1] (an
// address in the server namespace, fd 3, or "local:" + an address in our
// own). It fails (an error) unless every byte arrived in order.
func splicePair(args []string) (any, error) {
	serverNS, laddr := 3, args[1]
	if a, ok := strings.CutPrefix(laddr, "local:"); ok {
		serverNS, laddr = -1, a
	}
	mk := func() (*pair, error) { return dialPair(serverNS, laddr) }
	switch args[0] {
	case "echo": // 64 MiB echoed, random write sizes, SHA-256 both ways
		p, err := mk()
		if err != nil {
			return nil, err
		}
		defer p.close()
		errc := make(chan error, 1)
		go func() { errc <- echo(p.s) }()
		type res struct {
			sum []byte
			n   int64
			err error
		}
		got := make(chan res, 1)
		go func() { s, n, err := readAll(p.c, 60*time.Second); got <- res{s, n, err} }()
		want, err := writeRandom(p.c, 1, 64<<20, 256<<10)
		if err != nil {
			return nil, err
		}
		if err := p.c.CloseWrite(); err != nil {
			return nil, err
		}
		r := <-got
		if r.err != nil || !bytes.Equal(r.sum, want) || r.n != 64<<20 {
			return nil, fmt.Errorf("echo: read %d bytes (%v), hash equal %v", r.n, r.err, bytes.Equal(r.sum, want))
		}
		return "ok", <-errc
	case "client-echo": // 64 MiB through a remote echo server at args[1]
		var c net.Conn
		var err error
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			if c, err = net.DialTimeout("tcp", laddr, 3*time.Second); err == nil || time.Now().After(deadline) {
				break
			}
		}
		if err != nil {
			return nil, err
		}
		defer c.Close()
		type res struct {
			sum []byte
			n   int64
			err error
		}
		got := make(chan res, 1)
		go func() { s, n, err := readAll(c, 60*time.Second); got <- res{s, n, err} }()
		want, err := writeRandom(c, 9, 64<<20, 256<<10)
		if err != nil {
			return nil, err
		}
		_ = c.(*net.TCPConn).CloseWrite()
		r := <-got
		if r.err != nil || r.n != 64<<20 || !bytes.Equal(r.sum, want) {
			return nil, fmt.Errorf("client-echo: read %d bytes (%v)", r.n, r.err)
		}
		return "ok", nil
	case "small": // 20,000 writes of 1..64 bytes with TCP_NODELAY
		p, err := mk()
		if err != nil {
			return nil, err
		}
		defer p.close()
		if err := p.c.SetNoDelay(true); err != nil {
			return nil, err
		}
		type res struct {
			sum []byte
			n   int64
			err error
		}
		got := make(chan res, 1)
		go func() { s, n, err := readAll(p.s, 60*time.Second); got <- res{s, n, err} }()
		r := rand.New(rand.NewPCG(2, 2))
		h := sha256.New()
		total := 0
		for range 20000 {
			b := make([]byte, 1+r.IntN(64))
			for i := range b {
				b[i] = byte(r.Uint32())
			}
			if _, err := p.c.Write(b); err != nil {
				return nil, err
			}
			h.Write(b)
			total += len(b)
		}
		_ = p.c.CloseWrite()
		g := <-got
		if g.err != nil || g.n != int64(total) || !bytes.Equal(g.sum, h.Sum(nil)) {
			return nil, fmt.Errorf("small writes: %d of %d bytes (%v)", g.n, total, g.err)
		}
		return "ok", nil
	case "halfclose": // each side half-closes in turn; the other reads all, then EOF, then answers
		for _, first := range []string{"client", "server"} {
			p, err := mk()
			if err != nil {
				return nil, err
			}
			a, b := p.c, p.s
			if first == "server" {
				a, b = p.s, p.c
			}
			type res struct {
				sum []byte
				n   int64
				err error
			}
			got := make(chan res, 1)
			go func() { s, n, err := readAll(b, 20*time.Second); got <- res{s, n, err} }()
			want, err := writeRandom(a, 3, 3<<20, 100<<10)
			if err != nil {
				return nil, err
			}
			if err := a.CloseWrite(); err != nil {
				return nil, err
			}
			r := <-got
			sum, n, err := r.sum, r.n, r.err
			if err != nil || n != 3<<20 || !bytes.Equal(sum, want) {
				return nil, fmt.Errorf("%s half-closed: peer read %d bytes (%v)", first, n, err)
			}
			// The half-closed side still reads what the other sends.
			go func() { s, n, err := readAll(a, 20*time.Second); got <- res{s, n, err} }()
			want, err = writeRandom(b, 4, 1<<20, 64<<10)
			if err != nil {
				return nil, fmt.Errorf("%s half-closed: the other side cannot send: %w", first, err)
			}
			_ = b.CloseWrite()
			r = <-got
			sum, n, err = r.sum, r.n, r.err
			if err != nil || n != 1<<20 || !bytes.Equal(sum, want) {
				return nil, fmt.Errorf("%s half-closed: answer read %d bytes (%v)", first, n, err)
			}
			p.close()
		}
		return "ok", nil
	case "rst": // an abortive close reaches the peer as ECONNRESET, either way
		for _, first := range []string{"client", "server"} {
			p, err := mk()
			if err != nil {
				return nil, err
			}
			a, b := p.c, p.s
			if first == "server" {
				a, b = p.s, p.c
			}
			if _, err := a.Write([]byte("hello")); err != nil {
				return nil, err
			}
			buf := make([]byte, 5)
			_ = b.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(b, buf); err != nil || string(buf) != "hello" {
				return nil, fmt.Errorf("before reset: %q %v", buf, err)
			}
			_ = a.SetLinger(0)
			a.Close()
			_, err = b.Read(buf)
			if !errors.Is(err, syscall.ECONNRESET) {
				return nil, fmt.Errorf("%s reset: peer read %v, want ECONNRESET", first, err)
			}
			p.close()
		}
		return "ok", nil
	case "sendfile": // the client sends a file with sendfile(2)
		f, err := os.CreateTemp("", "splice-sendfile")
		if err != nil {
			return nil, err
		}
		defer os.Remove(f.Name())
		defer f.Close()
		want, err := writeRandom(f, 5, 8<<20, 1<<20)
		if err != nil {
			return nil, err
		}
		if _, err := f.Seek(0, 0); err != nil {
			return nil, err
		}
		p, err := mk()
		if err != nil {
			return nil, err
		}
		defer p.close()
		type res struct {
			sum []byte
			n   int64
			err error
		}
		got := make(chan res, 1)
		go func() { s, n, err := readAll(p.s, 30*time.Second); got <- res{s, n, err} }()
		// *TCPConn.ReadFrom(*os.File) is sendfile(2).
		if n, err := p.c.ReadFrom(f); err != nil || n != 8<<20 {
			return nil, fmt.Errorf("sendfile: %d bytes, %v", n, err)
		}
		_ = p.c.CloseWrite()
		g := <-got
		if g.err != nil || g.n != 8<<20 || !bytes.Equal(g.sum, want) {
			return nil, fmt.Errorf("sendfile: peer read %d bytes (%v)", g.n, g.err)
		}
		return "ok", nil
	case "splice-read", "splice-send":
		// splice-read: a relay reads the connection with splice(2) into
		// another (*TCPConn.ReadFrom(*TCPConn): socket -> pipe -> socket).
		// splice-send: the sender writes with splice(2) from a pipe.
		in, err := mk()
		if err != nil {
			return nil, err
		}
		defer in.close()
		type res struct {
			sum []byte
			n   int64
			err error
		}
		got := make(chan res, 1)
		relay := make(chan error, 1)
		if args[0] == "splice-read" {
			out, err := mk()
			if err != nil {
				return nil, err
			}
			defer out.close()
			go func() { s, n, err := readAll(out.s, 30*time.Second); got <- res{s, n, err} }()
			go func() {
				_, err := out.c.ReadFrom(in.s)
				if err == nil {
					err = out.c.CloseWrite()
				}
				relay <- err
			}()
		} else {
			go func() { s, n, err := readAll(in.s, 30*time.Second); got <- res{s, n, err} }()
			relay <- nil
		}
		var want []byte
		if args[0] == "splice-read" {
			want, err = writeRandom(in.c, 6, 16<<20, 256<<10)
		} else {
			want, err = spliceWrite(in.c, 6, 16<<20)
		}
		if err != nil {
			return nil, err
		}
		_ = in.c.CloseWrite()
		if err := <-relay; err != nil {
			return nil, fmt.Errorf("splice relay: %w", err)
		}
		g := <-got
		if g.err != nil || g.n != 16<<20 || !bytes.Equal(g.sum, want) {
			return nil, fmt.Errorf("%s: peer read %d bytes (%v)", args[0], g.n, g.err)
		}
		return "ok", nil
	case "unread": // how much a writer can queue at a peer that never reads: "accepted <bytes>"
		p, err := mk()
		if err != nil {
			return nil, err
		}
		defer p.close()
		// 1 MiB writes for up to 2 s or 96 MiB; TCP stops accepting at
		// the peer's receive buffer plus our send buffer (a few MiB).
		_ = p.c.SetWriteDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 1<<20)
		accepted := 0
		for accepted < 96<<20 {
			n, err := p.c.Write(buf)
			accepted += n
			if err != nil {
				break
			}
		}
		return fmt.Sprintf("accepted %d", accepted), nil
	case "peek": // MSG_PEEK shows the bytes and leaves them
		p, err := mk()
		if err != nil {
			return nil, err
		}
		defer p.close()
		if _, err := p.c.Write([]byte("peekaboo")); err != nil {
			return nil, err
		}
		raw, err := p.s.SyscallConn()
		if err != nil {
			return nil, err
		}
		buf := make([]byte, 8)
		var n int
		var rerr error
		deadline := time.Now().Add(5 * time.Second)
		for n < 8 && time.Now().Before(deadline) {
			_ = raw.Control(func(fd uintptr) { n, _, rerr = unix.Recvfrom(int(fd), buf, unix.MSG_PEEK|unix.MSG_DONTWAIT) })
			if n < 8 {
				time.Sleep(time.Millisecond)
			}
		}
		if n != 8 || string(buf) != "peekaboo" {
			return nil, fmt.Errorf("peek: %q (%d, %v)", buf[:max(n, 0)], n, rerr)
		}
		clear(buf)
		_ = p.s.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(p.s, buf); err != nil || string(buf) != "peekaboo" {
			return nil, fmt.Errorf("read after peek: %q %v", buf, err)
		}
		return "ok", nil
	case "hold": // one connection; echo a round, wait for args[2] to exist, echo again
		p, err := mk()
		if err != nil {
			return nil, err
		}
		defer p.close()
		go func() { _ = echo(p.s) }()
		round := func(seed uint64) error {
			want, err := writeRandom(p.c, seed, 1<<20, 64<<10)
			if err != nil {
				return err
			}
			got := sha256.New()
			_ = p.c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.CopyN(got, p.c, 1<<20); err != nil {
				return err
			}
			if !bytes.Equal(got.Sum(nil), want) {
				return errors.New("echo differs")
			}
			return nil
		}
		if err := round(7); err != nil {
			return nil, fmt.Errorf("before restart: %w", err)
		}
		if err := os.WriteFile(args[2]+".ready", nil, 0o600); err != nil {
			return nil, err
		}
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			if _, err := os.Stat(args[2]); err == nil {
				break
			}
			if time.Now().After(deadline) {
				return nil, errors.New("never told to go on")
			}
		}
		if err := round(8); err != nil {
			return nil, fmt.Errorf("after restart: %w", err)
		}
		return "ok", nil
	}
	return nil, fmt.Errorf("unknown scenario %q", args[0])
}

// spliceFixture: two enrolled pods on one node, both mesh workloads on it.
type spliceFixture struct {
	env            *kerneltest.Env
	client, server *podnet.Pod
	clientCookie   uint64
}

func newSpliceFixture(t *testing.T, cfg bpf.Config) *spliceFixture {
	t.Helper()
	env := kerneltest.New(t, cfg)
	node, err := podnet.NewNode("n1", netip.MustParsePrefix("10.244.1.0/24"), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { node.Close() })
	f := &spliceFixture{env: env}
	f.client, err = node.AddPod("client", netip.MustParseAddr("10.244.1.2"), netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	f.server, err = node.AddPod("server", netip.MustParseAddr("10.244.1.11"), netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	f.clientCookie, err = f.client.NS.Cookie()
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// enroll makes both pods enrolled mesh workloads on this node.
func (f *spliceFixture) enroll(t *testing.T) {
	t.Helper()
	m := f.env.DP.Maps
	for i, p := range []*podnet.Pod{f.client, f.server} {
		id := uint32(100 + i)
		if err := m.PutBackends([]bpf.Backend{{ID: id, Addr4: p.IPv4, Capacity: 1, PathSvc: bpf.PathDirect,
			PathAddr: bpf.PathDirect, PathUDP: bpf.PathDirect, PathIn: bpf.PathDirect, HBONE: true, Local: true}}); err != nil {
			t.Fatal(err)
		}
		if err := m.UpsertFrontends([]bpf.Frontend{{Key: bpf.FrontendKey{Addr: p.IPv4}, Kind: bpf.FrontendWorkload, ID: id}}); err != nil {
			t.Fatal(err)
		}
		cookie, err := p.NS.Cookie()
		if err != nil {
			t.Fatal(err)
		}
		if err := m.SetManaged(cookie, id); err != nil {
			t.Fatal(err)
		}
	}
}

// run runs a scenario in the client pod against the server pod (or, with
// addr "local:…", inside the client pod).
func (f *spliceFixture) run(t *testing.T, scenario, addr string, extra ...string) error {
	t.Helper()
	_, err := f.runOut(t, scenario, addr, extra...)
	return err
}

// runOut is run that also returns the scenario's result (its JSON output
// decoded; "" when it reports none).
func (f *spliceFixture) runOut(t *testing.T, scenario, addr string, extra ...string) (string, error) {
	t.Helper()
	nsf, err := f.server.NS.File()
	if err != nil {
		t.Fatal(err)
	}
	defer nsf.Close()
	cmd := exec.Command("/proc/self/exe", append([]string{scenario, addr}, extra...)...)
	cmd.Env = append(os.Environ(), podnet.HelperEnv("splice-pair"))
	cmd.ExtraFiles = []*os.File{nsf}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := f.client.Start(cmd, f.env.Cgroup); err != nil {
		t.Fatal(err)
	}
	// A hung scenario is a failure with the helper's stacks, not a hung test.
	timer := time.AfterFunc(25*time.Second, func() { _ = cmd.Process.Signal(syscall.SIGQUIT) })
	defer timer.Stop()
	if err := cmd.Wait(); err != nil {
		return "", fmt.Errorf("%s: %w: %s", scenario, err, strings.TrimSpace(stderr.String()))
	}
	var out string
	if err := json.Unmarshal(stdout.Bytes(), &out); err != nil {
		return "", fmt.Errorf("%s: output %q: %w", scenario, stdout.String(), err)
	}
	return out, nil
}

// unread is how many bytes a writer could queue in 2 s at a peer that
// never reads (the "unread" scenario).
func (f *spliceFixture) unread(t *testing.T) int {
	t.Helper()
	out, err := f.runOut(t, "unread", "10.244.1.11:0")
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if _, err := fmt.Sscanf(out, "accepted %d", &n); err != nil {
		t.Fatalf("%q: %v", out, err)
	}
	return n
}

// spliceBudget is bpf.Config.SpliceBudget's default.
const spliceBudget = 16 << 20

func (f *spliceFixture) stats(t *testing.T) map[string]uint64 {
	t.Helper()
	st, err := f.env.DP.Maps.Stats()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// TestPrivilegedSplice: connections between two enrolled pods on one node
// are spliced (the bytes go through sk_msg, counted) and behave as TCP does
// under every way an application moves bytes; the same scenarios pass
// before enrolment, unspliced, and move no byte through sk_msg.
func TestPrivilegedSplice(t *testing.T) {
	f := newSpliceFixture(t, bpf.Config{Splice: true})
	scenarios := []string{"echo", "small", "halfclose", "rst", "sendfile", "splice-send", "peek"}
	t.Run("unspliced", func(t *testing.T) {
		for _, s := range append(scenarios, "splice-read") {
			if err := f.run(t, s, "10.244.1.11:0"); err != nil {
				t.Error(err)
			}
		}
		if st := f.stats(t); st["splice_bytes"] != 0 || st["splice_insert"] != 0 {
			t.Errorf("pods not enrolled, yet splice counters moved: %v", st)
		}
		// TCP's flow control: a peer that never reads stops the writer.
		n := f.unread(t)
		t.Logf("a writer whose unspliced peer never reads queued %.1f MiB in 2 s", float64(n)/(1<<20))
		if n >= spliceBudget {
			t.Errorf("unspliced writer to a peer that never reads queued %d bytes; TCP should block it at a few MiB", n)
		}
	})
	f.enroll(t)
	for _, s := range scenarios {
		t.Run(s, func(t *testing.T) {
			before := f.stats(t)
			if err := f.run(t, s, "10.244.1.11:0"); err != nil {
				t.Fatal(err)
			}
			after := f.stats(t)
			moved := after["splice_bytes"] - before["splice_bytes"]
			inserted := after["splice_insert"] - before["splice_insert"]
			t.Logf("%s: %d bytes through sk_msg, %d ends inserted, %d first sends without peer", s, moved,
				inserted, after["splice_no_peer"]-before["splice_no_peer"])
			if inserted < 2 {
				t.Errorf("%s: %d connection ends spliced, want both", s, inserted)
			}
			// echo: 64 MiB each way, of which each direction redirects
			// its budget, then TCP (the SHA-256 checks the order
			// across the switch).
			if min := map[string]uint64{"echo": 2*spliceBudget - 1<<20, "small": 100000, "sendfile": 8 << 20, "splice-send": spliceBudget - 1<<20}[s]; moved < min {
				t.Errorf("%s: %d bytes went through sk_msg, want at least %d", s, moved, min)
			}
			if s == "echo" && after["splice_budget"]-before["splice_budget"] != 2 {
				t.Errorf("echo: %d directions went to TCP at their budget, want both", after["splice_budget"]-before["splice_budget"])
			}
		})
	}
	t.Run("splice-read kernel gap", func(t *testing.T) {
		// Linux 6.18: splice(2) reads only the TCP receive queue, not
		// the psock's where redirected bytes wait, so the reader gets the
		// FIN and none of the bytes. This is why splicing is opt-in
		// (Config.Splice) and the node proxy copies with read(2). When a
		// kernel fixes it, this fails: lift the restriction then.
		err := f.run(t, "splice-read", "10.244.1.11:0")
		if err == nil || !strings.Contains(err.Error(), "peer read 0 bytes") {
			t.Errorf("splice(2) read of a spliced socket: %v; this kernel may have fixed the gap", err)
		}
	})
	t.Run("budget bounds a reader that does not read", func(t *testing.T) {
		// The kernel queues redirected bytes without bound ("no
		// backpressure kernel gap" below); the budget sends the
		// direction to TCP, which then blocks the writer.
		n := f.unread(t)
		t.Logf("a writer whose spliced peer never reads queued %.1f MiB in 2 s (budget %d MiB)", float64(n)/(1<<20), spliceBudget>>20)
		if n < spliceBudget-1<<20 || n > 2*spliceBudget {
			t.Errorf("spliced writer to a peer that never reads queued %d bytes, want the budget (%d) plus TCP's few MiB", n, spliceBudget)
		}
	})
	t.Run("in-pod loopback", func(t *testing.T) {
		// The tunnel's app <-> 15001 leg and the proxy's dial to the
		// application behind 15006 are connections inside the pod.
		for _, addr := range []string{"local:127.0.0.1:15001", "local:10.244.1.2:0"} {
			before := f.stats(t)
			if err := f.run(t, "echo", addr); err != nil {
				t.Fatal(err)
			}
			after := f.stats(t)
			if moved := after["splice_bytes"] - before["splice_bytes"]; moved < 2*spliceBudget-1<<20 {
				t.Errorf("%s: only %d bytes through sk_msg", addr, moved)
			}
		}
	})
	ps, err := f.env.DP.Programs()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range ps {
		if p.Name == "sk_msg" {
			t.Logf("sk_msg ran %d times (0 unless kernel.bpf_stats_enabled=1)", p.RunCount)
		}
	}
}

// TestPrivilegedSpliceNoBackpressure pins down the kernel gap the budget
// exists for. Linux 6.18 queues a redirected send at the peer without
// charging it to the peer's receive buffer (the upstream gap
// cilium/cilium#6431 describes): with no budget, a writer whose peer never
// reads never blocks, and the queue grows until the node's TCP memory limit,
// where its writes fail with ENOMEM. When a kernel bounds the queue this
// fails: the budget can then go.
func TestPrivilegedSpliceNoBackpressure(t *testing.T) {
	f := newSpliceFixture(t, bpf.Config{Splice: true, SpliceBudget: 1 << 40})
	f.enroll(t)
	n := f.unread(t)
	t.Logf("a writer whose spliced peer never reads, with no budget, queued %d MiB in 2 s", n>>20)
	if n < 96<<20 {
		t.Errorf("with no budget, only %d bytes queued at a peer that never reads: this kernel may bound the queue now", n)
	}
}

// TestPrivilegedSpliceMapFull: with room for one connection end, the other
// end is refused (counted) and the connection works on plain TCP.
func TestPrivilegedSpliceMapFull(t *testing.T) {
	f := newSpliceFixture(t, bpf.Config{Splice: true, Sizes: bpf.MapSizes{Splice: 1}})
	f.enroll(t)
	for _, s := range []string{"echo", "halfclose"} {
		if err := f.run(t, s, "10.244.1.11:0"); err != nil {
			t.Fatal(err)
		}
	}
	st := f.stats(t)
	if st["splice_full"] == 0 || st["splice_bytes"] != 0 {
		t.Errorf("map full: splice_full %d (want > 0), splice_bytes %d (want 0)", st["splice_full"], st["splice_bytes"])
	}
}

// TestPrivilegedSpliceRestart: a spliced connection keeps flowing while the
// data path is reloaded (a daemon restart: pins reused, links updated).
func TestPrivilegedSpliceRestart(t *testing.T) {
	f := newSpliceFixture(t, bpf.Config{Splice: true})
	f.enroll(t)
	gate := filepath.Join(t.TempDir(), "go")
	done := make(chan error, 1)
	go func() { done <- f.run(t, "hold", "10.244.1.11:0", gate) }()
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(gate + ".ready"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the connection never got through its first round")
		}
	}
	before := f.stats(t)["splice_bytes"]
	// The old daemon goes away (its handles closed), a new one loads.
	if err := f.env.DP.Close(); err != nil {
		t.Fatal(err)
	}
	f.env.DP = f.env.Load(t)
	if !f.env.DP.Reused {
		t.Fatal("the reload did not reuse the pinned maps")
	}
	if err := os.WriteFile(gate, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if moved := f.stats(t)["splice_bytes"] - before; moved < 2<<20 {
		t.Errorf("after the reload only %d bytes went through sk_msg", moved)
	}
}

func TestMain(m *testing.M) {
	podnet.MaybeRunHelper()
	os.Exit(m.Run())
}

// TestPrivilegedSpliceOff: without Config.Splice, enrolled pods' connections
// are not spliced.
func TestPrivilegedSpliceOff(t *testing.T) {
	f := newSpliceFixture(t, bpf.Config{})
	f.enroll(t)
	for _, addr := range []string{"10.244.1.11:0", "local:127.0.0.1:0"} {
		if err := f.run(t, "echo", addr); err != nil {
			t.Fatal(err)
		}
	}
	if st := f.stats(t); st["splice_insert"] != 0 || st["splice_bytes"] != 0 {
		t.Errorf("splicing off, yet counters moved: insert %d bytes %d", st["splice_insert"], st["splice_bytes"])
	}
}

// iptablesIn runs iptables inside a pod's namespace.
func iptablesIn(t *testing.T, p *podnet.Pod, args ...string) {
	t.Helper()
	err := p.NS.Do(func() error {
		out, err := exec.Command("iptables", append([]string{"-w"}, args...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("iptables %v: %w: %s", args, err, out)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// sidecarCapture installs the nat rules Istio's sidecar init installs
// (istio-iptables, default REDIRECT mode: podnet.IstioSidecarRules).
func sidecarCapture(t *testing.T, p *podnet.Pod) {
	t.Helper()
	for _, r := range podnet.IstioSidecarRules() {
		iptablesIn(t, p, r...)
	}
}

// startIn starts a long-running process in a pod and the test's cgroup.
func startIn(t *testing.T, p *podnet.Pod, cg *podnet.Cgroup, cmd *exec.Cmd) {
	t.Helper()
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := p.Start(cmd, cg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("%s in %s: %s", cmd.Path, p.Name, out.String())
		}
	})
}

// TestPrivilegedSidecarSplice: two pods that keep a sidecar (haproxy in
// Envoy's place, uid 1337, captured by Istio's sidecar rules; each sidecar
// finds where to go with SO_ORIGINAL_DST, as Envoy does). Three ways, the
// same bytes arriving intact each time:
//
//   - not opted in: iptables captures every leg, nothing is spliced;
//   - SpliceInPod: only the server sidecar's loopback dial to the
//     application is spliced; the other two legs are rewritten by NAT (the
//     application's socket names the original destination, the sidecar's
//     the loopback listener), so their ends' 4-tuples differ and guessing
//     the pairing could hand bytes to the wrong socket;
//   - SpliceSidecar (the kernel's capture): connect sends the application
//     to its pod address's 15001 and the client sidecar to the server pod's 15006
//     itself, no NAT rewrites a leg, kmesh_getsockopt answers both
//     sidecars' SO_ORIGINAL_DST (else the client sidecar would dial its own
//     listener and the server sidecar 127.0.0.1:15006), and all three legs
//     are spliced. The records go when the connections close.
func TestPrivilegedSidecarSplice(t *testing.T) {
	if _, err := exec.LookPath("haproxy"); err != nil {
		t.Fatalf("haproxy is needed (apt-get install haproxy): %v", err)
	}
	f := newSpliceFixture(t, bpf.Config{})
	dir := t.TempDir()
	cfg := func(name, bind, server string) string {
		path := filepath.Join(dir, name+".cfg")
		c := fmt.Sprintf("global\n    nbthread 1\n    uid 1337\n    gid 1337\ndefaults\n    mode tcp\n    timeout connect 5s\n"+
			"    timeout client 60s\n    timeout server 60s\nfrontend f\n    bind %s\n    default_backend b\nbackend b\n    server s %s\n", bind, server)
		if err := os.WriteFile(path, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}
	_ = os.Chmod(dir, 0o755)
	for _, p := range []*podnet.Pod{f.client, f.server} {
		sidecarCapture(t, p)
	}
	// Each sidecar forwards to the original destination: the client's to
	// its address and port, the server's to the application on loopback at
	// the original port.
	startIn(t, f.client, f.env.Cgroup, exec.Command("haproxy", "-db", "-f", cfg("client", ":15001", "0.0.0.0")))
	startIn(t, f.server, f.env.Cgroup, exec.Command("haproxy", "-db", "-f", cfg("server", ":15006", "127.0.0.1")))
	app := exec.Command("/proc/self/exe", "127.0.0.1:8080")
	app.Env = append(os.Environ(), podnet.HelperEnv("echo-server"))
	startIn(t, f.server, f.env.Cgroup, app)

	serverCookie, err := f.server.NS.Cookie()
	if err != nil {
		t.Fatal(err)
	}
	m := f.env.DP.Maps
	for _, mode := range []struct {
		name  string
		flags bpf.SpliceNS
		legs  int
	}{{"not opted in", 0, 0}, {"in-pod", bpf.SpliceInPod, 1}, {"sidecar capture", bpf.SpliceInPod | bpf.SpliceSidecar, 3}} {
		for _, p := range []struct {
			cookie uint64
			addr   netip.Addr
		}{{f.clientCookie, f.client.IPv4}, {serverCookie, f.server.IPv4}} {
			if err := m.SetSpliceNS(p.cookie, mode.flags); err != nil {
				t.Fatal(err)
			}
			if mode.flags&bpf.SpliceSidecar != 0 {
				err = m.SetSidecarPod(p.cookie, p.addr)
			} else {
				err = m.DeleteSidecarPod(p.cookie)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		before := f.stats(t)
		// The application dials the server's address; its sidecars carry it.
		if err := f.run(t, "client-echo", "10.244.1.11:8080"); err != nil {
			t.Fatalf("%s: %v", mode.name, err)
		}
		after := f.stats(t)
		d := func(k string) uint64 { return after[k] - before[k] }
		t.Logf("%s: %d bytes through sk_msg, %d ends inserted, %d connects captured, %d SO_ORIGINAL_DST answered",
			mode.name, d("splice_bytes"), d("splice_insert"), d("sidecar_captured"), d("sidecar_orig"))
		// Each direction of a spliced leg redirects its budget of the
		// 64 MiB, then goes to TCP (the echo checks every byte).
		if moved, want := d("splice_bytes"), uint64(mode.legs)*2*spliceBudget; moved > want || moved+uint64(mode.legs)*(1<<20) < want {
			t.Errorf("%s: %d bytes through sk_msg, want the %d spliced legs' budgets, %d", mode.name, moved, mode.legs, want)
		}
		captured, answered := uint64(0), uint64(0)
		if mode.flags&bpf.SpliceSidecar != 0 {
			captured, answered = 2, 2 // the application's connect and the client sidecar's
		}
		if d("sidecar_captured") != captured || d("sidecar_orig") < answered || d("sidecar_no_record") != 0 {
			t.Errorf("%s: sidecar capture counters %d captured, %d answered, %d without record; want %d, >= %d, 0",
				mode.name, d("sidecar_captured"), d("sidecar_orig"), d("sidecar_no_record"), captured, answered)
		}
		// Closed connections leave no original destination behind.
		waitNoSidecarOrigs(t, m)
	}
}
