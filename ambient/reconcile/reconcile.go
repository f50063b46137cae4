// Package reconcile keeps the kernel data path equal to the control plane's
// state: it turns changes of ambient/state into ambient/dataplane batches,
// derives this node's locality, and retries objects the kernel refused
// (a full map) until they fit.
package reconcile

import (
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"

	"istio.io/istio/pkg/workloadapi"

	"kmesh.dev/kmesh/ambient/authz"
	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/ambient/identity/spiffe"
	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/bpf"
)

// Node is what the daemon knows about its node from configuration.
type Node struct {
	Name    string
	Cluster string
	Network string
	// ClusterDomain is the cluster's DNS domain (default "cluster.local"):
	// a service named <name>.<namespace>.svc.<it> is a Kubernetes
	// Service, whose VIPs are ClusterIPs (dataplane.Service.Virtual).
	ClusterDomain string
}

// Reconciler applies state changes to the data path.
type Reconciler struct {
	store *state.Store
	plane *dataplane.Dataplane
	node  Node
	log   *slog.Logger

	mu       sync.Mutex
	locality state.Locality
	// failed holds objects the kernel did not take, by xDS resource name,
	// with the error; Retry tries them again.
	failed map[string]*dataplane.ObjectError
}

// New returns a reconciler for store and plane.
func New(store *state.Store, plane *dataplane.Dataplane, node Node, log *slog.Logger) *Reconciler {
	if log == nil {
		log = slog.Default()
	}
	return &Reconciler{store: store, plane: plane, node: node, log: log.With("component", "reconcile"), failed: map[string]*dataplane.ObjectError{}}
}

// Apply pushes what changed to the kernel. It returns the objects the
// kernel refused, by resource name (workload UID or service key); their
// previous state keeps serving and they are retried by Retry.
func (r *Reconciler) Apply(ch state.Changes) map[string]error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.applyChanges(ch)
}

func (r *Reconciler) applyChanges(ch state.Changes) map[string]error {
	r.refreshLocality(ch)
	if len(ch.Policies) > 0 {
		// Which local workloads have policies (an input of their path
		// verdicts) may have changed.
		ch = ch.Clone()
		for _, w := range r.store.WorkloadsOnNode(r.node.Name) {
			ch.Workloads[w.UID] = struct{}{}
		}
	}
	var b dataplane.Batch
	for _, uid := range slices.Sorted(maps.Keys(ch.Workloads)) {
		if w := r.store.Workload(uid); w != nil {
			b.Workloads = append(b.Workloads, r.workload(w))
		} else {
			b.DeleteWorkloads = append(b.DeleteWorkloads, uid)
		}
	}
	for _, key := range slices.Sorted(maps.Keys(ch.Services)) {
		if svc := r.store.Service(key); svc != nil && len(r.vips(svc)) > 0 {
			b.Services = append(b.Services, r.service(svc))
		} else {
			// Gone, or nothing to intercept (headless, or VIPs on another network).
			b.DeleteServices = append(b.DeleteServices, key)
		}
	}
	return r.apply(b)
}

func (r *Reconciler) apply(b dataplane.Batch) map[string]error {
	for _, w := range b.Workloads {
		delete(r.failed, w.UID)
	}
	for _, uid := range b.DeleteWorkloads {
		delete(r.failed, uid)
	}
	for _, s := range b.Services {
		delete(r.failed, s.Key)
	}
	for _, k := range b.DeleteServices {
		delete(r.failed, k)
	}
	errs := r.plane.Apply(b)
	if len(errs) == 0 {
		return nil
	}
	out := make(map[string]error, len(errs))
	for _, e := range errs {
		r.failed[e.Name] = e
		out[e.Name] = e
	}
	return out
}

// Failed returns how many objects wait for a retry.
func (r *Reconciler) Failed() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.failed)
}

// Retry re-applies the objects the kernel refused before.
func (r *Reconciler) Retry() map[string]error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.failed) == 0 {
		return nil
	}
	ch := state.Changes{Workloads: map[string]struct{}{}, Services: map[string]struct{}{}}
	for name, e := range r.failed {
		if e.Kind == "workload" {
			ch.Workloads[name] = struct{}{}
		} else {
			ch.Services[name] = struct{}{}
		}
	}
	return r.applyChanges(ch)
}

// refreshLocality takes this node's locality from the workloads running on
// it (they all share the node's topology labels), and re-ranks every
// service when it changes. It looks at the changed workloads only: a node
// may run hundreds of pods, and this runs on every update.
func (r *Reconciler) refreshLocality(ch state.Changes) {
	loc := r.locality
	for uid := range ch.Workloads {
		if w := r.store.Workload(uid); w != nil {
			if m := w.Meta(); m.Node == r.node.Name && m.Locality != (state.Locality{}) {
				loc = m.Locality
				break
			}
		}
	}
	if loc == r.locality {
		return
	}
	r.locality = loc
	r.log.Info("node locality", "region", loc.Region, "zone", loc.Zone, "subzone", loc.Subzone)
	for _, e := range r.plane.SetNode(r.topology()) {
		r.failed[e.Name] = e
	}
}

func (r *Reconciler) topology() dataplane.Topology {
	return dataplane.Topology{Node: r.node.Name, Cluster: r.node.Cluster, Network: r.node.Network,
		Locality: dataplane.Locality(r.locality)}
}

// sameNetwork: addresses of another network are reached through its
// gateway, never directly.
func (r *Reconciler) sameNetwork(n string) bool {
	return n == "" || r.node.Network == "" || n == r.node.Network
}

