package podnet

// IstioSidecarRules are the nat rules istio-iptables (Istio's sidecar init,
// tools/istio-iptables/pkg/capture) installs for a default sidecar in
// REDIRECT mode, TCP, without DNS capture, in its order: inbound to 15006
// except the tunnel (15008) and the agent's ports (15090, 15021, 15020);
// outbound to 15001 except the proxy's own (uid or gid 1337: its dials to
// the pod's own address over lo go to 15006, the inbound hairpin), the
// application's over lo (its own address, other loopback addresses) and
// 127.0.0.1. Each rule is iptables arguments.
func IstioSidecarRules() [][]string {
	const uid = "1337"
	rules := [][]string{
		{"-t", "nat", "-N", "ISTIO_INBOUND"},
		{"-t", "nat", "-N", "ISTIO_REDIRECT"},
		{"-t", "nat", "-N", "ISTIO_IN_REDIRECT"},
		{"-t", "nat", "-N", "ISTIO_OUTPUT"},
		{"-t", "nat", "-A", "ISTIO_INBOUND", "-p", "tcp", "--dport", "15008", "-j", "RETURN"},
		{"-t", "nat", "-A", "ISTIO_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001"},
		{"-t", "nat", "-A", "ISTIO_IN_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15006"},
		{"-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-j", "ISTIO_INBOUND"},
	}
	for _, port := range []string{"15090", "15021", "15020"} {
		rules = append(rules, []string{"-t", "nat", "-A", "ISTIO_INBOUND", "-p", "tcp", "--dport", port, "-j", "RETURN"})
	}
	rules = append(rules,
		[]string{"-t", "nat", "-A", "ISTIO_INBOUND", "-p", "tcp", "-j", "ISTIO_IN_REDIRECT"},
		[]string{"-t", "nat", "-A", "OUTPUT", "-j", "ISTIO_OUTPUT"},
		[]string{"-t", "nat", "-A", "ISTIO_OUTPUT", "-s", "127.0.0.6/32", "-o", "lo", "-j", "RETURN"})
	for _, owner := range []string{"--uid-owner", "--gid-owner"} {
		rules = append(rules,
			[]string{"-t", "nat", "-A", "ISTIO_OUTPUT", "!", "-d", "127.0.0.1/32", "-o", "lo", "-p", "tcp", "!", "--dport", "15008",
				"-m", "owner", owner, uid, "-j", "ISTIO_IN_REDIRECT"},
			[]string{"-t", "nat", "-A", "ISTIO_OUTPUT", "-o", "lo", "-m", "owner", "!", owner, uid, "-j", "RETURN"},
			[]string{"-t", "nat", "-A", "ISTIO_OUTPUT", "-m", "owner", owner, uid, "-j", "RETURN"})
	}
	return append(rules,
		[]string{"-t", "nat", "-A", "ISTIO_OUTPUT", "-d", "127.0.0.1/32", "-j", "RETURN"},
		[]string{"-t", "nat", "-A", "ISTIO_OUTPUT", "-j", "ISTIO_REDIRECT"})
}
