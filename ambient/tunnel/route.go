package tunnel

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"

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

// Resolve decides how an outbound connection travels, from what the kernel
// recorded (or iptables' original destination, with no backend chosen):
//
//   - through a waypoint when the kernel said so: HBONE to one of the
//     waypoint's workloads, CONNECT to the original destination;
//   - otherwise to the backend the kernel's load balancer chose (or, with no
//     kernel choice, one picked here): HBONE to backend-ip:15008 and CONNECT
//     backend-ip:port when it is in the mesh, plain TCP when it is not.
//
// The network is the node's: addresses are looked up within it.
func Resolve(dir Directory, network string, orig bpf.TunnelOrig) (Route, error) {
	na := func(a netip.Addr) state.NetworkAddr { return state.NetworkAddr{Network: network, Addr: a.Unmap()} }
	svc := dir.ServiceByVIP(na(orig.Dst.Addr()))
	if orig.Waypoint {
		var gw *state.GatewayAddress
		if svc != nil {
			gw = svc.Waypoint
		} else if w := dir.WorkloadByAddr(na(orig.Dst.Addr())); w != nil {
			gw = w.Waypoint
		}
		if gw == nil {
			return Route{}, fmt.Errorf("%w: %s has no waypoint any more", ErrNoRoute, orig.Dst)
		}
		wp, err := resolveGateway(dir, network, gw, orig.Dst.Addr())
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
	}

	backend := orig.Backend
	if !backend.IsValid() {
		if svc == nil {
			backend = orig.Dst
		} else {
			ep, port, err := pickEndpoint(dir, svc, orig.Dst)
			if err != nil {
				return Route{}, err
			}
			addr, ok := sameFamily(ep.Addresses, orig.Dst.Addr())
			if !ok {
				return Route{}, fmt.Errorf("%w: endpoint %s of %s has no address of the family dialled", ErrNoRoute, ep.Name, svc.Key())
			}
			backend = netip.AddrPortFrom(addr, port)
		}
	}
	backend = netip.AddrPortFrom(backend.Addr().Unmap(), backend.Port())
	w := dir.WorkloadByAddr(na(backend.Addr()))
	if w == nil || !w.HBONE {
		return Route{Plain: true, Dial: backend, Target: backend, Dst: w, Service: svc}, nil
	}
	return Route{Dial: netip.AddrPortFrom(backend.Addr(), bpf.HBONEPort), Target: backend,
		Identity: WorkloadIdentity(w), Dst: w, Service: svc}, nil
}

// resolveGateway finds a workload of a waypoint: the address is the
// waypoint service's VIP (or a workload IP); a hostname names the service.
func resolveGateway(dir Directory, network string, gw *state.GatewayAddress, dst netip.Addr) (*state.Workload, error) {
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
	return eps[rand.IntN(len(eps))].Workload, nil
}

// pickEndpoint balances in user space, for connections the kernel did not
// balance (redirected by iptables): uniformly over healthy endpoints that
// serve the port. The kernel path does the full job (weights, locality).
func pickEndpoint(dir Directory, svc *state.Service, dst netip.AddrPort) (*state.Workload, uint16, error) {
	var sp *state.Port
	for i := range svc.Ports {
		if svc.Ports[i].ServicePort == dst.Port() {
			sp = &svc.Ports[i]
		}
	}
	if sp == nil {
		return nil, 0, fmt.Errorf("%w: service %s has no port %d", ErrNoRoute, svc.Key(), dst.Port())
	}
	type choice struct {
		w    *state.Workload
		port uint16
	}
	var cs []choice
	for _, ep := range healthy(dir.Endpoints(svc.Key()), dst.Addr()) {
		port := sp.TargetPort
		for _, p := range ep.Ports {
			if p.ServicePort == sp.ServicePort && p.TargetPort != 0 {
				port = p.TargetPort
			}
		}
		if port != 0 {
			cs = append(cs, choice{ep.Workload, port})
		}
	}
	if len(cs) == 0 {
		return nil, 0, fmt.Errorf("%w: service %s has no healthy endpoint for port %d", ErrNoRoute, svc.Key(), dst.Port())
	}
	c := cs[rand.IntN(len(cs))]
	return c.w, c.port, nil
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
