package dataplane

import (
	"net/netip"
	"syscall"

	"kmesh.dev/kmesh/bpf"
)

// Decision is where a connection goes and how, as the kernel's connect
// program decides it (bpf/include/kmesh_decide.h).
type Decision struct {
	// Err is the errno the connection fails with; 0 when it proceeds.
	Err syscall.Errno
	// Path is the verdict followed (bpf.PathRefuse when Err is set).
	Path bpf.Path
	// To is where the connection goes: the chosen backend when Rewritten,
	// else the destination as dialled.
	To        netip.AddrPort
	Rewritten bool
	// Backend is the workload reached (0: none known, e.g. a waypoint
	// balances); WorkloadUID is its UID.
	Backend     uint32
	WorkloadUID string
}

// Pick decides a connection to dst over proto exactly as the kernel's
// connect program does, from the same records, with the load balancer's two
// random numbers given: slot picks the alias-table slot, coin the slot's
// primary or alias. The node proxy uses it for connections the kernel did
// not see (captured by istio-cni's iptables), so they are balanced with the
// same tables, weights, locality and verdicts; the kernel-tier differential
// test checks that Pick and the kernel agree for the same numbers.
func (d *Dataplane) Pick(dst netip.AddrPort, proto bpf.Proto, slot, coin uint32) Decision {
	d.mu.Lock()
	defer d.mu.Unlock()
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	out := Decision{To: dst, Path: bpf.PathPlain}
	tcp := proto == bpf.TCP
	refuse := func(errno syscall.Errno) Decision {
		out.Err, out.Path = errno, bpf.PathRefuse
		return out
	}

	var be *resolvedWorkload
	if fe, ok := d.fe.get(bpf.FrontendKey{Addr: dst.Addr(), Port: dst.Port(), Proto: proto}); ok && fe.val.Kind == bpf.FrontendService {
		out.Path = fe.val.Path
		switch fe.val.Path {
		case bpf.PathPassthrough:
			return out
		case bpf.PathBalance:
		default: // WAYPOINT (the waypoint balances) or REFUSE
			return d.final(out, tcp)
		}
		ls := d.sets[fe.val.ID]
		if ls == nil || ls.table == nil {
			return refuse(syscall.ECONNREFUSED)
		}
		fam := int(bpf.FamilyOf(dst.Addr()))
		var bucket []bpf.EndpointSlot
		for r := range bpf.MaxRanks {
			if bucket = ls.table.bucket(fam, r); len(bucket) > 0 {
				break
			}
		}
		if len(bucket) == 0 {
			return refuse(syscall.ECONNREFUSED)
		}
		// The kernel's draw: multiply-shift for the slot, then the
		// threshold for primary or alias.
		s := bucket[uint32((uint64(slot)*uint64(len(bucket)))>>32)]
		id, port := s.Backend, s.Port
		if coin >= s.Threshold {
			id, port = s.Alias, s.AliasPort
		}
		if be = d.backendByID(id); be == nil {
			return refuse(syscall.ECONNREFUSED)
		}
		b := d.backendOf(be)
		addr := b.Addr4
		if fam == int(bpf.FamilyV6) {
			addr = b.Addr6
		}
		if !addr.IsValid() {
			return refuse(syscall.EHOSTUNREACH)
		}
		if port == 0 {
			port = fe.val.TargetPort
		}
		out.To, out.Rewritten = netip.AddrPortFrom(addr, port), true
		out.Path = b.PathSvc
		if !tcp {
			out.Path = b.PathUDP
		}
	} else if id, ok := d.wlFE[addrKey(dst.Addr())]; ok {
		if tcp && dst.Port() == bpf.HBONEPort {
			return out // already HBONE: left alone
		}
		if be = d.backendByID(id); be == nil {
			return refuse(syscall.ECONNREFUSED)
		}
		b := d.backendOf(be)
		out.Path = b.PathAddr
		if !tcp {
			out.Path = b.PathUDP
		}
	} else if d.isVIP(dst.Addr()) {
		return refuse(syscall.ECONNREFUSED) // a VIP on a port its service lacks
	} else {
		return out // not Kmesh's: left alone
	}
	out.Backend, out.WorkloadUID = be.backend, be.uid
	return d.final(out, tcp)
}

// final applies the kernel's last check: only final verdicts proceed, and
// UDP never goes to the node proxy.
func (d *Dataplane) final(out Decision, tcp bool) Decision {
	if tcp && out.Path == bpf.PathAuthz {
		return out // as decide(): the connect program finishes it (authz_decide)
	}
	if out.Path < bpf.PathDirect || out.Path > bpf.PathWaypoint || (!tcp && out.Path.ViaProxy()) {
		out.Err, out.Path = syscall.ECONNREFUSED, bpf.PathRefuse
	}
	return out
}

func (d *Dataplane) backendByID(id uint32) *resolvedWorkload {
	if int(id) < len(d.byBackend) {
		return d.byBackend[id]
	}
	return nil
}
