package bpf_test

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/podnet"
)

func init() {
	podnet.RegisterHelper("sidecar-listen", sidecarListen)
	podnet.RegisterHelper("sidecar-dial", sidecarDial)
}

// sidecarListen plays a sidecar's listeners: on each port of args it
// answers every connection with one line, "<local address> <SO_ORIGINAL_DST>",
// and closes it.
func sidecarListen(args []string) (any, error) {
	errs := make(chan error, len(args))
	for _, port := range args {
		l, err := net.Listen("tcp4", ":"+port)
		if err != nil {
			return nil, err
		}
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					errs <- err
					return
				}
				fmt.Fprintf(c, "%s %s\n", c.LocalAddr(), origDst(c.(*net.TCPConn)))
				c.Close()
			}
		}()
	}
	return nil, <-errs
}

// origDst is getsockopt(SOL_IP, SO_ORIGINAL_DST), as Envoy and haproxy ask
// it, or the error.
func origDst(c *net.TCPConn) string {
	rc, err := c.SyscallConn()
	if err != nil {
		return err.Error()
	}
	var sa unix.RawSockaddrInet4
	var serr syscall.Errno
	_ = rc.Control(func(fd uintptr) {
		n := uint32(unsafe.Sizeof(sa))
		_, _, serr = unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_IP, 80, uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&n)), 0)
	})
	if serr != 0 {
		return "error:" + serr.Error()
	}
	port := sa.Port>>8 | sa.Port<<8
	return fmt.Sprintf("%d.%d.%d.%d:%d", sa.Addr[0], sa.Addr[1], sa.Addr[2], sa.Addr[3], port)
}

// sidecarDial: as uid:gid args[0], dials args[1] and reports the line the
// listener answered, the peer the application sees (getpeername) and its
// own address.
func sidecarDial(args []string) (any, error) {
	ids := strings.Split(args[0], ":")
	uid, _ := strconv.Atoi(ids[0])
	gid, _ := strconv.Atoi(ids[1])
	if err := syscall.Setgroups(nil); err != nil {
		return nil, err
	}
	if err := syscall.Setgid(gid); err != nil {
		return nil, err
	}
	if err := syscall.Setuid(uid); err != nil {
		return nil, err
	}
	c, err := net.DialTimeout("tcp4", args[1], 3*time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return nil, err
	}
	return map[string]string{"reply": strings.TrimSpace(line), "peer": c.RemoteAddr().String(),
		"local": c.LocalAddr().(*net.TCPAddr).IP.String()}, nil
}

