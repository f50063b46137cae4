package bpf

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// Constants mirrored from include/kmesh_consts.h (TestABIConstants checks them).
const (
	MaxRanks    = 8
	familyCount = 2
)

// Family indexes the per-family endpoint tables.
type Family uint8

const (
	FamilyV4 Family = 0
	FamilyV6 Family = 1
)

func (f Family) String() string {
	if f == FamilyV4 {
		return "ipv4"
	}
	return "ipv6"
}

// FamilyOf returns the endpoint table family an address belongs to.
func FamilyOf(a netip.Addr) Family {
	if a.Unmap().Is4() {
		return FamilyV4
	}
	return FamilyV6
}

// Proto is the IP protocol of a frontend.
type Proto uint8

const (
	TCP Proto = 6
	UDP Proto = 17
)

func (p Proto) String() string {
	switch p {
	case 0:
		return "any"
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	}
	return fmt.Sprintf("proto(%d)", uint8(p))
}

// FrontendKind says what a frontend address is.
type FrontendKind uint8

const (
	FrontendService  FrontendKind = 1
	FrontendWorkload FrontendKind = 2
)

// Path is a path verdict (PATH_* in kmesh_consts.h): how connections to a
// destination travel. ambient/path decides it; the kernel and the node proxy
// follow it. The zero value refuses, so a record nobody filled in fails
// closed.
type Path uint8

const (
	PathRefuse      Path = 0 // fail the connect (ECONNREFUSED)
	PathDirect      Path = 1 // kernel path, straight to a mesh workload on this node
	PathPlain       Path = 2 // straight to a workload outside the mesh, plaintext
	PathTunnel      Path = 3 // the node proxy carries it over HBONE to the workload
	PathWaypoint    Path = 4 // the node proxy carries it over HBONE to the waypoint
	PathBalance     Path = 5 // a service port: choose a backend, follow its verdict
	PathPassthrough Path = 6 // a PASSTHROUGH service: leave the destination alone
	// PathAuthz: a mesh workload on this node whose policies the kernel
	// evaluates (kmesh_authz) with the connecting pod's identity: direct
	// when they allow it, refused when they deny it, the tunnel when the
	// kernel has no verdict for the pair.
	PathAuthz Path = 7
	pathMax   Path = 8
)

var pathNames = [...]string{"refuse", "direct", "plain", "tunnel", "waypoint", "balance", "passthrough", "authz"}

func (p Path) String() string {
	if p < pathMax {
		return pathNames[p]
	}
	return fmt.Sprintf("path(%d)", uint8(p))
}

// ViaProxy reports whether the node proxy carries connections of this verdict.
func (p Path) ViaProxy() bool { return p == PathTunnel || p == PathWaypoint }

// LBMode mirrors Istio's LoadBalancing.Mode (service_value.mode).
type LBMode uint8

const (
	LBStandard    LBMode = 0
	LBStrict      LBMode = 1
	LBFailover    LBMode = 2
	LBPassthrough LBMode = 3
)

func (m LBMode) String() string {
	switch m {
	case LBStandard:
		return "standard"
	case LBStrict:
		return "strict"
	case LBFailover:
		return "failover"
	case LBPassthrough:
		return "passthrough"
	}
	return fmt.Sprintf("mode(%d)", uint8(m))
}

const (
	backendFlagHBONE    = 0x1
	backendFlagLocal    = 0x2
	backendFlagWaypoint = 0x4
	backendFlagPolicy   = 0x8
	backendFlagKAuthz   = 0x10
)

// AuthzPorts is how many ports one kmesh_authz entry can single out
// (KMESH_AUTHZ_PORTS).
const AuthzPorts = 16

// ProxyMark is the socket mark of the node proxy's own sockets (ztunnel's
// 0x539, which istio-cni's rules know too); the kernel path ignores them.
const ProxyMark = 0x539

// Ports of the node proxy inside every enrolled pod (ztunnel's).
const (
	OutboundPort     = 15001
	InboundPlainPort = 15006
	HBONEPort        = 15008
	DNSPort          = 15053
)

// FrontendKey is what a client connects to: a service VIP and port, or a
// workload IP (Port 0, matching every port).
type FrontendKey struct {
	Addr  netip.Addr
	Port  uint16 // host order
	Proto Proto
}

