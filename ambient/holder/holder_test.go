package holder

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// startHolder runs a Server on a socket in a temporary directory.
func startHolder(t *testing.T, s *Server) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "holder.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Serve(ctx, l) }()
	t.Cleanup(func() { cancel(); <-done; s.Close() })
	return path
}

func listenTCP(t *testing.T) *net.TCPListener {
	t.Helper()
	l, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func fdOf(t *testing.T, l *net.TCPListener) uintptr {
	t.Helper()
	rc, err := l.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var out uintptr
	_ = rc.Control(func(fd uintptr) { out = fd })
	return out
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

// A listener put by one daemon outlives it: connections made while no
// daemon runs wait in the accept queue, and the next daemon takes the same
// socket from the holder and accepts them.
func TestKeeperListenerOutlivesDaemon(t *testing.T) {
	s := &Server{}
	path := startHolder(t, s)
	key := Key{Pod: "pod-a", Netns: 11, Name: "15001/v4"}

	k1 := Open(context.Background(), path, nil)
	l := listenTCP(t)
	addr := l.Addr().String()
	if err := k1.Put(key, fdOf(t, l)); err != nil {
		t.Fatal(err)
	}
	if err := k1.Put(Key{Pod: "pod-b", Netns: 12, Name: "15008"}, fdOf(t, listenTCP(t))); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "two held sockets", func() bool { return s.Len() == 2 })
	// The daemon dies: its sockets and the keeper's copies close.
	k1.Close(false)
	l.Close()

	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatalf("connect while no daemon runs: %v (the held listener should queue it)", err)
	}
	defer c.Close()

	k2 := Open(context.Background(), path, nil)
	defer k2.Close(false)
	f := k2.Claim(key)
	if f == nil {
		t.Fatal("the next daemon did not inherit the listener")
	}
	if k2.Claim(key) != nil {
		t.Fatal("a socket was claimed twice")
	}
	nl, err := net.FileListener(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	if nl.Addr().String() != addr {
		t.Fatalf("inherited listener on %s, want %s", nl.Addr(), addr)
	}
	_ = nl.(*net.TCPListener).SetDeadline(time.Now().Add(2 * time.Second))
	ac, err := nl.Accept()
	if err != nil {
		t.Fatalf("accepting the connection queued while no daemon ran: %v", err)
	}
	ac.Close()
	// pod-b was not claimed: released after the snapshot.
	if n := k2.ReleaseInherited(); n != 1 {
		t.Fatalf("ReleaseInherited dropped %d, want 1 (pod-b)", n)
	}
	waitFor(t, "pod-b dropped", func() bool { return s.Len() == 1 })
}

func TestKeeperDrop(t *testing.T) {
	s := &Server{}
	path := startHolder(t, s)
	ctx, cancel := context.WithCancel(context.Background())
	k := Open(ctx, path, nil)
	defer k.Close(false)
	for _, key := range []Key{{"p1", 1, "15001/v4"}, {"p1", 1, "15008"}, {"p2", 2, "15008"}, {"p2", 2, "15053/udp"}} {
		var fd uintptr
		if key.Name == "15053/udp" {
			u, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
			if err != nil {
				t.Fatal(err)
			}
			defer u.Close()
			rc, _ := u.SyscallConn()
			_ = rc.Control(func(f uintptr) { fd = f })
		} else {
			fd = fdOf(t, listenTCP(t))
		}
		if err := k.Put(key, fd); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "4 held", func() bool { return s.Len() == 4 })
	k.DropPod("p1")
	waitFor(t, "p1 dropped", func() bool { return s.Len() == 2 })
	k.Drop(Key{"p2", 2, "15053/udp"})
	waitFor(t, "one left", func() bool { return s.Len() == 1 })
	if k.Held() != 1 {
		t.Fatalf("keeper holds %d, want 1", k.Held())
	}
	// A graceful stop releases everything: an upgrade's successor has its
	// own. The daemon cancels its context before it closes the keeper.
	cancel()
	time.Sleep(50 * time.Millisecond)
	k.Close(true)
	waitFor(t, "all released", func() bool { return s.Len() == 0 })
}

// A holder that restarts gets every socket again from the keeper.
func TestKeeperRePutsAfterHolderRestart(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "holder.sock")
	run := func(s *Server) (stop func()) {
		l, err := Listen(path)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); _ = s.Serve(ctx, l) }()
		return func() { cancel(); <-done; s.Close() }
	}
	s1 := &Server{}
	stop1 := run(s1)
	k := Open(context.Background(), path, nil)
	defer k.Close(false)
	if err := k.Put(Key{"p", 1, "15006"}, fdOf(t, listenTCP(t))); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "held", func() bool { return s1.Len() == 1 })
	stop1()
	waitFor(t, "disconnected", func() bool { return !k.Connected() })
	s2 := &Server{}
	stop2 := run(s2)
	defer stop2()
	waitFor(t, "re-put to the new holder", func() bool { return k.Connected() && s2.Len() == 1 })
}

