package bench

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/integration/sim"
)

// The sidecar-pair arms: two pods outside the ambient mesh, each keeping an
// Istio-style sidecar (haproxy in Envoy's place, uid 1337) captured by the
// rules Istio's sidecar init (istio-iptables) installs
// (podnet.IstioSidecarRules): the client application's dial to the server's
// pod IP goes to its sidecar's 15001; that sidecar dials the original
// destination (SO_ORIGINAL_DST) as uid 1337, which the outbound capture
// exempts; in the server pod the inbound capture sends it to the server
// sidecar's 15006, which dials the application over loopback on the
// original port. Three legs:
//
//	app → 15001 │ sidecar → server pod's 15006 │ sidecar → app (loopback)
//
// sidecar-pair: iptables captures, NAT rewrites the first two legs, nothing
// is spliced. sidecar-pair-spliced: both pods get the kernel's sidecar
// capture (bpf.SetSidecarPinned: SPLICE_NS_INPOD|SPLICE_NS_SIDECAR and
// kmesh_sidecar, what the kmesh.dev/splice annotation makes the daemon do
// for a pod with the default capture): connect4 sends the application to
// its pod address's 15001 and the client sidecar to the server pod's 15006
// before any packet exists, kmesh_getsockopt answers SO_ORIGINAL_DST, and
// with no NAT on any leg all three are spliced. The iptables rules are the
// same in both arms.

// Sidecar ports, Istio's.
const (
	sidecarOutbound = 15001
	sidecarInbound  = 15006
	sidecarUID      = 1337
)

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
		for _, r := range podnet.IstioSidecarRules() {
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
		if err := bpf.SetSidecarPinned(filepath.Join(sim.PinParent, e.cluster.ID, e.cluster.Nodes[a.node].Name), cookie, p.Net.IPv4); err != nil {
			return fmt.Errorf("opting %s into splicing: %w", p.Key(), err)
		}
	}
	return nil
}
