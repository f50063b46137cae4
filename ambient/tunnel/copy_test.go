package tunnel

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"syscall"
	"testing"
	"time"
)

// blockingWriter blocks every Write until release is closed.
type blockingWriter struct{ entered, release chan struct{} }

func (w *blockingWriter) Write(p []byte) (int, error) {
	select {
	case w.entered <- struct{}{}:
	default:
	}
	<-w.release
	return len(p), nil
}

type failingWriter struct{}

var errWriteFailed = errors.New("dst failed")

func (failingWriter) Write([]byte) (int, error) { return 0, errWriteFailed }

// TestRelayConn: relayConn carries bytes in order to EOF, reports a reset,
// a failed destination and a close while it waits, and a close of its
// source does not wait for a destination that blocks (net.Conn.Close waits
// for a RawConn.Read callback in progress, so the write must happen
// outside it).
func TestRelayConn(t *testing.T) {
	payload := make([]byte, 300<<10) // several reads' worth
	fillRandom(payload)
	for _, tc := range []struct {
		name string
		run  func(t *testing.T)
	}{
		{"bytes in order, then EOF", func(t *testing.T) {
			src, peer := tcpPair(t)
			go func() {
				for off := 0; off < len(payload); off += 1000 { // many small writes: short reads
					end := min(off+1000, len(payload))
					if _, err := peer.Write(payload[off:end]); err != nil {
						return
					}
				}
				_ = peer.CloseWrite()
			}()
			var got bytes.Buffer
			n, err := relayConn(&got, src)
			if err != nil || n != int64(len(payload)) || sha256.Sum256(got.Bytes()) != sha256.Sum256(payload) {
				t.Fatalf("relayed %d of %d bytes, err %v, intact %v", n, len(payload), err, bytes.Equal(got.Bytes(), payload))
			}
		}},
		{"reset by the peer", func(t *testing.T) {
			src, peer := tcpPair(t)
			_, _ = peer.Write([]byte("partial"))
			_ = peer.SetLinger(0)
			_ = peer.Close()
			var got bytes.Buffer
			_, err := relayConn(&got, src)
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("err %v, want ECONNRESET", err)
			}
		}},
		{"destination fails", func(t *testing.T) {
			src, peer := tcpPair(t)
			_, _ = peer.Write([]byte("x"))
			if _, err := relayConn(failingWriter{}, src); !errors.Is(err, errWriteFailed) {
				t.Fatalf("err %v, want the destination's", err)
			}
		}},
		{"closed while waiting", func(t *testing.T) {
			src, _ := tcpPair(t)
			done := make(chan error, 1)
			go func() { _, err := relayConn(io.Discard, src); done <- err }()
			time.Sleep(20 * time.Millisecond)
			_ = src.Close()
			select {
			case err := <-done:
				if err == nil {
					t.Fatal("no error after the source closed")
				}
			case <-time.After(5 * time.Second):
				t.Fatal("relay still waiting after its source closed")
			}
		}},
		{"close does not wait for a blocked destination", func(t *testing.T) {
			src, peer := tcpPair(t)
			w := &blockingWriter{entered: make(chan struct{}, 1), release: make(chan struct{})}
			done := make(chan error, 1)
			go func() { _, err := relayConn(w, src); done <- err }()
			_, _ = peer.Write([]byte("x"))
			<-w.entered
			closed := make(chan struct{})
			go func() { _ = src.Close(); close(closed) }()
			select {
			case <-closed:
			case <-time.After(5 * time.Second):
				close(w.release)
				t.Fatal("Close of the source waited for the destination's write")
			}
			close(w.release)
			if err := <-done; err == nil {
				t.Fatal("no error after the source closed")
			}
		}},
	} {
		t.Run(tc.name, tc.run)
	}
}