func (k FrontendKey) String() string {
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(k.Addr, k.Port), k.Proto)
}

// Frontend is one entry of kmesh_frontend.
type Frontend struct {
	Key  FrontendKey
	Kind FrontendKind
	// ID is the service id for FrontendService, the backend id for FrontendWorkload.
	ID uint32
	// TargetPort is where the service port forwards to, unless an endpoint
	// slot carries its own port.
	TargetPort uint16
	// Path is a service port's verdict: PathBalance (choose a backend and
	// follow its verdict), PathPassthrough, PathWaypoint (TCP through the
	// node proxy to the service's waypoint, which balances) or PathRefuse.
	// Workload frontends leave it zero: their backend's verdicts apply.
	Path Path
}

// Service is one entry of kmesh_service: the shape of a load-balancing set.
type Service struct {
	ID uint32
	// Counts[family][rank] is the number of alias-table slots.
	Counts [familyCount][MaxRanks]uint32
	Epoch  uint32
	Gen    uint8
	Mode   LBMode
}

// EndpointKey addresses one alias-table slot.
type EndpointKey struct {
	Service uint32
	Gen     uint8
	Family  Family
	Rank    uint8
	Index   uint32
}

// EndpointSlot is one alias-table slot: Backend with probability
// Threshold/2^32, otherwise Alias. Ports are target ports (0: the frontend's).
type EndpointSlot struct {
	Backend   uint32
	Alias     uint32
	Threshold uint32
	Port      uint16
	AliasPort uint16
}

// Endpoint is one entry of kmesh_endpoint.
type Endpoint struct {
	Key  EndpointKey
	Slot EndpointSlot
}

// Backend is one entry of kmesh_backend: a workload.
type Backend struct {
	ID       uint32
	Addr4    netip.Addr // invalid when the workload has no IPv4 address
	Addr6    netip.Addr // invalid when the workload has no IPv6 address
	Identity uint32
	Capacity uint32
	// Paths are the verdicts the kernel follows: PathSvc for TCP reaching
	// the workload through a service's load balancer, PathAddr for TCP to
	// one of its own addresses, PathUDP for UDP either way, PathIn for
	// plaintext TCP arriving at the workload from outside the node proxy
	// (PathDirect: to the application; PathTunnel: to the proxy's 15006).
	PathSvc, PathAddr, PathUDP, PathIn Path
	// What the verdicts were decided from, for dumps; no program reads them.
	// HBONE: the workload is in the mesh (accepts HBONE on 15008). Local: it
	// runs on this node. Waypoint: it has a waypoint of its own. Policy:
	// authorization policies apply to it.
	HBONE, Local, Waypoint, Policy bool
	// KernelAuthz: its policies are evaluated by the kernel (PathAuthz).
	KernelAuthz bool
}

// AuthzKey is a (destination workload, source workload, address family)
// pair of this node, by backend id.
type AuthzKey struct {
	Dst, Src uint32
	Family   Family
}

// Authz is one entry of kmesh_authz: the destination's policies' verdict for
// connections from the source: Allow for every destination port but Except,
// which get the other verdict. At most AuthzPorts exceptions.
type Authz struct {
	Key    AuthzKey
	Allow  bool
	Except []uint16 // host order
}

// TunnelOrig is what the kernel recorded for a connection it sent to the
// node proxy's outbound listener.
type TunnelOrig struct {
	// Dst is what the application dialled (a service VIP:port or a workload).
	Dst netip.AddrPort
	// Backend is the endpoint the kernel's load balancer chose; invalid when
	// the connection goes to a waypoint, which balances by itself.
	Backend netip.AddrPort
	// Path is the verdict the kernel followed: PathTunnel or PathWaypoint.
	Path Path
}

// --- encoding to and from the generated ABI structs ---

func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}

func ntohs(v uint16) uint16 { return htons(v) }

// addrWords encodes an address as 16 network-order bytes (IPv4 v4-mapped)
// laid out as the four native-endian words the C struct holds.
func addrWords(a netip.Addr) [4]uint32 {
	var w [4]uint32
	if !a.IsValid() {
		return w
	}
	b := a.As16()
	for i := range w {
		w[i] = binary.NativeEndian.Uint32(b[i*4:])
	}
	return w
}

