package podnet

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/bpf"
)

// Name servers answer every connection or datagram with their name. Clients
// running inside pods tally the names, which is how tests see which backend
// a VIP led to.

// ServeTCPName answers each connection on l with name and a newline. It
// returns when l is closed.
func ServeTCPName(l net.Listener, name string) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			fmt.Fprintf(c, "%s\n", name)
		}()
	}
}

// ServeUDPName answers each datagram on c with name. It returns when c is closed.
func ServeUDPName(c net.PacketConn, name string) {
	buf := make([]byte, 2048)
	for {
		_, from, err := c.ReadFrom(buf)
		if err != nil {
			return
		}
		_, _ = c.WriteTo([]byte(name), from)
	}
}

// ClientResult is what a client helper reports.
type ClientResult struct {
	// Names tallies which server answered; Errors tallies failures by errno name.
	Names  Tally `json:"names"`
	Errors Tally `json:"errors"`
	// Peers tallies the peer addresses the application saw (getpeername for
	// TCP and connected UDP, recvfrom's source for unconnected UDP).
	Peers Tally `json:"peers"`
	// LatencyUS holds one sample per successful exchange when asked for
	// (-latency): connect + first answer + close, in microseconds.
	LatencyUS []float64 `json:"latency_us,omitempty"`
}

func init() {
	RegisterHelper("tcp", tcpClient)
	RegisterHelper("udp", udpClient)
	RegisterHelper("http", httpClient)
	RegisterHelper("stream", streamClient)
	RegisterHelper("blast", blastClient)
}

// BlastResult is what the blast helper reports.
type BlastResult struct {
	OK         int     `json:"ok"`
	Corrupted  int     `json:"corrupted"`
	Errors     Tally   `json:"errors"`
	Bytes      int64   `json:"bytes"`
	Seconds    float64 `json:"seconds"`
	PeerErrors int     `json:"peer_errors"`
}

// blastClient: -addr HOST:PORT -conns N -bytes B. Opens N connections at
// once to an echo server; on each, sends B pseudo-random bytes (a stream
// of its own), half-closes, and reads everything back until EOF, comparing
// SHA-256 digests of what went out and what came back. Exercises large
// transfers, many concurrent streams and half-close in one go.
func blastClient(args []string) (any, error) {
	fs := flag.NewFlagSet("blast", flag.ContinueOnError)
	addr := fs.String("addr", "", "echo server")
	conns := fs.Int("conns", 1, "concurrent connections")
	size := fs.Int64("bytes", 1<<20, "bytes per connection")
	timeout := fs.Duration("timeout", 60*time.Second, "deadline per connection")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	res := BlastResult{Errors: Tally{}}
	var mu sync.Mutex
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < *conns; i++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			ok, n, err := blastOne(*addr, seed, *size, *timeout)
			mu.Lock()
			defer mu.Unlock()
			res.Bytes += n
			switch {
			case err != nil:
				res.Errors[errName(err)]++
			case ok:
				res.OK++
			default:
				res.Corrupted++
			}
		}(uint64(i) + 1)
	}
	wg.Wait()
	res.Seconds = time.Since(start).Seconds()
	return res, nil
}

func blastOne(addr string, seed uint64, size int64, timeout time.Duration) (bool, int64, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return false, 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	sent := sha256.New()
	werr := make(chan error, 1)
	go func() {
		rng := rand.New(rand.NewPCG(seed, seed))
		buf := make([]byte, 32<<10)
		for left := size; left > 0; {
			k := int64(len(buf))
			if left < k {
				k = left
			}
			for j := int64(0); j < k; j += 8 {
				binary.LittleEndian.PutUint64(buf[j:], rng.Uint64())
			}
			sent.Write(buf[:k])
			if _, err := c.Write(buf[:k]); err != nil {
				werr <- err
				return
			}
			left -= k
		}
		werr <- c.(*net.TCPConn).CloseWrite()
	}()
	got := sha256.New()
	n, rerr := io.Copy(got, c)
	if err := <-werr; err != nil {
		return false, n, err
	}
	if rerr != nil {
		return false, n, rerr
	}
	return n == size && bytes.Equal(sent.Sum(nil), got.Sum(nil)), n, nil
}

// StreamResult is what the stream helper reports.
type StreamResult struct {
	Exchanges int    `json:"exchanges"`
	Error     string `json:"error,omitempty"`
	Hostname  string `json:"hostname,omitempty"`
}

