package dataplane_test

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/podnet"
)

func init() { podnet.RegisterHelper("udpscript", udpScriptHelper) }

// udpScriptHelper runs inside a pod: one unconnected UDP socket, driven line
// by line from stdin. "send HOST:PORT" sends a datagram and answers "sent" (or
// the error); "recv" waits for one datagram and answers "NAME FROM" (the
// server's name and the source address recvfrom reported).
func udpScriptHelper(args []string) (any, error) {
	fs := flag.NewFlagSet("udpscript", flag.ContinueOnError)
	network := fs.String("network", "udp4", "network")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	sock, err := net.ListenUDP(*network, nil)
	if err != nil {
		return nil, err
	}
	defer sock.Close()
	buf := make([]byte, 2048)
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		switch {
		case len(f) == 2 && f[0] == "send":
			dst, err := net.ResolveUDPAddr(*network, f[1])
			if err == nil {
				_, err = sock.WriteToUDP([]byte("ping"), dst)
			}
			if err != nil {
				fmt.Println("error", err)
				continue
			}
			fmt.Println("sent")
		case len(f) == 1 && f[0] == "recv":
			_ = sock.SetReadDeadline(time.Now().Add(2 * time.Second))
			n, from, err := sock.ReadFromUDP(buf)
			if err != nil {
				fmt.Println("error", err)
				continue
			}
			ap := from.AddrPort()
			fmt.Println(string(buf[:n]), netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
		default:
			fmt.Println("error unknown command", in.Text())
		}
	}
	return nil, in.Err()
}

// udpScript drives a udpscript helper in a pod.
type udpScript struct {
	in  io.WriteCloser
	out *bufio.Scanner
}

func (f *fixture) udpScript(t *testing.T, network string) *udpScript {
	t.Helper()
	cmd := exec.Command("/proc/self/exe", "-network", network)
	cmd.Env = append(os.Environ(), podnet.HelperEnv("udpscript"))
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := f.client.Start(cmd, f.env.Cgroup); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		in.Close()
		_ = cmd.Wait()
	})
	return &udpScript{in: in, out: bufio.NewScanner(out)}
}

func (s *udpScript) do(t *testing.T, cmd string) string {
	t.Helper()
	if _, err := fmt.Fprintln(s.in, cmd); err != nil {
		t.Fatal(err)
	}
	if !s.out.Scan() {
		t.Fatalf("%s: the helper exited (%v)", cmd, s.out.Err())
	}
	return s.out.Text()
}

func (s *udpScript) send(t *testing.T, dst string) {
	t.Helper()
	if got := s.do(t, "send "+dst); got != "sent" {
		t.Fatalf("send %s: %s", dst, got)
	}
}

// recv returns "NAME FROM" for the next datagram.
func (s *udpScript) recv(t *testing.T) string {
	t.Helper()
	return s.do(t, "recv")
}

