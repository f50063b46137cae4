package hbone

import (
	"context"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// Loopback benchmarks of the HTTP/2 layer alone (no TLS, no kernel path):
// what the tunnel's keep-alive latency and per-message CPU are made of.
// Compare runs with benchstat; the data path harness (make bench) measures
// the whole tunnel.

// cpuTime is the process's user and system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU adds cpu-ns/op: the CPU both ends (same process) spent per
// operation, user and kernel time, since start.
func reportCPU(b *testing.B, start time.Duration) {
	b.ReportMetric(float64(cpuTime()-start)/float64(b.N), "cpu-ns/op")
}

// benchPair is a client connected over loopback TCP to a server running
// handler.
func benchPair(b *testing.B, handler func(*Stream, *Request)) *Conn {
	b.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { _ = Serve(c, Config{}, handler) }()
		}
	}()
	nc, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	cc, err := Client(nc, Config{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cc.Close() })
	return cc
}

func benchEcho(s *Stream, _ *Request) {
	if err := s.Respond(200); err != nil {
		return
	}
	buf := make([]byte, 64<<10)
	for {
		n, err := s.Read(buf)
		if n > 0 {
			if _, werr := s.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			_ = s.CloseWrite()
			return
		}
	}
}

// BenchmarkRoundTrip64B: one 64-byte request and its echo on a stream
// kept open (keep-alive traffic through the tunnel).
func BenchmarkRoundTrip64B(b *testing.B) {
	cc := benchPair(b, benchEcho)
	s, status, err := cc.Connect(context.Background(), "10.0.0.1:80", nil)
	if err != nil || status != 200 {
		b.Fatalf("connect: %d %v", status, err)
	}
	defer s.Close()
	msg := make([]byte, 64)
	got := make([]byte, 64)
	b.ReportAllocs()
	cpu := cpuTime()
	defer func() { reportCPU(b, cpu) }()
	for b.Loop() {
		if _, err := s.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(s, got); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRoundTrip64BUnix is BenchmarkRoundTrip64B over a Unix socket
// pair: no TCP stack, so this package's own work per message (framing,
// locks, hand-offs) is a larger share of what is measured.
func BenchmarkRoundTrip64BUnix(b *testing.B) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	var ends [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		ends[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			b.Fatal(err)
		}
	}
	go func() { _ = Serve(ends[0], Config{}, benchEcho) }()
	cc, err := Client(ends[1], Config{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cc.Close() })
	s, status, err := cc.Connect(context.Background(), "10.0.0.1:80", nil)
	if err != nil || status != 200 {
		b.Fatalf("connect: %d %v", status, err)
	}
	defer s.Close()
	msg := make([]byte, 64)
	got := make([]byte, 64)
	b.ReportAllocs()
	cpu := cpuTime()
	defer func() { reportCPU(b, cpu) }()
	for b.Loop() {
		if _, err := s.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(s, got); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkConnect: a new stream per operation (CONNECT, 64 bytes each
// way, half-close both ways): connections without keep-alive.
func BenchmarkConnect(b *testing.B) {
	cc := benchPair(b, benchEcho)
	msg := make([]byte, 64)
	got := make([]byte, 128)
	b.ReportAllocs()
	cpu := cpuTime()
	defer func() { reportCPU(b, cpu) }()
	for b.Loop() {
		s, status, err := cc.Connect(context.Background(), "10.0.0.1:80", nil)
		if err != nil || status != 200 {
			b.Fatalf("connect: %d %v", status, err)
		}
		if _, err := s.Write(msg); err != nil {
			b.Fatal(err)
		}
		if err := s.CloseWrite(); err != nil {
			b.Fatal(err)
		}
		n := 0
		for {
			k, err := s.Read(got[n:])
			n += k
			if err == io.EOF {
				break
			}
			if err != nil {
				b.Fatal(err)
			}
		}
		if n != len(msg) {
			b.Fatalf("echoed %d bytes", n)
		}
		s.Close()
	}
}

// BenchmarkBulk: one direction in 64 KiB writes (throughput).
func BenchmarkBulk(b *testing.B) {
	cc := benchPair(b, func(s *Stream, _ *Request) {
		if err := s.Respond(200); err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, s)
		_ = s.CloseWrite()
	})
	s, status, err := cc.Connect(context.Background(), "10.0.0.1:80", nil)
	if err != nil || status != 200 {
		b.Fatalf("connect: %d %v", status, err)
	}
	defer s.Close()
	buf := make([]byte, 64<<10)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	cpu := cpuTime()
	defer func() { reportCPU(b, cpu) }()
	for b.Loop() {
		if _, err := s.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
}
