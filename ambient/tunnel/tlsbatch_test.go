package tunnel

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"
)

// tcpPair is a connected loopback TCP pair.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	l, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	acc := make(chan *net.TCPConn, 1)
	go func() {
		c, _ := l.AcceptTCP()
		acc <- c
	}()
	a, err := net.DialTCP("tcp", nil, l.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	b := <-acc
	if b == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// TestBatchedTLS: one TLS write of 64 KiB makes five to eleven records
// (dynamic record sizing at the start of a connection); over a batchedTLS
// they leave in one write to the socket, and the peer reads them intact.
// Small writes, half-close and close_notify work through it.
func TestBatchedTLS(t *testing.T) {
	a, b := tcpPair(t)
	ca := newTestCA(t, "rawio")
	cert := ca.issue(t, "spiffe://cluster.local/ns/a/sa/b", time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	srv, _ := tlsOver(b, &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert.TLS}}, true)
	cli, nc := tlsOver(a, &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true}, false)
	errc := make(chan error, 1)
	go func() { errc <- srv.Handshake() }()
	if err := cli.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	raw := nc.(batchedTLS).raw
	msg := bytes.Repeat([]byte{7}, 64<<10)
	before := raw.writes
	go func() {
		_, err := nc.Write(msg)
		errc <- err
	}()
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(srv, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("read %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if w := raw.writes - before; w != 1 {
		t.Errorf("64 KiB over TLS took %d writes to the socket, want 1", w)
	}
	// A small write is one record and one write, as without batching.
	before = raw.writes
	if _, err := nc.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(srv, got[:4]); err != nil || string(got[:4]) != "ping" {
		t.Fatalf("%q %v", got[:4], err)
	}
	if w := raw.writes - before; w != 1 {
		t.Errorf("a small write took %d writes", w)
	}
	// The peer's close_notify and our half-close still work through it.
	if err := nc.(batchedTLS).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if n, err := srv.Read(got); n != 0 || err != io.EOF {
		t.Fatalf("after CloseWrite the peer reads %d, %v", n, err)
	}
}
