package hbone

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// pair connects a client and a server over loopback TCP.
func pair(t *testing.T, cfg Config, handler func(*Stream, *Request)) *Conn {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { _ = Serve(c, cfg, handler) }()
		}
	}()
	nc, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	cc, err := Client(nc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// echo answers 200 and echoes the stream, half-closing when the client does.
func echo(s *Stream, r *Request) {
	if r.Method != "CONNECT" {
		_ = s.Respond(400)
		return
	}
	if err := s.Respond(200); err != nil {
		return
	}
	_, _ = io.Copy(s, s)
	_ = s.CloseWrite()
}

func exchange(t *testing.T, s *Stream, data []byte) []byte {
	t.Helper()
	got, err := exchangeErr(s, data)
	if err != nil {
		t.Fatalf("exchange: %v", err)
	}
	return got
}

func TestEchoAndHalfClose(t *testing.T) {
	cc := pair(t, Config{}, echo)
	s, status, err := cc.Connect(t.Context(), "10.0.0.1:80", [][2]string{{"Baggage", "a=b"}})
	if err != nil || status != 200 {
		t.Fatalf("connect: %d %v", status, err)
	}
	defer s.Close()
	if got := exchange(t, s, []byte("hello")); string(got) != "hello" {
		t.Fatalf("echo %q", got)
	}
}

func TestServerClosesFirstClientKeepsSending(t *testing.T) {
	// The server ends its side at once and then keeps reading: true
	// half-close, which net/http's HTTP/2 server cannot do.
	got := make(chan []byte, 1)
	cc := pair(t, Config{}, func(s *Stream, r *Request) {
		_ = s.Respond(200)
		_, _ = s.Write([]byte("bye"))
		_ = s.CloseWrite()
		b, _ := io.ReadAll(s)
		got <- b
	})
	s, _, err := cc.Connect(t.Context(), "10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(s)
	if err != nil || string(b) != "bye" {
		t.Fatalf("read %q %v", b, err)
	}
	if _, err := s.Write([]byte("still here")); err != nil {
		t.Fatal(err)
	}
	_ = s.CloseWrite()
	if b := <-got; string(b) != "still here" {
		t.Fatalf("server got %q after its own half-close", b)
	}
}

func TestRefusal(t *testing.T) {
	cc := pair(t, Config{}, func(s *Stream, r *Request) {
		if r.Authority != "10.0.0.1:80" || r.Get("Baggage") != "k=v" {
			_ = s.Respond(400)
			return
		}
		_ = s.Respond(401)
	})
	for _, tc := range []struct {
		authority string
		hdr       [][2]string
		want      int
	}{{"10.0.0.2:80", nil, 400}, {"10.0.0.1:80", [][2]string{{"baggage", "k=v"}}, 401}} {
		s, status, err := cc.Connect(t.Context(), tc.authority, tc.hdr)
		if err != nil || status != tc.want {
			t.Fatalf("%s: %d %v, want %d", tc.authority, status, err, tc.want)
		}
		if _, err := s.Read(make([]byte, 1)); err == nil {
			t.Fatal("a refused stream can be read")
		}
	}
	waitFor(t, func() bool { return cc.Active() == 0 })
}

func TestHandlerWithoutResponseGets500(t *testing.T) {
	cc := pair(t, Config{}, func(*Stream, *Request) {})
	if _, status, err := cc.Connect(t.Context(), "10.0.0.1:80", nil); err != nil || status != 500 {
		t.Fatalf("%d %v", status, err)
	}
}

func TestFlowControlLargeTransfer(t *testing.T) {
	// Small windows and frames: many WINDOW_UPDATEs and window waits.
	cfg := Config{StreamWindow: 64 << 10, ConnWindow: 128 << 10, MaxFrame: 16 << 10}
	cc := pair(t, cfg, echo)
	data := make([]byte, 16<<20)
	for i := range data {
		data[i] = byte(rand.Uint32())
	}
	s, _, err := cc.Connect(t.Context(), "10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got := exchange(t, s, data)
	if sha256.Sum256(got) != sha256.Sum256(data) {
		t.Fatalf("corrupted: %d bytes back of %d", len(got), len(data))
	}
}

func TestConcurrentStreamsAndLimit(t *testing.T) {
	cc := pair(t, Config{MaxStreams: 50}, echo)
	var wg sync.WaitGroup
	errs := make(chan error, 200)
	for i := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := bytes.Repeat([]byte{byte(i)}, 10000+i)
			for {
				if !cc.Available(100) {
					time.Sleep(time.Millisecond)
					continue
				}
				s, status, err := cc.Connect(context.Background(), "10.0.0.1:80", nil)
				if errors.Is(err, ErrRefused) || (err != nil && strings.Contains(err.Error(), "REFUSED_STREAM")) {
					time.Sleep(time.Millisecond)
					continue
				}
				if err != nil || status != 200 {
					errs <- fmt.Errorf("stream %d: %d %v", i, status, err)
					return
				}
				go func() { _, _ = s.Write(msg); _ = s.CloseWrite() }()
				got, err := io.ReadAll(s)
				s.Close()
				if err != nil || !bytes.Equal(got, msg) {
					errs <- fmt.Errorf("stream %d: %d bytes, %v", i, len(got), err)
				}
				return
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	waitFor(t, func() bool { return cc.Active() == 0 })
}

func TestResetReachesTheOtherSide(t *testing.T) {
	readErr := make(chan error, 1)
	cc := pair(t, Config{}, func(s *Stream, r *Request) {
		_ = s.Respond(200)
		_, err := io.ReadAll(s)
		readErr <- err
	})
	s, _, err := cc.Connect(t.Context(), "10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = s.Write([]byte("partial"))
	s.Reset(http2.ErrCodeCancel)
	if err := <-readErr; !errors.Is(err, ErrStreamReset) {
		t.Fatalf("server read after reset: %v", err)
	}
}

// Interop with golang.org/x/net/http2 (what Istio's Go HBONE uses), both ways.
func TestInteropXNetServer(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	srv := &http2.Server{}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go srv.ServeConn(c, &http2.ServeConnOpts{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.Method != http.MethodConnect || r.Host != "10.0.0.1:80" {
					w.WriteHeader(http.StatusBadRequest)
					return
				}
				w.WriteHeader(http.StatusOK)
				w.(http.Flusher).Flush()
				b, _ := io.ReadAll(r.Body)
				_, _ = w.Write(bytes.ToUpper(b))
			})})
		}
	}()
	cc, _ := dialClient(t, l.Addr().String())
	defer cc.Close()
	big := bytes.Repeat([]byte("abcdefgh"), 1<<20) // 8 MiB: beyond x/net's default windows
	for i := range 3 {
		s, status, err := cc.Connect(t.Context(), "10.0.0.1:80", nil)
		if err != nil || status != 200 {
			t.Fatalf("connect %d: %d %v", i, status, err)
		}
		if got := exchange(t, s, big); !bytes.Equal(got, bytes.ToUpper(big)) {
			t.Fatalf("round %d: %d bytes back", i, len(got))
		}
		s.Close()
	}
	if _, status, err := cc.Connect(t.Context(), "10.0.0.2:80", nil); err != nil || status != 400 {
		t.Fatalf("refusal: %d %v", status, err)
	}
}

func TestInteropXNetClient(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { _ = Serve(c, Config{}, echo) }()
		}
	}()
	nc, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	cc, err := (&http2.Transport{}).NewClientConn(nc)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	big := bytes.Repeat([]byte("0123456789"), 1<<20)
	for i := range 3 {
		pr, pw := io.Pipe()
		req, _ := http.NewRequest(http.MethodConnect, "https://10.0.0.1:80", pr)
		req.Host = "10.0.0.1:80"
		resp, err := cc.RoundTrip(req)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("round trip %d: %v %v", i, resp, err)
		}
		go func() { _, _ = pw.Write(big); pw.Close() }()
		got, err := io.ReadAll(resp.Body)
		if err != nil || !bytes.Equal(got, big) {
			t.Fatalf("round %d: %d bytes back, %v", i, len(got), err)
		}
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatal("condition not reached in 3s")
}

