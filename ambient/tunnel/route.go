package tunnel

import (
	"errors"
	"fmt"
	"net/netip"

	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/ambient/identity"
	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/bpf"
)

// Directory is the part of the control-plane state the tunnel reads.
// *state.Store implements it.
type Directory interface {
	Workload(uid string) *state.Workload
	WorkloadByAddr(state.NetworkAddr) *state.Workload
	ServiceByVIP(state.NetworkAddr) *state.Service
	ServicesByHostname(string) []*state.Service
	Endpoints(key string) []state.Endpoint
	PoliciesFor(*state.Workload) []state.Policy
}

// Route is how the proxy carries one outbound connection.
type Route struct {
	// Plain: connect straight to Dial without HBONE (the destination is
	// not in the mesh).
	Plain bool
	// Dial is the peer's HBONE address (ip:15008), or the destination of a
	// plain connection.
	Dial netip.AddrPort
	// Target is the CONNECT :authority: the workload ip:port, or the
	// service VIP:port when a waypoint balances.
	Target netip.AddrPort
	// Identity is the SPIFFE identity the peer's certificate must carry.
	Identity identity.Identity
	// Dst is the workload at Dial: the destination, or its waypoint.
	Dst *state.Workload
	// Service is the service the application dialled, if it dialled one.
	Service  *state.Service
	Waypoint bool
}

// ErrNoRoute wraps every routing failure: the proxy answers the
// application with a reset.
var ErrNoRoute = errors.New("no route")

// defaultTrustDomain is Istio's; istiod omits it on workloads that use it.
const defaultTrustDomain = "cluster.local"

// WorkloadIdentity is the SPIFFE identity of a workload, as istiod defines it.
func WorkloadIdentity(w *state.Workload) identity.Identity {
	m := w.Meta()
	id := identity.Identity{TrustDomain: m.TrustDomain, Namespace: m.Namespace, ServiceAccount: m.ServiceAccount}
	if id.TrustDomain == "" {
		id.TrustDomain = defaultTrustDomain
	}
	if id.ServiceAccount == "" {
		id.ServiceAccount = "default"
	}
	return id
}

// Picker decides a connection exactly as the kernel's connect program
// would, from the kernel's own records (*dataplane.Dataplane).
type Picker interface {
	Pick(dst netip.AddrPort, proto bpf.Proto, slot, coin uint32) dataplane.Decision
}

// Resolve decides how an outbound connection the kernel sent to the proxy
// travels, from the verdict the kernel recorded and followed:
//
//   - PathWaypoint: HBONE to one of the waypoint's workloads, CONNECT to
//     the original destination (the waypoint balances);
//   - PathTunnel: HBONE to the backend the kernel's load balancer chose,
//     CONNECT backend-ip:port. The backend must be a mesh workload known
//     here; when it is not (the state changed under the connection, or the
//     record is wrong) the connection is refused: what the kernel sent for
//     mTLS never leaves in plaintext.
//
// Any other verdict is not the proxy's to carry and is refused. The
// network is the node's: addresses are looked up within it. rnd picks a
// waypoint instance.
func Resolve(dir Directory, network string, orig bpf.TunnelOrig, rnd func() uint32) (Route, error) {
	na := func(a netip.Addr) state.NetworkAddr { return state.NetworkAddr{Network: network, Addr: a.Unmap()} }
	svc := dir.ServiceByVIP(na(orig.Dst.Addr()))
	switch orig.Path {
	case bpf.PathWaypoint:
		var gw *state.GatewayAddress
		if svc != nil {
			gw = svc.Waypoint
		} else if w := dir.WorkloadByAddr(na(orig.Dst.Addr())); w != nil {
			gw = w.Waypoint
		}
		if gw == nil {
			return Route{}, fmt.Errorf("%w: %s has no waypoint any more", ErrNoRoute, orig.Dst)
		}
		wp, err := resolveGateway(dir, network, gw, orig.Dst.Addr(), rnd)
		if err != nil {
			return Route{}, err
		}
		port := gw.HBONEMTLSPort
		if port == 0 {
			port = bpf.HBONEPort
		}
		addr, ok := sameFamily(wp.Addresses, orig.Dst.Addr())
		if !ok {
			return Route{}, fmt.Errorf("%w: waypoint %s has no address", ErrNoRoute, wp.Name)
		}
		return Route{Dial: netip.AddrPortFrom(addr, port), Target: orig.Dst, Identity: WorkloadIdentity(wp),
			Dst: wp, Service: svc, Waypoint: true}, nil
	case bpf.PathTunnel:
		backend := netip.AddrPortFrom(orig.Backend.Addr().Unmap(), orig.Backend.Port())
		if !backend.IsValid() {
			return Route{}, fmt.Errorf("%w: the kernel sent %s to the tunnel without a backend", ErrNoRoute, orig.Dst)
		}
		w := dir.WorkloadByAddr(na(backend.Addr()))
		if w == nil || !w.HBONE {
			return Route{}, fmt.Errorf("%w: the kernel sent %s to the tunnel for mTLS to %s, which is not a mesh workload here "+
				"(the control plane changed it since?): refused, never sent in plaintext", ErrNoRoute, orig.Dst, backend)
		}
		return Route{Dial: netip.AddrPortFrom(backend.Addr(), bpf.HBONEPort), Target: backend,
			Identity: WorkloadIdentity(w), Dst: w, Service: svc}, nil
	}
	return Route{}, fmt.Errorf("%w: the kernel recorded verdict %s for %s, which the proxy does not carry", ErrNoRoute, orig.Path, orig.Dst)
}