// streamClient: -addr HOST:PORT -duration D -interval I. Holds one TCP
// connection open for D, sending a line every I and waiting for it to come
// back (Istio's echo server echoes TCP). Any failure ends the run and is
// reported: the question is whether an established connection survives.
func streamClient(args []string) (any, error) {
	fs := flag.NewFlagSet("stream", flag.ContinueOnError)
	addr := fs.String("addr", "", "destination")
	duration := fs.Duration("duration", 3*time.Second, "how long to hold the connection")
	interval := fs.Duration("interval", 50*time.Millisecond, "time between exchanges")
	ready := fs.String("ready", "", "create this file once the first exchange is done (tests wait for it instead of guessing how long a process takes to start)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	var res StreamResult
	c, err := net.DialTimeout("tcp", *addr, 3*time.Second)
	if err != nil {
		res.Error = "dial: " + errName(err)
		return res, nil
	}
	defer c.Close()
	r := bufio.NewReader(c)
	end := time.Now().Add(*duration)
	for i := 0; time.Now().Before(end); i++ {
		msg := fmt.Sprintf("ping-%d", i)
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := fmt.Fprintf(c, "%s\n", msg); err != nil {
			res.Error = fmt.Sprintf("exchange %d: write: %s", i, errName(err))
			return res, nil
		}
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				res.Error = fmt.Sprintf("exchange %d: read: %s", i, errName(err))
				return res, nil
			}
			line = strings.TrimSpace(line)
			if h, ok := strings.CutPrefix(line, "Hostname="); ok {
				res.Hostname = h
			}
			if line == msg {
				break
			}
		}
		res.Exchanges++
		if i == 0 && *ready != "" {
			if err := os.WriteFile(*ready, nil, 0o644); err != nil {
				return nil, err
			}
		}
		time.Sleep(*interval)
	}
	return res, nil
}

// httpClient: -url URL -n COUNT [-keepalive]. Sends COUNT GETs and tallies
// the "Hostname=" line of each answer (what Istio's echo server reports).
// Without -keepalive every request has a connection of its own.
func httpClient(args []string) (any, error) {
	fs := flag.NewFlagSet("http", flag.ContinueOnError)
	url := fs.String("url", "", "URL")
	n := fs.Int("n", 1, "requests")
	keepalive := fs.Bool("keepalive", false, "reuse connections")
	latency := fs.Bool("latency", false, "record per-request latency")
	timeout := fs.Duration("timeout", 3*time.Second, "per-request timeout")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	tr := &http.Transport{DisableKeepAlives: !*keepalive, MaxIdleConnsPerHost: 4}
	cl := &http.Client{Transport: tr, Timeout: *timeout}
	res := ClientResult{Names: Tally{}, Errors: Tally{}, Peers: Tally{}}
	for i := 0; i < *n; i++ {
		start := time.Now()
		resp, err := cl.Get(*url)
		if err != nil {
			res.Errors[errName(err)]++
			continue
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			res.Errors[errName(err)]++
			continue
		}
		if *latency {
			res.LatencyUS = append(res.LatencyUS, float64(time.Since(start).Nanoseconds())/1e3)
		}
		if resp.StatusCode != http.StatusOK {
			res.Errors[fmt.Sprintf("HTTP %d", resp.StatusCode)]++
			continue
		}
		name := "?"
		for _, line := range strings.Split(string(body), "\n") {
			if v, ok := strings.CutPrefix(line, "Hostname="); ok {
				name = v
				break
			}
		}
		res.Names[name]++
	}
	return res, nil
}

// errName reduces an error to a stable name for tallies ("ECONNREFUSED").
func errName(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		if n := unix.ErrnoName(errno); n != "" {
			return n
		}
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout"
	}
	return err.Error()
}

func sockaddrString(sa unix.Sockaddr) string {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)).String()
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr).Unmap(), uint16(a.Port)).String()
	}
	return fmt.Sprint(sa)
}

func peerOf(c syscall.Conn) string {
	rc, err := c.SyscallConn()
	if err != nil {
		return "error: " + err.Error()
	}
	var peer string
	_ = rc.Control(func(fd uintptr) {
		sa, err := unix.Getpeername(int(fd))
		if err != nil {
			peer = "error: " + errName(err)
			return
		}
		peer = sockaddrString(sa)
	})
	return peer
}