// TestPrivilegedSidecarCapture: what the kernel's sidecar capture does with
// each kind of connect from a pod with Istio's sidecar rules, against a
// sidecar's listeners (15001 in the client pod; 15006, an application port
// and the exempt status port 15020 in the server pod). Where the capture
// applies, the connection reaches the listener istio-iptables would have
// sent it to, with no NAT (the application keeps its pod address and sees
// the destination it dialled as its peer) and the listener's SO_ORIGINAL_DST
// is the destination dialled; everywhere else iptables' own capture (or
// none) is what happens, exactly as without Kmesh.
func TestPrivilegedSidecarCapture(t *testing.T) {
	f := newSpliceFixture(t, bpf.Config{})
	for _, p := range []*podnet.Pod{f.client, f.server} {
		sidecarCapture(t, p)
	}
	listen := func(p *podnet.Pod, ports ...string) {
		cmd := exec.Command("/proc/self/exe", ports...)
		cmd.Env = append(os.Environ(), podnet.HelperEnv("sidecar-listen"))
		startIn(t, p, f.env.Cgroup, cmd)
		// Ready when each port answers on the pod's loopback, dialled
		// from this process: outside the test's cgroup, so no program
		// and no counter sees these connects.
		for _, port := range ports {
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
				err := p.NS.Do(func() error {
					c, err := net.DialTimeout("tcp4", "127.0.0.1:"+port, time.Second)
					if err == nil {
						c.Close()
					}
					return err
				})
				if err == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("listener %s:%s not up: %v", p.Name, port, err)
				}
			}
		}
	}
	listen(f.client, "15001")
	listen(f.server, "15006", "8080", "15020")
	serverCookie, err := f.server.NS.Cookie()
	if err != nil {
		t.Fatal(err)
	}
	m := f.env.DP.Maps
	register := func(on bool) {
		t.Helper()
		for _, p := range []struct {
			cookie uint64
			pod    *podnet.Pod
		}{{f.clientCookie, f.client}, {serverCookie, f.server}} {
			flags, err := bpf.SpliceInPod|bpf.SpliceSidecar, error(nil)
			if on {
				err = m.SetSidecarPod(p.cookie, p.pod.IPv4)
			} else {
				flags, err = 0, m.DeleteSidecarPod(p.cookie)
			}
			if err == nil {
				err = m.SetSpliceNS(p.cookie, flags)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	const app, proxy, proxyGroup = "0:0", "1337:1337", "1001:1337"
	for _, c := range []struct {
		name, who, dst  string
		captured        bool
		reply, peer, ip string // what the listener answered; the dialler's peer and own address
		off             bool   // the pods are not registered
	}{
		{"application to another pod", app, "10.244.1.11:8080", true,
			"10.244.1.2:15001 10.244.1.11:8080", "10.244.1.11:8080", "10.244.1.2", false},
		{"application to an address no pod has", app, "10.244.1.99:80", true,
			"10.244.1.2:15001 10.244.1.99:80", "10.244.1.99:80", "10.244.1.2", false},
		// The rules' own capture: REDIRECT in OUTPUT names 127.0.0.1.
		{"application's TCP DNS is the rules'", app, "10.244.1.11:53", false,
			"127.0.0.1:15001 10.244.1.11:53", "10.244.1.11:53", "10.244.1.2", false},
		{"application to its own address is not captured", app, "10.244.1.2:15001", false,
			"10.244.1.2:15001 10.244.1.2:15001", "10.244.1.2:15001", "10.244.1.2", false},
		{"application to loopback is not captured", app, "127.0.0.1:15001", false,
			"127.0.0.1:15001 127.0.0.1:15001", "127.0.0.1:15001", "127.0.0.1", false},
		{"sidecar to a captured pod", proxy, "10.244.1.11:8080", true,
			"10.244.1.11:15006 10.244.1.11:8080", "10.244.1.11:8080", "10.244.1.2", false},
		{"sidecar group to a captured pod", proxyGroup, "10.244.1.11:8080", true,
			"10.244.1.11:15006 10.244.1.11:8080", "10.244.1.11:8080", "10.244.1.2", false},
		{"sidecar to an exempt port", proxy, "10.244.1.11:15020", false,
			"10.244.1.11:15020 10.244.1.11:15020", "10.244.1.11:15020", "10.244.1.2", false},
		// Not registered: iptables captures both legs, NAT and all.
		{"unregistered: the rules' outbound capture", app, "10.244.1.11:8080", false,
			"127.0.0.1:15001 10.244.1.11:8080", "10.244.1.11:8080", "10.244.1.2", true},
		{"unregistered: the rules' inbound capture", proxy, "10.244.1.11:8080", false,
			"10.244.1.11:15006 10.244.1.11:8080", "10.244.1.11:8080", "10.244.1.2", true},
	} {
		register(!c.off)
		before := f.stats(t)
		var got map[string]string
		if err := f.client.Helper(f.env.Cgroup, &got, "sidecar-dial", c.who, c.dst); err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if got["reply"] != c.reply || got["peer"] != c.peer || got["local"] != c.ip {
			t.Errorf("%s: listener %q, peer %s, own address %s; want %q, %s, %s", c.name, got["reply"], got["peer"], got["local"], c.reply, c.peer, c.ip)
		}
		captured := f.stats(t)["sidecar_captured"] - before["sidecar_captured"]
		if want := map[bool]uint64{true: 1}[c.captured]; captured != want {
			t.Errorf("%s: %d connects captured by the kernel, want %d", c.name, captured, want)
		}
	}
	waitNoSidecarOrigs(t, m)
}

// waitNoSidecarOrigs fails unless kmesh_sidecar_orig empties within 5 s:
// every record goes when its connecting end closes.
func waitNoSidecarOrigs(t *testing.T, m *bpf.Maps) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		recs, err := m.SidecarOrigs()
		if err != nil {
			t.Fatal(err)
		}
		if len(recs) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("records left after the connections closed: %+v", recs)
			return
		}
	}
}