// rawClient speaks to the holder without the keeper's checks.
func rawClient(t *testing.T, path string) *net.UnixConn {
	t.Helper()
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// expectRefusedAndClosed reads an err answer, then the end of the connection.
func expectRefusedAndClosed(t *testing.T, c *net.UnixConn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	m, f, err := recv(c)
	if err != nil || m.Op != OpErr || f != nil {
		t.Fatalf("want an err answer, got %+v %v %v", m, f, err)
	}
	if _, _, err := recv(c); err == nil {
		t.Fatal("the holder kept talking to a client that sent a malformed message")
	}
}

func TestServerRejectsMalformed(t *testing.T) {
	s := &Server{}
	path := startHolder(t, s)

	t.Run("garbage", func(t *testing.T) {
		c := rawClient(t, path)
		if _, err := c.Write([]byte("GET / HTTP/1.1\r\n\r\n")); err != nil {
			t.Fatal(err)
		}
		expectRefusedAndClosed(t, c)
	})
	t.Run("too long", func(t *testing.T) {
		c := rawClient(t, path)
		if _, err := c.Write(make([]byte, 64<<10)); err != nil {
			t.Fatal(err)
		}
		expectRefusedAndClosed(t, c)
	})
	t.Run("put with extra descriptors, all closed", func(t *testing.T) {
		c := rawClient(t, path)
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		r := os.NewFile(uintptr(p[0]), "r")
		defer r.Close()
		b, _ := Encode(Msg{Op: OpPut, Key: Key{"p", 1, "15001/v4"}})
		if _, _, err := c.WriteMsgUnix(b, unix.UnixRights(p[1], p[1], p[1]), nil); err != nil {
			t.Fatal(err)
		}
		unix.Close(p[1])
		expectRefusedAndClosed(t, c)
		// Every copy of the write end is closed in the holder: reading the
		// pipe ends instead of blocking.
		_ = r.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := r.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("holder leaked descriptors of a refused message: read = %v", err)
		}
	})
	t.Run("put of a non-socket", func(t *testing.T) {
		c := rawClient(t, path)
		f, err := os.Open(os.DevNull)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := send(c, Msg{Op: OpPut, Key: Key{"p", 1, "x"}}, int(f.Fd())); err != nil {
			t.Fatal(err)
		}
		m, _, err := recv(c)
		if err != nil || m.Op != OpErr {
			t.Fatalf("want err, got %+v %v", m, err)
		}
	})
	if s.Len() != 0 {
		t.Fatalf("holder holds %d sockets after malformed puts", s.Len())
	}
}

func TestServerBounds(t *testing.T) {
	s := &Server{MaxHeld: 2, MaxConns: 1}
	path := startHolder(t, s)
	c := rawClient(t, path)
	for i, want := range []Op{OpOK, OpOK, OpErr, OpOK} {
		key := Key{"p", 1, string(rune('a' + i))}
		if i == 3 {
			key = Key{"p", 1, "a"} // replacing a held key is allowed when full
		}
		if err := send(c, Msg{Op: OpPut, Key: key}, int(fdOf(t, listenTCP(t)))); err != nil {
			t.Fatal(err)
		}
		m, _, err := recv(c)
		if err != nil || m.Op != want {
			t.Fatalf("put %d: got %+v %v, want %s", i, m, err, want)
		}
	}
	if s.Len() != 2 {
		t.Fatalf("held %d, want the bound 2", s.Len())
	}
	// A second client beyond MaxConns is closed at once.
	c2 := rawClient(t, path)
	_ = c2.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, _, err := recv(c2); err == nil {
		t.Fatal("a client beyond MaxConns was served")
	}
}