func wordsAddr(w [4]uint32) netip.Addr {
	var b [16]byte
	for i := range w {
		binary.NativeEndian.PutUint32(b[i*4:], w[i])
	}
	return netip.AddrFrom16(b).Unmap()
}

func addr4Word(a netip.Addr) uint32 {
	if !a.IsValid() {
		return 0
	}
	b := a.Unmap().As4()
	return binary.NativeEndian.Uint32(b[:])
}

func wordAddr4(w uint32) netip.Addr {
	if w == 0 {
		return netip.Addr{}
	}
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], w)
	return netip.AddrFrom4(b)
}

func encodeFrontendKey(k FrontendKey) sockAddrFrontendKey {
	return sockAddrFrontendKey{Addr: addrWords(k.Addr), Port: htons(k.Port), Proto: uint8(k.Proto)}
}

func decodeFrontendKey(k sockAddrFrontendKey) FrontendKey {
	return FrontendKey{Addr: wordsAddr(k.Addr), Port: ntohs(k.Port), Proto: Proto(k.Proto)}
}

// The values the connect decision reads carry the identity of their own
// key (element reuse, kmesh_maps.h): the encoders write it, the decoders
// leave it out (it is the key).

func encodeFrontendValue(f Frontend) sockAddrFrontendValue {
	return sockAddrFrontendValue{Key: encodeFrontendKey(f.Key), Id: f.ID, TargetPort: htons(f.TargetPort), Kind: uint8(f.Kind), Path: uint8(f.Path)}
}

func decodeFrontend(k sockAddrFrontendKey, v sockAddrFrontendValue) Frontend {
	return Frontend{
		Key:        decodeFrontendKey(k),
		Kind:       FrontendKind(v.Kind),
		ID:         v.Id,
		TargetPort: ntohs(v.TargetPort),
		Path:       Path(v.Path),
	}
}

func encodeService(s Service) sockAddrServiceValue {
	return sockAddrServiceValue{Id: s.ID, Count: s.Counts, Epoch: s.Epoch, Gen: s.Gen, Mode: uint8(s.Mode)}
}

func decodeService(id uint32, v sockAddrServiceValue) Service {
	return Service{ID: id, Counts: v.Count, Epoch: v.Epoch, Gen: v.Gen, Mode: LBMode(v.Mode)}
}

func encodeEndpointKey(k EndpointKey) sockAddrEndpointKey {
	return sockAddrEndpointKey{ServiceId: k.Service, Gen: k.Gen, Family: uint8(k.Family), Rank: k.Rank, Index: k.Index}
}

func decodeEndpointKey(k sockAddrEndpointKey) EndpointKey {
	return EndpointKey{Service: k.ServiceId, Gen: k.Gen, Family: Family(k.Family), Rank: k.Rank, Index: k.Index}
}

func encodeEndpoint(e Endpoint) sockAddrEndpointValue {
	s := e.Slot
	return sockAddrEndpointValue{Key: encodeEndpointKey(e.Key), BackendId: s.Backend, AliasId: s.Alias, Threshold: s.Threshold,
		Port: htons(s.Port), AliasPort: htons(s.AliasPort)}
}

func decodeSlot(v sockAddrEndpointValue) EndpointSlot {
	return EndpointSlot{Backend: v.BackendId, Alias: v.AliasId, Threshold: v.Threshold,
		Port: ntohs(v.Port), AliasPort: ntohs(v.AliasPort)}
}

func encodeBackend(b Backend) sockAddrBackendValue {
	v := sockAddrBackendValue{Id: b.ID, Addr4: addr4Word(b.Addr4), Identity: b.Identity, Capacity: b.Capacity,
		PathSvc: uint8(b.PathSvc), PathAddr: uint8(b.PathAddr), PathUdp: uint8(b.PathUDP), PathIn: uint8(b.PathIn)}
	if b.Addr6.IsValid() {
		v.Addr6 = addrWords(b.Addr6)
	}
	for _, f := range []struct {
		on  bool
		bit uint32
	}{{b.HBONE, backendFlagHBONE}, {b.Local, backendFlagLocal}, {b.Waypoint, backendFlagWaypoint}, {b.Policy, backendFlagPolicy}, {b.KernelAuthz, backendFlagKAuthz}} {
		if f.on {
			v.Flags |= f.bit
		}
	}
	return v
}