// A zero Config announces the defaults (ztunnel's): 4 MiB stream and
// 16 MiB connection windows, 1 MiB frames, and from a server 100
// concurrent streams. The tunnel's pool relies on the same numbers.
func TestDefaultSettingsOnTheWire(t *testing.T) {
	for _, server := range []bool{false, true} {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		ours := make(chan *Conn, 1)
		go func() {
			c, err := l.Accept()
			if err != nil {
				return
			}
			if server {
				go func() { _ = Serve(c, Config{}, echo) }()
			} else if cc, err := Client(c, Config{}); err == nil {
				ours <- cc
			}
		}()
		raw, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		_ = raw.SetDeadline(time.Now().Add(5 * time.Second))
		if server {
			if _, err := io.WriteString(raw, http2.ClientPreface); err != nil {
				t.Fatal(err)
			}
		} else if _, err := io.ReadFull(raw, make([]byte, len(http2.ClientPreface))); err != nil {
			t.Fatal(err)
		}
		fr := http2.NewFramer(raw, raw)
		if server {
			if err := fr.WriteSettings(); err != nil {
				t.Fatal(err)
			}
		}
		got := map[http2.SettingID]uint32{}
		var connWindow uint32 = 65535
		for seen := 0; seen < 2; {
			f, err := fr.ReadFrame()
			if err != nil {
				t.Fatalf("server=%v: %v", server, err)
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if f.IsAck() {
					continue
				}
				_ = f.ForeachSetting(func(s http2.Setting) error { got[s.ID] = s.Val; return nil })
				seen++
			case *http2.WindowUpdateFrame:
				if f.StreamID == 0 {
					connWindow += f.Increment
					seen++
				}
			}
		}
		want := map[http2.SettingID]uint32{http2.SettingInitialWindowSize: 4 << 20, http2.SettingMaxFrameSize: 1 << 20}
		if server {
			want[http2.SettingMaxConcurrentStreams] = 100
		}
		for id, v := range want {
			if got[id] != v {
				t.Errorf("server=%v: %v = %d, want %d", server, id, got[id], v)
			}
		}
		if connWindow != 16<<20 {
			t.Errorf("server=%v: connection window %d, want 16 MiB", server, connWindow)
		}
		if !server {
			(<-ours).Close()
		}
	}
}

// A client that opens its next stream the moment the last one ended both
// ways (it read the server's END_STREAM) must never be refused: the server
// counts a stream closed no later than its last frame can reach the peer.
// With one stream allowed, any lag between writing END_STREAM and
// forgetting the stream shows as REFUSED_STREAM (TestPrivilegedTunnel's
// 1000 concurrent streams hit it about once in six runs on a loaded
// machine).
func TestNextStreamAfterEndIsNotRefused(t *testing.T) {
	cc := pair(t, Config{MaxStreams: 1}, echo)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := range 3000 {
		st, status, err := cc.Connect(ctx, "10.0.0.1:80", nil)
		if err != nil || status != 200 {
			t.Fatalf("stream %d: status %d, %v", i, status, err)
		}
		if got := exchange(t, st, []byte("x")); string(got) != "x" {
			t.Fatalf("stream %d echoed %q", i, got)
		}
		st.Close()
	}
}
