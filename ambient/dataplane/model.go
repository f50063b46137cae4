// Package dataplane keeps the kernel's maps equal to the desired state of
// workloads and services on this node. It computes everything the kernel
// must not: locality ranks for this node, STRICT/FAILOVER/PASSTHROUGH,
// health filtering, per-endpoint target ports and capacity weights (as alias
// tables), and writes only what changed, make-before-break, so a connect
// never sees a half-written service.
package dataplane

import (
	"net/netip"

	"kmesh.dev/kmesh/ambient/authz"
	"kmesh.dev/kmesh/ambient/identity/spiffe"
	"kmesh.dev/kmesh/bpf"
)

// Locality is a workload's or node's place in the topology.
type Locality struct {
	Region, Zone, Subzone string
}

// Topology is what locality-aware load balancing compares.
type Topology struct {
	Node     string
	Cluster  string
	Network  string
	Locality Locality
}

// Scope is one routing preference, as in Istio's LoadBalancing.Scope.
type Scope uint8

const (
	ScopeRegion Scope = iota + 1
	ScopeZone
	ScopeSubzone
	ScopeNode
	ScopeCluster
	ScopeNetwork
)

// LoadBalancing is a service's policy, as in Istio's LoadBalancing.
type LoadBalancing struct {
	Mode bpf.LBMode
	// RoutingPreference is ordered: an endpoint's rank is the number of
	// leading scopes it shares with this node.
	RoutingPreference []Scope
	// AllowUnhealthy is HealthPolicy ALLOW_ALL; the default keeps healthy only.
	AllowUnhealthy bool
}

// Workload is a pod, VM or other addressable backend.
type Workload struct {
	UID   string
	Addrs []netip.Addr
	// Capacity is Istio's capacity weight (Istio's default is 1); a
	// workload with capacity 0 is drained: it gets no new connections.
	Capacity uint32
	Healthy  bool
	// HBONE is true when the workload accepts HBONE (enrolled in the mesh).
	HBONE bool
	// Waypoint: connections addressed to the workload go through its
	// waypoint (over the node proxy's tunnel).
	Waypoint bool
	// Policies: authorization policies apply to this workload (known for
	// workloads on this node; see ambient/path for what it changes).
	Policies bool
	// Authz is those policies compiled (nil: none, or not asked). A local
	// mesh workload whose set the kernel can hold (authz KernelReason "")
	// gets the AUTHZ verdict and kmesh_authz entries for every local source.
	Authz *authz.Set
	// Identity is the workload's identity (its certificate's); nil when
	// unknown. Only local workloads' are used: as sources of kmesh_authz.
	Identity *spiffe.Identity
	Topology Topology
}

// Port maps a service port to the port the workloads listen on. TargetPort 0
// means a named port that each endpoint resolves for itself.
type Port struct {
	ServicePort uint16
	TargetPort  uint16
}

// Endpoint is a workload's membership in a service.
type Endpoint struct {
	WorkloadUID string
	// Ports overrides the service's target port per service port. Usually
	// empty or one entry: a slice, not a map.
	Ports []Port
}

// Service is a set of workloads behind virtual IPs.
type Service struct {
	// Key identifies the service: "namespace/hostname".
	Key       string
	VIPs      []netip.Addr
	Ports     []Port
	LB        LoadBalancing
	Endpoints []Endpoint
	// Waypoint: the service's TCP traffic goes through its waypoint.
	Waypoint bool
	// Virtual: the VIPs are addresses of nothing but this service (a
	// Kubernetes Service's ClusterIPs). A connection to one on a port the
	// service does not have is refused (kmesh_vip), where it would
	// otherwise leave the node for an address nobody answers. Not set for
	// ServiceEntries, whose addresses may be real hosts' with other ports.
	Virtual bool
}