// TestPrivilegedUDPReplySource: an unconnected UDP socket sees every reply
// as coming from the VIP it sent to, whatever else it sends to and however
// the service changes: two VIPs sharing a backend, a re-pick after the
// service's membership changed (with replies of the old backend still in
// flight), and more VIPs than the socket keeps slots for.
func TestPrivilegedUDPReplySource(t *testing.T) {
	f := newFixture(t, bpf.Config{})
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	dns := []dataplane.Port{{ServicePort: 53, TargetPort: 5353}}
	svc := func(key, vip string, eps ...string) dataplane.Service {
		s := dataplane.Service{Key: key, VIPs: []netip.Addr{netip.MustParseAddr(vip)}, Ports: dns}
		for _, e := range eps {
			s.Endpoints = append(s.Endpoints, dataplane.Endpoint{WorkloadUID: e})
		}
		return s
	}
	expect := func(t *testing.T, got, want string) {
		t.Helper()
		if got != want {
			t.Fatalf("reply %q, want %q", got, want)
		}
	}

	t.Run("two VIPs sharing a backend", func(t *testing.T) {
		must(f.dp.SetService(svc("ns/one", "10.96.0.10", "a")))
		must(f.dp.SetService(svc("ns/two", "10.96.0.20", "a")))
		defer func() { must(f.dp.DeleteService("ns/one")); must(f.dp.DeleteService("ns/two")) }()
		s := f.udpScript(t, "udp4")
		for _, vip := range []string{"10.96.0.10:53", "10.96.0.20:53", "10.96.0.10:53", "10.96.0.20:53"} {
			s.send(t, vip)
			expect(t, s.recv(t), "a "+vip)
		}
		// Both asked before either answers: a reply carries no trace of
		// which VIP it answers, and is reported as coming from the VIP this
		// socket most recently sent to that backend through.
		s.send(t, "10.96.0.10:53")
		s.send(t, "10.96.0.20:53")
		expect(t, s.recv(t), "a 10.96.0.20:53")
		expect(t, s.recv(t), "a 10.96.0.20:53")
	})
	t.Run("re-pick after a membership change", func(t *testing.T) {
		must(f.dp.SetService(svc("ns/one", "10.96.0.10", "a")))
		defer func() { must(f.dp.DeleteService("ns/one")) }()
		s := f.udpScript(t, "udp4")
		s.send(t, "10.96.0.10:53")
		expect(t, s.recv(t), "a 10.96.0.10:53")
		s.send(t, "10.96.0.10:53") // a's answer is still in flight when ...
		must(f.dp.SetService(svc("ns/one", "10.96.0.10", "b")))
		s.send(t, "10.96.0.10:53") // ... the socket re-picks b
		got := []string{s.recv(t), s.recv(t)}
		slices.Sort(got)
		if want := []string{"a 10.96.0.10:53", "b 10.96.0.10:53"}; !slices.Equal(got, want) {
			t.Fatalf("replies %q, want %q", got, want)
		}
		for range 3 {
			s.send(t, "10.96.0.10:53")
			expect(t, s.recv(t), "b 10.96.0.10:53")
		}
		must(f.dp.SetService(svc("ns/one", "10.96.0.10", "c")))
		s.send(t, "10.96.0.10:53")
		expect(t, s.recv(t), "c 10.96.0.10:53")
	})
	t.Run("more VIPs than slots", func(t *testing.T) {
		var vips []string
		for i := range 12 {
			key := fmt.Sprintf("ns/s%d", i)
			must(f.dp.SetService(svc(key, fmt.Sprintf("10.96.1.%d", i+1), "a", "b", "c")))
			defer func() { must(f.dp.DeleteService(key)) }()
			vips = append(vips, fmt.Sprintf("10.96.1.%d:53", i+1))
		}
		s := f.udpScript(t, "udp4")
		chosen := map[string]string{}
		for round := range 3 {
			for _, vip := range vips {
				s.send(t, vip)
				name, from, _ := strings.Cut(s.recv(t), " ")
				if from != vip {
					t.Fatalf("round %d: reply from %s reported as %s, want %s", round, name, from, vip)
				}
				chosen[vip] = name
			}
		}
		// The 8 most recent VIPs keep their backend from here on.
		for _, vip := range vips[len(vips)-8:] {
			s.send(t, vip)
			expect(t, s.recv(t), chosen[vip]+" "+vip)
		}
	})
	t.Run("IPv6", func(t *testing.T) {
		one := svc("ns/one", "fd00:10:96::10", "a")
		two := svc("ns/two", "fd00:10:96::20", "a")
		must(f.dp.SetService(one))
		must(f.dp.SetService(two))
		defer func() { must(f.dp.DeleteService("ns/one")); must(f.dp.DeleteService("ns/two")) }()
		s := f.udpScript(t, "udp6")
		for _, vip := range []string{"[fd00:10:96::10]:53", "[fd00:10:96::20]:53", "[fd00:10:96::10]:53"} {
			s.send(t, vip)
			expect(t, s.recv(t), "a "+vip)
		}
	})
}
