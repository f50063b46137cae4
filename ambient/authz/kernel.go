package authz

import (
	"net/netip"
	"slices"

	"kmesh.dev/kmesh/ambient/identity/spiffe"
)

// The kernel form of a destination's policies, for same-node connections.
//
// On this node the kernel knows who connects: the connecting pod's network
// namespace maps to its enrolled workload, and so to its identity and
// addresses. Every input of Evaluate is then known to the daemon except
// the destination port: the source is one of finitely many local workloads
// and the destination is the workload itself. So the daemon evaluates the
// policies with this very evaluator for every (destination, source, address
// family) pair, and the only thing the kernel looks up is the answer. Ports
// are the one open input, and the policies compare them for equality only:
// every port the policies do not name gets the same verdict, so a pair's
// answer is a default verdict plus the named ports where it differs. The
// kernel's verdict is therefore Evaluate's by construction, whatever the
// rules say (principals, namespaces, CIDRs, not-variants, DENY before
// ALLOW), and what cannot be expressed is a matter of size, not of rule
// kinds (istiod sends node proxies L4 rules only).

// KernelPorts is how many ports one kernel entry can single out
// (KMESH_AUTHZ_PORTS).
const KernelPorts = 16

// Why a destination's policies stay with the node proxy (the tunnel).
const (
	// KernelDryRun: dry-run policies apply; only the proxy reports what
	// they would have done.
	KernelDryRun = "dry_run"
	// KernelTooManyPorts: the policies name more ports than an entry holds.
	KernelTooManyPorts = "too_many_ports"
	// KernelDestinationAddresses: the policies name destination IPs and the
	// workload has several addresses of one family, which the kernel's
	// entry (per family) cannot tell apart.
	KernelDestinationAddresses = "destination_addresses"
	// KernelNotCompiled: the caller had policies but no compiled set.
	KernelNotCompiled = "not_compiled"
)

// Peer is a workload of this node as the kernel entries see it.
type Peer struct {
	// ID is its backend id (what the kernel knows it by).
	ID    uint32
	Addrs []netip.Addr
	// Identity is the identity of its certificate; nil when unknown (no
	// entry is made for it as a source: its connections take the tunnel).
	Identity *spiffe.Identity
}

// PairVerdict is the verdict for connections from Src to the destination
// over one address family: Allow for every destination port but Except.
type PairVerdict struct {
	Src    uint32
	V6     bool
	Allow  bool
	Except []uint16
}

// ports returns the distinct ports the enforced policies name (ports and
// not_ports), sorted. A port above 65535 matches no connection and is left
// out. Dry-run policies do not count: a set with any is not compiled.
func (s *Set) ports() []uint16 {
	var out []uint16
	add := func(l []uint32) {
		for _, p := range l {
			if p <= 65535 && !slices.Contains(out, uint16(p)) {
				out = append(out, uint16(p))
			}
		}
	}
	for _, list := range [][]policy{s.deny, s.allow} {
		for _, p := range list {
			for _, g := range p.groups {
				for _, r := range g.rules {
					for _, m := range r.oneOf {
						add(m.ports)
						add(m.notPorts)
					}
				}
			}
		}
	}
	slices.Sort(out)
	return out
}

func (s *Set) namesDestinationIPs() bool {
	for _, list := range [][]policy{s.deny, s.allow} {
		for _, p := range list {
			for _, g := range p.groups {
				for _, r := range g.rules {
					for _, m := range r.oneOf {
						if len(m.dstIPs)+len(m.notDstIPs) > 0 {
							return true
						}
					}
				}
			}
		}
	}
	return false
}

// KernelReason says why the set cannot be evaluated by the kernel for dst,
// or "" when it can. A nil set (no policies) can.
func (s *Set) KernelReason(dst []netip.Addr) string {
	if s == nil {
		return ""
	}
	if len(s.dryAllow)+len(s.dryDeny) > 0 {
		return KernelDryRun
	}
	if len(s.ports()) > KernelPorts {
		return KernelTooManyPorts
	}
	if s.namesDestinationIPs() {
		var n [2]int
		for _, a := range dst {
			if a = a.Unmap(); a.Is4() {
				n[0]++
			} else {
				n[1]++
			}
		}
		if n[0] > 1 || n[1] > 1 {
			return KernelDestinationAddresses
		}
	}
	return ""
}

// KernelVerdicts evaluates the set for connections from every source to
// dst, per address family both have an address of. It returns nil when
// KernelReason is not "". A source without identity gets no verdict, and
// neither does one with several addresses of a family that the policies
// tell apart (the kernel does not know which one a socket uses): their
// connections take the tunnel.
func (s *Set) KernelVerdicts(dst Peer, srcs []Peer) []PairVerdict {
	if s == nil || s.KernelReason(dst.Addrs) != "" {
		return nil
	}
	ports := s.ports()
	// Any port the policies do not name stands for all of them.
	other := uint16(1)
	for slices.Contains(ports, other) {
		other++
	}
	var out []PairVerdict
	for _, v6 := range []bool{false, true} {
		dstIP, ok := firstOfFamily(dst.Addrs, v6)
		if !ok {
			continue
		}
		for _, src := range srcs {
			if src.Identity == nil || src.ID == 0 {
				continue
			}
			var pv *PairVerdict
			agree := true
			for _, srcIP := range src.Addrs {
				if srcIP = srcIP.Unmap(); srcIP.Is6() != v6 {
					continue
				}
				c := Conn{SrcIP: srcIP, DstIP: dstIP, SrcIdentity: src.Identity}
				got := PairVerdict{Src: src.ID, V6: v6}
				c.DstPort = other
				got.Allow = s.Evaluate(c).Allow
				for _, p := range ports {
					c.DstPort = p
					if s.Evaluate(c).Allow != got.Allow {
						got.Except = append(got.Except, p)
					}
				}
				if pv == nil {
					pv = &got
				} else if pv.Allow != got.Allow || !slices.Equal(pv.Except, got.Except) {
					agree = false
				}
			}
			if pv != nil && agree {
				out = append(out, *pv)
			}
		}
	}
	return out
}

func firstOfFamily(addrs []netip.Addr, v6 bool) (netip.Addr, bool) {
	for _, a := range addrs {
		if a = a.Unmap(); a.Is6() == v6 {
			return a, true
		}
	}
	return netip.Addr{}, false
}
