package cluster

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// NonLoopbackListeners lists the TCP listening and UDP bound sockets of
// process pid, in its network namespace, whose address is not loopback
// ("tcp 0.0.0.0:9876"). The tier must reach nothing outside the machine:
// a process that listens on every address is a finding.
func NonLoopbackListeners(pid int) ([]string, error) {
	inodes := map[string]bool{}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return nil, err
	}
	for _, fd := range fds {
		l, err := os.Readlink(filepath.Join(fmt.Sprintf("/proc/%d/fd", pid), fd.Name()))
		if err == nil && strings.HasPrefix(l, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = true
		}
	}
	var bad []string
	for _, proto := range []string{"tcp", "tcp6", "udp", "udp6"} {
		f, err := os.Open(fmt.Sprintf("/proc/%d/net/%s", pid, proto))
		if err != nil {
			return nil, err
		}
		sc := bufio.NewScanner(f)
		sc.Scan() // header
		for sc.Scan() {
			fs := strings.Fields(sc.Text())
			if len(fs) < 10 || !inodes[fs[9]] {
				continue
			}
			// TCP: only LISTEN (0A); UDP: every bound socket.
			if strings.HasPrefix(proto, "tcp") && fs[3] != "0A" {
				continue
			}
			addr, port, err := parseProcAddr(fs[1])
			if err != nil {
				f.Close()
				return nil, fmt.Errorf("/proc/%d/net/%s: %w", pid, proto, err)
			}
			if !addr.Unmap().IsLoopback() {
				bad = append(bad, fmt.Sprintf("%s %s", proto, netip.AddrPortFrom(addr, port)))
			}
		}
		f.Close()
		if err := sc.Err(); err != nil {
			return nil, err
		}
	}
	return bad, nil
}

// parseProcAddr parses /proc/net/tcp's "0100007F:1F90" (the address in
// host byte order, 32-bit words).
func parseProcAddr(s string) (netip.Addr, uint16, error) {
	h, p, ok := strings.Cut(s, ":")
	if !ok {
		return netip.Addr{}, 0, fmt.Errorf("bad address %q", s)
	}
	b, err := hex.DecodeString(h)
	if err != nil || (len(b) != 4 && len(b) != 16) {
		return netip.Addr{}, 0, fmt.Errorf("bad address %q", s)
	}
	for i := 0; i < len(b); i += 4 { // each 32-bit word is little-endian
		b[i], b[i+1], b[i+2], b[i+3] = b[i+3], b[i+2], b[i+1], b[i]
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.Addr{}, 0, fmt.Errorf("bad port in %q", s)
	}
	addr, _ := netip.AddrFromSlice(b)
	return addr, uint16(port), nil
}

// NonLoopbackListeners reports every control-plane process's sockets
// that are not on loopback, by process name.
func (cp *ControlPlane) NonLoopbackListeners() (map[string][]string, error) {
	m := map[string][]string{}
	for _, p := range cp.procs {
		bad, err := NonLoopbackListeners(p.Pid())
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p.Name, err)
		}
		if len(bad) > 0 {
			m[p.Name] = bad
		}
	}
	return m, nil
}