// tcpClient: -addr HOST:PORT -n COUNT [-network tcp|tcp4|tcp6]. Opens COUNT
// connections one after another and reads the server's name from each.
func tcpClient(args []string) (any, error) {
	fs := flag.NewFlagSet("tcp", flag.ContinueOnError)
	addr := fs.String("addr", "", "destination")
	n := fs.Int("n", 1, "connections")
	network := fs.String("network", "tcp", "network")
	timeout := fs.Duration("timeout", 2*time.Second, "per-connection timeout")
	latency := fs.Bool("latency", false, "record per-connection latency")
	rst := fs.Bool("rst", false, "close with RST (SO_LINGER 0): no TIME_WAIT piles up in long runs")
	mark := fs.Int("mark", 0, "SO_MARK for the sockets (0x539 is the node proxy's)")
	ownPin := fs.String("own-pin", "", "record each socket as the node proxy's own in the data path pinned under this root, as the daemon does")
	eof := fs.Bool("until-eof", false, "read until the server closes (HTTP/1.0 style) instead of one line")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	res := ClientResult{Names: Tally{}, Errors: Tally{}, Peers: Tally{}}
	d := net.Dialer{Timeout: *timeout}
	if *mark != 0 || *ownPin != "" {
		d.Control = func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				if *mark != 0 {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, *mark)
				}
				if serr == nil && *ownPin != "" {
					serr = bpf.MarkProxySocketPinned(*ownPin, fd)
				}
			}); err != nil {
				return err
			}
			return serr
		}
	}
	for i := 0; i < *n; i++ {
		start := time.Now()
		c, err := d.Dial(*network, *addr)
		if err != nil {
			res.Errors[errName(err)]++
			continue
		}
		res.Peers[peerOf(c.(*net.TCPConn))]++
		_ = c.SetDeadline(time.Now().Add(*timeout))
		var line string
		if *eof {
			var b []byte
			b, err = io.ReadAll(c)
			line = string(b)
		} else {
			line, err = bufio.NewReader(c).ReadString('\n')
		}
		if *rst {
			_ = c.(*net.TCPConn).SetLinger(0)
		}
		c.Close()
		if err != nil {
			res.Errors[errName(err)]++
			continue
		}
		if *latency {
			res.LatencyUS = append(res.LatencyUS, float64(time.Since(start).Nanoseconds())/1e3)
		}
		res.Names[strings.TrimSpace(line)]++
	}
	return res, nil
}

// udpClient: -addr HOST:PORT -n COUNT [-connected] [-shared] [-network udp|udp4|udp6].
// Sends COUNT datagrams and reads one answer each. -shared sends them all
// from one socket (affinity), otherwise every exchange has a socket of its own.
func udpClient(args []string) (any, error) {
	fs := flag.NewFlagSet("udp", flag.ContinueOnError)
	addr := fs.String("addr", "", "destination")
	n := fs.Int("n", 1, "datagrams")
	network := fs.String("network", "udp", "network")
	connected := fs.Bool("connected", false, "connect() the socket")
	shared := fs.Bool("shared", false, "one socket for all datagrams")
	timeout := fs.Duration("timeout", 2*time.Second, "per-datagram timeout")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	dst, err := net.ResolveUDPAddr(*network, *addr)
	if err != nil {
		return nil, err
	}
	res := ClientResult{Names: Tally{}, Errors: Tally{}, Peers: Tally{}}
	var sock *net.UDPConn
	open := func() (*net.UDPConn, error) {
		if *connected {
			return net.DialUDP(*network, nil, dst)
		}
		return net.ListenUDP(*network, nil)
	}
	buf := make([]byte, 2048)
	for i := 0; i < *n; i++ {
		if sock == nil || !*shared {
			if sock != nil {
				sock.Close()
			}
			if sock, err = open(); err != nil {
				res.Errors[errName(err)]++
				sock = nil
				continue
			}
			if *connected {
				res.Peers[peerOf(sock)]++
			}
		}
		_ = sock.SetDeadline(time.Now().Add(*timeout))
		if *connected {
			_, err = sock.Write([]byte("ping"))
		} else {
			_, err = sock.WriteToUDP([]byte("ping"), dst)
		}
		if err != nil {
			res.Errors[errName(err)]++
			continue
		}
		k, from, err := sock.ReadFromUDP(buf)
		if err != nil {
			res.Errors[errName(err)]++
			continue
		}
		if !*connected {
			ap := from.AddrPort()
			res.Peers[netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()]++
		}
		res.Names[string(buf[:k])]++
	}
	if sock != nil {
		sock.Close()
	}
	return res, nil
}
