package bench

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/sim"
)

// The sidecar-pair arms: two pods outside the ambient mesh, each keeping an
// Istio-style sidecar (haproxy in Envoy's place, uid 1337) captured the way
// Istio's sidecar init (istio-iptables) captures: the client application's
// dial to the server's pod IP is REDIRECTed to its sidecar's 15001; that
// sidecar dials the original destination (SO_ORIGINAL_DST) as uid 1337,
// which the capture exempts; in the server pod the inbound REDIRECT sends it
// to the server sidecar's 15006, which dials the application over loopback
// on the original port. Three legs:
//
//	app ─NAT→ 15001 │ sidecar ─pod-to-pod, NAT'd at 15006→ sidecar │ sidecar → app (loopback)
//
// sidecar-pair-spliced opts both pods' netns into SPLICE_NS_INPOD, which
// splices the only leg whose two ends name the same 4-tuple: the server
// sidecar's loopback dial to the application. The other two legs are
// rewritten by NAT, so the two ends' keys differ (docs/sockmap.md): the
// client leg's application socket names the original destination and the
// sidecar's the 15001 listener; the pod-to-pod leg's client names
// podIP:port and the server end podIP:15006. Pairing them without the port
// the NAT rewrote (Istio's inbound capture may exclude ports, and Linux
// reuses an ephemeral port for different destinations) could hand one
// connection's bytes to another's socket, so they stay on TCP.

// Sidecar ports, Istio's.
const (
	sidecarOutbound = 15001
	sidecarInbound  = 15006
	sidecarUID      = 1337
)

// sidecarCapture is Istio's sidecar init reduced to TCP (as
// bpf.TestPrivilegedSidecarSplice installs it): outbound to 15001 except
// the proxy's own (uid 1337) and loopback; inbound to 15006 except HBONE.
func sidecarCapture() [][]string {
	return [][]string{
		{"-t", "nat", "-N", "ISTIO_OUTPUT"},
		{"-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "ISTIO_OUTPUT"},
		{"-t", "nat", "-A", "ISTIO_OUTPUT", "-m", "owner", "--uid-owner", fmt.Sprint(sidecarUID), "-j", "RETURN"},
		{"-t", "nat", "-A", "ISTIO_OUTPUT", "-d", "127.0.0.1/32", "-j", "RETURN"},
		{"-t", "nat", "-A", "ISTIO_OUTPUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", fmt.Sprint(sidecarOutbound)},
		{"-t", "nat", "-N", "ISTIO_INBOUND"},
		{"-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-j", "ISTIO_INBOUND"},
		{"-t", "nat", "-A", "ISTIO_INBOUND", "-p", "tcp", "--dport", "15008", "-j", "RETURN"},
		{"-t", "nat", "-A", "ISTIO_INBOUND", "-p", "tcp", "-j", "REDIRECT", "--to-ports", fmt.Sprint(sidecarInbound)},
	}
}

// sidecarConfig is one sidecar: it listens on port and forwards every
// connection to the destination the capture rewrote (haproxy reads it with
// SO_ORIGINAL_DST): the client sidecar to the original address and port
// (server address 0.0.0.0), the server sidecar to the application on
// loopback at the original port (no port on the server line). Plain TCP,
// no PROXY header: the original destination survives the NAT, as with
// Istio's sidecars. No splice(2) options: a spliced socket read with
// splice(2) loses data on Linux 6.18 (docs/sockmap.md).
func sidecarConfig(port int, upstream string) string {
	return fmt.Sprintf(`global
    nbthread 1
    maxconn 8000
    uid %d
    gid %d
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend f
    bind :%d
    default_backend b
backend b
    server s %s
`, sidecarUID, sidecarUID, port, upstream)
}

// sidecarPair turns client and server into a sidecar pair for arm a. The
// server's tools must already run; its sidecar is the arm's overhead.
func (e *Env) sidecarPair(a *Arm, server *sim.Pod, splice bool) error {
	for _, p := range []*sim.Pod{a.client, server} {
		for _, r := range sidecarCapture() {
			if err := e.iptables(p, r...); err != nil {
				return err
			}
		}
	}
	start := func(p *sim.Pod, cpu int, name, cfg string) (int, error) {
		path := filepath.Join(e.dir, a.Name+"-"+name+".cfg")
		if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
			return 0, err
		}
		logf, err := os.Create(path + ".log")
		if err != nil {
			return 0, err
		}
		defer logf.Close()
		cmd := exec.Command("taskset", "-c", fmt.Sprint(cpu), "haproxy", "-db", "-f", path)
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := p.Start(cmd); err != nil {
			return 0, err
		}
		return cmd.Process.Pid, nil
	}
	cpid, err := start(a.client, 0, "client", sidecarConfig(sidecarOutbound, "0.0.0.0"))
	if err != nil {
		return err
	}
	spid, err := start(server, 1, "server", sidecarConfig(sidecarInbound, "127.0.0.1"))
	if err != nil {
		return err
	}
	a.proxies = []int{cpid, spid}
	if !splice {
		return nil
	}
	for _, p := range []*sim.Pod{a.client, server} {
		cookie, err := p.Net.NS.Cookie()
		if err != nil {
			return err
		}
		if err := bpf.SetSpliceNSPinned(filepath.Join(sim.PinParent, e.cluster.ID, e.cluster.Nodes[a.node].Name), cookie, bpf.SpliceInPod); err != nil {
			return fmt.Errorf("opting %s into splicing: %w", p.Key(), err)
		}
	}
	return nil
}