// ResolveCaptured decides a connection the kernel did not see: one
// istio-cni's iptables rules sent to 15001, known only by its original
// destination. lb makes the kernel's decision for it (the same records,
// alias tables, weights, locality and verdicts), and the verdict is then
// carried as the kernel's would be: direct and plaintext destinations are
// dialled as they are, tunnel and waypoint ones through Resolve.
func ResolveCaptured(dir Directory, lb Picker, network string, dst netip.AddrPort, rnd func() uint32) (Route, error) {
	if lb == nil {
		return Route{}, fmt.Errorf("%w: no view of the kernel's records to decide %s", ErrNoRoute, dst)
	}
	d := lb.Pick(dst, bpf.TCP, rnd(), rnd())
	if d.Err != 0 {
		return Route{}, fmt.Errorf("%w: %s refused (%v)", ErrNoRoute, dst, d.Err)
	}
	switch d.Path {
	case bpf.PathTunnel, bpf.PathAuthz:
		// AUTHZ: the kernel would have authorized it with the source's
		// identity; a connection the kernel did not see is already at the
		// proxy, which carries it over HBONE and the destination's 15008
		// authorizes it.
		return Resolve(dir, network, bpf.TunnelOrig{Dst: dst, Backend: d.To, Path: bpf.PathTunnel}, rnd)
	case bpf.PathWaypoint:
		return Resolve(dir, network, bpf.TunnelOrig{Dst: dst, Path: bpf.PathWaypoint}, rnd)
	}
	// PathDirect, PathPlain, PathPassthrough: straight to where the kernel
	// would have connected. That includes a service's VIP on a port the
	// service lacks when Pick let it through: Pick refuses a Kubernetes
	// Service's ClusterIP there (kmesh_vip: nothing else answers at it),
	// and leaves a ServiceEntry's address alone, as the kernel does (it
	// may be a real host's, reachable on ports the entry does not name).
	na := func(a netip.Addr) state.NetworkAddr { return state.NetworkAddr{Network: network, Addr: a.Unmap()} }
	return Route{Plain: true, Dial: d.To, Target: d.To, Dst: dir.WorkloadByAddr(na(d.To.Addr())), Service: dir.ServiceByVIP(na(dst.Addr()))}, nil
}

// resolveGateway finds a workload of a waypoint: the address is the
// waypoint service's VIP (or a workload IP); a hostname names the service.
func resolveGateway(dir Directory, network string, gw *state.GatewayAddress, dst netip.Addr, rnd func() uint32) (*state.Workload, error) {
	var svc *state.Service
	if gw.Address != nil {
		a := *gw.Address
		a.Addr = a.Addr.Unmap()
		if w := dir.WorkloadByAddr(a); w != nil {
			return w, nil
		}
		svc = dir.ServiceByVIP(a)
	} else if gw.Hostname != "" {
		_, host := splitKey(gw.Hostname)
		for _, s := range dir.ServicesByHostname(host) {
			if s.Key() == gw.Hostname || gw.Hostname == host {
				svc = s
				break
			}
		}
	}
	if svc == nil {
		return nil, fmt.Errorf("%w: waypoint %+v is unknown", ErrNoRoute, gw)
	}
	eps := healthy(dir.Endpoints(svc.Key()), dst)
	if len(eps) == 0 {
		return nil, fmt.Errorf("%w: waypoint %s has no healthy workload", ErrNoRoute, svc.Key())
	}
	return eps[uint32((uint64(rnd())*uint64(len(eps)))>>32)].Workload, nil
}

func healthy(eps []state.Endpoint, family netip.Addr) []state.Endpoint {
	out := eps[:0:0]
	for _, ep := range eps {
		if _, ok := sameFamily(ep.Workload.Addresses, family); ok && ep.Workload.Healthy && ep.Workload.Capacity > 0 {
			out = append(out, ep)
		}
	}
	return out
}

// sameFamily picks the address of the family of like (IPv4 or IPv6).
func sameFamily(addrs []netip.Addr, like netip.Addr) (netip.Addr, bool) {
	v4 := like.Unmap().Is4()
	for _, a := range addrs {
		if a.Unmap().Is4() == v4 {
			return a.Unmap(), true
		}
	}
	return netip.Addr{}, false
}

func splitKey(k string) (ns, host string) {
	for i := 0; i < len(k); i++ {
		if k[i] == '/' {
			return k[:i], k[i+1:]
		}
	}
	return "", k
}
