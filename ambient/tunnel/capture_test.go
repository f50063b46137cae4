package tunnel

import (
	"encoding/binary"
	"net"
	"net/netip"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/integration/podnet"
)

// segment is one TCP segment seen on a pod's wire.
type segment struct {
	src, dst netip.AddrPort
	payload  []byte
}

// capture records the TCP segments crossing a pod's eth0 (an AF_PACKET
// socket inside the pod): what an observer on the network would see.
type capture struct {
	fd   int
	mu   sync.Mutex
	segs []segment
	done chan struct{}
}

func startCapture(t *testing.T, pod *podnet.Pod) *capture {
	t.Helper()
	c := &capture{done: make(chan struct{})}
	err := pod.NS.Do(func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		ifi, err := net.InterfaceByName("eth0")
		if err != nil {
			unix.Close(fd)
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
			unix.Close(fd)
			return err
		}
		_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000})
		c.fd = fd
		return nil
	})
	if err != nil {
		t.Fatalf("packet capture in %s: %v", pod.Name, err)
	}
	go c.loop()
	t.Cleanup(c.stop)
	return c
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (c *capture) loop() {
	buf := make([]byte, 65536)
	for {
		select {
		case <-c.done:
			return
		default:
		}
		n, _, err := unix.Recvfrom(c.fd, buf, 0)
		if err != nil {
			continue
		}
		if s, ok := parseSegment(buf[:n]); ok {
			c.mu.Lock()
			c.segs = append(c.segs, s)
			c.mu.Unlock()
		}
	}
}

func (c *capture) stop() {
	select {
	case <-c.done:
		return
	default:
	}
	close(c.done)
	unix.Close(c.fd)
}

func (c *capture) segments() []segment {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]segment(nil), c.segs...)
}

// parseSegment reads an IPv4 or IPv6 packet carrying TCP.
func parseSegment(b []byte) (segment, bool) {
	if len(b) < 1 {
		return segment{}, false
	}
	var src, dst netip.Addr
	var l4 []byte
	switch b[0] >> 4 {
	case 4:
		if len(b) < 20 || b[9] != unix.IPPROTO_TCP {
			return segment{}, false
		}
		ihl := int(b[0]&0xf) * 4
		total := int(binary.BigEndian.Uint16(b[2:]))
		if total > len(b) || ihl > total {
			return segment{}, false
		}
		src, dst = netip.AddrFrom4([4]byte(b[12:16])), netip.AddrFrom4([4]byte(b[16:20]))
		l4 = b[ihl:total]
	case 6:
		if len(b) < 40 || b[6] != unix.IPPROTO_TCP {
			return segment{}, false
		}
		src, dst = netip.AddrFrom16([16]byte(b[8:24])), netip.AddrFrom16([16]byte(b[24:40]))
		l4 = b[40:min(len(b), 40+int(binary.BigEndian.Uint16(b[4:])))]
	default:
		return segment{}, false
	}
	if len(l4) < 20 {
		return segment{}, false
	}
	off := int(l4[12]>>4) * 4
	if off > len(l4) {
		return segment{}, false
	}
	return segment{
		src:     netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4[0:])),
		dst:     netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:])),
		payload: append([]byte(nil), l4[off:]...),
	}, true
}
