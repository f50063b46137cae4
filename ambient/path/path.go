// Package path decides, in one place, how connections from this node's
// pods to a destination travel: straight through the kernel, in plaintext,
// through the node proxy's HBONE tunnel, through a waypoint, or not at all.
//
// The verdicts are written into the kernel's records (a service frontend's
// path, a backend's path_svc / path_addr / path_udp); the connect programs
// follow them without re-deriving anything, and the node proxy obeys the
// verdict the kernel recorded for each connection it is handed. Connections
// the kernel did not see (istio-cni's iptables capture) are decided from the
// same records (ambient/dataplane Pick).
//
// Verdicts for a destination workload (TCP):
//
//	destination                                    | by service | by its own IP
//	-----------------------------------------------+------------+--------------
//	on another network                             | refuse     | refuse
//	has a waypoint of its own                      | (below)    | waypoint
//	outside the mesh (no HBONE)                    | plain      | plain
//	in the mesh, on this node, no policies         | direct     | direct
//	in the mesh, on this node, policies the kernel | authz      | authz
//	  evaluates (KernelAuthz)                      |            |
//	in the mesh, on this node, other policies      | tunnel     | tunnel
//	in the mesh, on another node (or node unknown) | tunnel     | tunnel
//
// A workload's own waypoint applies to traffic addressed to the workload
// only; traffic addressed to a service follows the service's waypoint (see
// Service), as ztunnel does. Same-node workloads with authorization policies
// (STRICT PeerAuthentication arrives as one) get AUTHZ when the daemon
// compiled their policies into the kernel (ambient/authz KernelVerdicts): the
// connect program evaluates them with the connecting pod's identity, which
// the kernel attests (its enrolment), and goes direct or refuses; a pair it
// has no verdict for takes the tunnel. Policies the kernel cannot hold take
// the tunnel, whose inbound side enforces them. Either way the inbound
// verdict is TUNNEL: plaintext from outside the mesh still goes to 15006
// (the inbound program lets through connections the connect program
// authorized). Another network is refused, never sent in plaintext: reaching it
// needs its network gateway (double HBONE), which Kmesh does not do yet.
//
// UDP never goes through the node proxy (neither ztunnel nor waypoints carry
// it): direct to a mesh workload on this node, plain to any other workload
// of this network, refused to another network.
//
// Inbound: plaintext TCP that reaches a mesh workload on this node from
// outside the node proxy (a pod outside the mesh, another node's
// plaintext) goes to the proxy's 15006 — tunnel — when authorization
// policies apply to the workload (STRICT mTLS arrives as one), so they are
// evaluated; direct otherwise, at no cost. The kernel's inbound program
// (bpf/sk_lookup.c) also sends an address it does not know to the proxy,
// which refuses what it does not know.
package path

import "kmesh.dev/kmesh/bpf"

// Node is where connections start: this node.
type Node struct {
	// Name is the node's name; "" when not configured (no workload is then
	// known to be local, and mesh workloads always take the tunnel).
	Name string
	// Network is the node's network; "" matches every network.
	Network string
}

// Workload is what a destination workload's verdicts depend on.
type Workload struct {
	// HBONE: the workload is in the mesh and accepts HBONE on 15008.
	HBONE bool
	// Node and Network say where it runs.
	Node, Network string
	// Waypoint: the workload has a waypoint of its own.
	Waypoint bool
	// Policies: authorization policies apply to the workload. Only asked of
	// workloads on this node (for the others it changes nothing).
	Policies bool
	// KernelAuthz: those policies are compiled into the kernel for
	// same-node sources (only meaningful with Policies).
	KernelAuthz bool
}

// Verdicts are a workload's verdicts, as bpf.Backend carries them.
type Verdicts struct {
	// Service: TCP reaching the workload through a service's load balancer.
	Service bpf.Path
	// Addr: TCP addressed to one of the workload's own IPs.
	Addr bpf.Path
	// UDP, either way.
	UDP bpf.Path
	// Inbound: plaintext TCP arriving at the workload from outside the
	// node proxy (only asked of workloads on this node).
	Inbound bpf.Path
}

// Local reports whether dst runs on src's node.
func Local(src Node, dst Workload) bool {
	return src.Name != "" && dst.Node == src.Name
}

func sameNetwork(src Node, dst Workload) bool {
	return src.Network == "" || dst.Network == "" || src.Network == dst.Network
}

// ForWorkload decides a destination workload's verdicts.
func ForWorkload(src Node, dst Workload) Verdicts {
	if !sameNetwork(src, dst) {
		return Verdicts{Service: bpf.PathRefuse, Addr: bpf.PathRefuse, UDP: bpf.PathRefuse, Inbound: bpf.PathDirect}
	}
	var tcp, udp bpf.Path
	switch {
	case !dst.HBONE:
		tcp, udp = bpf.PathPlain, bpf.PathPlain
	case Local(src, dst) && !dst.Policies:
		tcp, udp = bpf.PathDirect, bpf.PathDirect
	case Local(src, dst) && dst.KernelAuthz:
		tcp, udp = bpf.PathAuthz, bpf.PathDirect
	case Local(src, dst):
		tcp, udp = bpf.PathTunnel, bpf.PathDirect
	default:
		tcp, udp = bpf.PathTunnel, bpf.PathPlain
	}
	v := Verdicts{Service: tcp, Addr: tcp, UDP: udp, Inbound: bpf.PathDirect}
	if dst.HBONE && Local(src, dst) && dst.Policies {
		v.Inbound = bpf.PathTunnel
	}
	if dst.Waypoint {
		v.Addr = bpf.PathWaypoint
	}
	return v
}

// Service is what a service port's verdict depends on.
type Service struct {
	// Passthrough: Istio's LoadBalancing mode PASSTHROUGH (the destination
	// is left as dialled).
	Passthrough bool
	// Waypoint: the service has a waypoint; its TCP traffic goes there and
	// the waypoint balances.
	Waypoint bool
}

// ForService decides the verdict of a service port for one protocol.
func ForService(s Service, proto bpf.Proto) bpf.Path {
	switch {
	case s.Passthrough:
		return bpf.PathPassthrough
	case s.Waypoint && proto == bpf.TCP:
		return bpf.PathWaypoint
	}
	return bpf.PathBalance
}