func (r *Reconciler) workload(w *state.Workload) dataplane.Workload {
	m := w.Meta()
	out := dataplane.Workload{UID: w.UID, Capacity: w.Capacity, Healthy: w.Healthy, HBONE: w.HBONE,
		Waypoint: w.Waypoint != nil, Topology: dataplane.Topology{Node: m.Node, Cluster: m.ClusterID, Network: m.Network, Locality: dataplane.Locality(m.Locality)}}
	if r.local(w) {
		// The same compiled policies the tunnel's inbound side evaluates,
		// for the kernel's same-node verdicts (ambient/authz KernelVerdicts),
		// and the identity the pod's certificate carries (as the tunnel
		// derives it), for this workload as a source.
		if ps := r.store.PoliciesFor(w); len(ps) > 0 {
			out.Policies, out.Authz = true, authz.Compile(ps)
		}
		id := workloadIdentity(m)
		out.Identity = &id
	}
	if r.sameNetwork(m.Network) {
		out.Addrs = w.Addresses // immutable once converted: shared, not copied
	}
	return out
}

// local: whether authorization policies apply to a workload is asked of
// local mesh workloads only (ambient/path): for the others it changes no
// verdict, and asking for every workload of the mesh on every policy change
// would cost more than it tells.
func (r *Reconciler) local(w *state.Workload) bool {
	return w.HBONE && r.node.Name != "" && w.Meta().Node == r.node.Name
}

// workloadIdentity is the identity istiod's CA gives the workload's pods
// (tunnel.WorkloadIdentity: Istio's defaults for an empty trust domain or
// service account).
func workloadIdentity(m state.WorkloadMeta) spiffe.Identity {
	id := spiffe.Identity{TrustDomain: m.TrustDomain, Namespace: m.Namespace, ServiceAccount: m.ServiceAccount}
	if id.TrustDomain == "" {
		id.TrustDomain = "cluster.local"
	}
	if id.ServiceAccount == "" {
		id.ServiceAccount = "default"
	}
	return id
}

func (r *Reconciler) vips(s *state.Service) []netip.Addr {
	var out []netip.Addr
	for _, v := range s.VIPs {
		if r.sameNetwork(v.Network) {
			out = append(out, v.Addr)
		}
	}
	return out
}

// kubernetesService reports whether s is a Kubernetes Service: istiod
// names those <name>.<namespace>.svc.<domain> and gives them their
// ClusterIPs as addresses, nothing else (no load-balancer or external IPs),
// so they are addresses of nothing but the service. ServiceEntries name
// hosts freely and may list a real host's addresses.
func kubernetesService(s *state.Service, domain string) bool {
	if domain == "" {
		domain = "cluster.local"
	}
	return s.Name != "" && s.Hostname == s.Name+"."+s.Namespace+".svc."+domain
}

var modes = map[workloadapi.LoadBalancing_Mode]bpf.LBMode{
	workloadapi.LoadBalancing_UNSPECIFIED_MODE: bpf.LBStandard,
	workloadapi.LoadBalancing_STRICT:           bpf.LBStrict,
	workloadapi.LoadBalancing_FAILOVER:         bpf.LBFailover,
	workloadapi.LoadBalancing_PASSTHROUGH:      bpf.LBPassthrough,
}

var scopes = map[workloadapi.LoadBalancing_Scope]dataplane.Scope{
	workloadapi.LoadBalancing_REGION:  dataplane.ScopeRegion,
	workloadapi.LoadBalancing_ZONE:    dataplane.ScopeZone,
	workloadapi.LoadBalancing_SUBZONE: dataplane.ScopeSubzone,
	workloadapi.LoadBalancing_NODE:    dataplane.ScopeNode,
	workloadapi.LoadBalancing_CLUSTER: dataplane.ScopeCluster,
	workloadapi.LoadBalancing_NETWORK: dataplane.ScopeNetwork,
}

func (r *Reconciler) service(s *state.Service) dataplane.Service {
	out := dataplane.Service{Key: s.Key(), VIPs: r.vips(s), Waypoint: s.Waypoint != nil, Virtual: kubernetesService(s, r.node.ClusterDomain)}
	out.Ports = make([]dataplane.Port, 0, len(s.Ports))
	for _, p := range s.Ports {
		out.Ports = append(out.Ports, dataplane.Port{ServicePort: p.ServicePort, TargetPort: p.TargetPort})
	}
	if lb := s.LoadBalancing; lb != nil {
		out.LB.Mode = modes[lb.Mode]
		for _, sc := range lb.RoutingPreference {
			out.LB.RoutingPreference = append(out.LB.RoutingPreference, scopes[sc])
		}
		out.LB.AllowUnhealthy = lb.HealthPolicy == workloadapi.LoadBalancing_ALLOW_ALL
	}
	eps := r.store.Endpoints(s.Key())
	// The dataplane keeps this slice for the service's lifetime: exactly
	// sized, not grown by doubling (10k services × 10 endpoints).
	out.Endpoints = make([]dataplane.Endpoint, 0, len(eps))
	for _, ep := range eps {
		e := dataplane.Endpoint{WorkloadUID: ep.Workload.UID}
		for _, p := range ep.Ports {
			// Only what differs from the service's own mapping is worth carrying.
			if i := slices.IndexFunc(s.Ports, func(sp state.Port) bool { return sp.ServicePort == p.ServicePort }); i < 0 || s.Ports[i].TargetPort != p.TargetPort {
				e.Ports = append(e.Ports, dataplane.Port{ServicePort: p.ServicePort, TargetPort: p.TargetPort})
			}
		}
		out.Endpoints = append(out.Endpoints, e)
	}
	return out
}