func decodeBackend(id uint32, v sockAddrBackendValue) Backend {
	b := Backend{ID: id, Addr4: wordAddr4(v.Addr4), Identity: v.Identity, Capacity: v.Capacity,
		PathSvc: Path(v.PathSvc), PathAddr: Path(v.PathAddr), PathUDP: Path(v.PathUdp), PathIn: Path(v.PathIn),
		HBONE: v.Flags&backendFlagHBONE != 0, Local: v.Flags&backendFlagLocal != 0,
		Waypoint: v.Flags&backendFlagWaypoint != 0, Policy: v.Flags&backendFlagPolicy != 0,
		KernelAuthz: v.Flags&backendFlagKAuthz != 0}
	if v.Addr6 != [4]uint32{} {
		b.Addr6 = wordsAddr(v.Addr6)
	}
	return b
}

func encodeTunnelKey(netnsCookie uint64, client netip.AddrPort) sockAddrTunnelKey {
	return sockAddrTunnelKey{NetnsCookie: netnsCookie, Addr: addrWords(netip.AddrFrom16(client.Addr().As16())), Port: htons(client.Port())}
}

func decodeTunnel(v sockAddrTunnelValue) TunnelOrig {
	t := TunnelOrig{Dst: netip.AddrPortFrom(wordsAddr(v.Addr), ntohs(v.Port)), Path: Path(v.Path)}
	if v.BackendPort != 0 {
		t.Backend = netip.AddrPortFrom(wordsAddr(v.BackendAddr), ntohs(v.BackendPort))
	}
	return t
}

func encodeAuthzKey(k AuthzKey) sockAddrAuthzKey {
	return sockAddrAuthzKey{DstId: k.Dst, SrcId: k.Src, Family: uint8(k.Family)}
}

func encodeAuthz(a Authz) (sockAddrAuthzKey, sockAddrAuthzValue, error) {
	if len(a.Except) > AuthzPorts {
		return sockAddrAuthzKey{}, sockAddrAuthzValue{}, fmt.Errorf("authz entry %v: %d port exceptions, at most %d fit", a.Key, len(a.Except), AuthzPorts)
	}
	k := encodeAuthzKey(a.Key)
	v := sockAddrAuthzValue{Key: k, Nports: uint8(len(a.Except))}
	if a.Allow {
		v.Allow = 1
	}
	for i, p := range a.Except {
		v.Ports[i] = htons(p)
	}
	return k, v, nil
}

func decodeAuthz(v sockAddrAuthzValue) Authz {
	a := Authz{Key: AuthzKey{Dst: v.Key.DstId, Src: v.Key.SrcId, Family: Family(v.Key.Family)}, Allow: v.Allow != 0}
	for i := 0; i < int(v.Nports) && i < AuthzPorts; i++ {
		a.Except = append(a.Except, ntohs(v.Ports[i]))
	}
	return a
}

// Splicing (kmesh_consts.h): what a spliced socket's sends do
// (kmesh_splice_sk).
const (
	spliceUndecided = 0
	spliceRedirect  = 1
	spliceTCP       = 2
)

// SpliceNS is a network namespace's opt-in to splicing (kmesh_splice_ns).
type SpliceNS uint32

const (
	// SpliceInPod splices connections inside the namespace: the
	// application and its sidecar (any pod, enrolled or not).
	SpliceInPod SpliceNS = 0x1
	// SplicePeers splices an enrolled pod's connections with other mesh
	// workloads on this node, as Config.Splice does for every enrolled pod.
	SplicePeers SpliceNS = 0x2
	// SpliceSidecar: the pod keeps an Istio sidecar with the default
	// capture, which the kernel performs at connect for IPv4 TCP (its
	// iptables rules stay as the backstop), so that no leg is NAT'd and
	// every leg can be spliced: the application's to its sidecar, the
	// sidecar's to another such pod's sidecar (kmesh_sidecar) on this
	// node. With SpliceInPod.
	SpliceSidecar SpliceNS = 0x4
)

// pathSidecar: sock_orig.path of a connect the sidecar capture redirected.
const pathSidecar = 16
