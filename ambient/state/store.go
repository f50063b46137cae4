package state

import (
	"maps"
	"reflect"
	"slices"
	"sync"

	"google.golang.org/protobuf/proto"
	"istio.io/istio/pkg/workloadapi/security"
)

func workloadEqual(a, b *Workload) bool { return reflect.DeepEqual(a, b) }

func serviceEqual(a, b *Service) bool { return reflect.DeepEqual(a, b) }

// Changes names what an update touched, so consumers redo exactly that.
type Changes struct {
	Workloads map[string]struct{} // UIDs added, changed or removed
	Services  map[string]struct{} // keys whose definition or endpoints changed
	Policies  map[string]struct{}
}

func newChanges() Changes {
	return Changes{Workloads: map[string]struct{}{}, Services: map[string]struct{}{}, Policies: map[string]struct{}{}}
}

// Clone copies the change sets (callers may add to the copy).
func (c Changes) Clone() Changes {
	return Changes{Workloads: maps.Clone(c.Workloads), Services: maps.Clone(c.Services), Policies: maps.Clone(c.Policies)}
}

// Empty reports whether nothing changed.
func (c Changes) Empty() bool {
	return len(c.Workloads) == 0 && len(c.Services) == 0 && len(c.Policies) == 0
}

// Merge adds o's changes to c.
func (c Changes) Merge(o Changes) {
	maps.Copy(c.Workloads, o.Workloads)
	maps.Copy(c.Services, o.Services)
	maps.Copy(c.Policies, o.Policies)
}

type set = map[string]struct{}

func addTo(m map[string]set, k, v string) {
	s := m[k]
	if s == nil {
		s = set{}
		m[k] = s
	}
	s[v] = struct{}{}
}

func removeFrom(m map[string]set, k, v string) {
	if s := m[k]; s != nil {
		delete(s, v)
		if len(s) == 0 {
			delete(m, k)
		}
	}
}

// Store is the node's view of the mesh. Safe for concurrent use; writers
// are the xDS handlers, readers the reconciler, proxies and admin dumps.
type Store struct {
	mu sync.RWMutex

	workloads map[string]*Workload
	wlByAddr  map[NetworkAddr]string
	wlByHost  map[string]string
	wlByNode  map[string]set
	services  map[string]*Service
	svcByHost map[string]set // hostname -> keys (one hostname may live in several namespaces)
	svcByVIP  map[NetworkAddr]string
	endpoints map[string]set // service key -> workload UIDs (from Workload.Services)
	policies  map[string]Policy
	polByNS   map[string]set // namespace-scoped policies by namespace
	polGlobal set
}

// NewStore returns an empty store.
func NewStore() *Store {
	return &Store{
		workloads: map[string]*Workload{}, wlByAddr: map[NetworkAddr]string{}, wlByHost: map[string]string{},
		wlByNode: map[string]set{}, services: map[string]*Service{}, svcByHost: map[string]set{},
		svcByVIP: map[NetworkAddr]string{}, endpoints: map[string]set{}, policies: map[string]Policy{},
		polByNS: map[string]set{}, polGlobal: set{},
	}
}

// Update is one batch of changes from the control plane.
type Update struct {
	Workloads []*Workload
	Services  []*Service
	Policies  []Policy
	// RemovedAddresses are Address resource names: workload UIDs or service
	// keys ("namespace/hostname"); RemovedPolicies are policy keys.
	RemovedAddresses []string
	RemovedPolicies  []string
}

// Apply applies a batch and says what changed. Objects equal to what the
// store holds are not reported.
func (s *Store) Apply(u Update) Changes {
	s.mu.Lock()
	defer s.mu.Unlock()
	ch := newChanges()
	for _, w := range u.Workloads {
		s.upsertWorkload(w, ch)
	}
	for _, svc := range u.Services {
		s.upsertService(svc, ch)
	}
	for _, name := range u.RemovedAddresses {
		if w, ok := s.workloads[name]; ok {
			s.removeWorkload(w, ch)
		} else if svc, ok := s.services[name]; ok {
			s.removeService(svc, ch)
		}
	}
	for _, p := range u.Policies {
		s.upsertPolicy(p, ch)
	}
	for _, k := range u.RemovedPolicies {
		if p, ok := s.policies[k]; ok {
			s.removePolicy(p, ch)
		}
	}
	return ch
}

func (s *Store) upsertWorkload(w *Workload, ch Changes) {
	if old, ok := s.workloads[w.UID]; ok {
		if workloadEqual(old, w) {
			return
		}
		s.unindexWorkload(old, ch)
	}
	s.workloads[w.UID] = w
	m := w.Meta()
	for _, a := range w.Addresses {
		s.wlByAddr[NetworkAddr{Network: m.Network, Addr: a}] = w.UID
	}
	if w.Hostname != "" {
		s.wlByHost[w.Hostname] = w.UID
	}
	addTo(s.wlByNode, m.Node, w.UID)
	for _, sp := range w.Services {
		addTo(s.endpoints, sp.Service, w.UID)
		ch.Services[sp.Service] = struct{}{}
	}
	ch.Workloads[w.UID] = struct{}{}
}

func (s *Store) unindexWorkload(w *Workload, ch Changes) {
	m := w.Meta()
	for _, a := range w.Addresses {
		k := NetworkAddr{Network: m.Network, Addr: a}
		if s.wlByAddr[k] == w.UID {
			delete(s.wlByAddr, k)
		}
	}
	if w.Hostname != "" && s.wlByHost[w.Hostname] == w.UID {
		delete(s.wlByHost, w.Hostname)
	}
	removeFrom(s.wlByNode, m.Node, w.UID)
	for _, sp := range w.Services {
		removeFrom(s.endpoints, sp.Service, w.UID)
		ch.Services[sp.Service] = struct{}{}
	}
}

func (s *Store) removeWorkload(w *Workload, ch Changes) {
	s.unindexWorkload(w, ch)
	delete(s.workloads, w.UID)
	ch.Workloads[w.UID] = struct{}{}
}

func (s *Store) upsertService(svc *Service, ch Changes) {
	key := svc.Key()
	if old, ok := s.services[key]; ok {
		if serviceEqual(old, svc) {
			return
		}
		s.unindexService(old)
	}
	s.services[key] = svc
	addTo(s.svcByHost, svc.Hostname, key)
	for _, v := range svc.VIPs {
		s.svcByVIP[v] = key
	}
	ch.Services[key] = struct{}{}
}

func (s *Store) unindexService(svc *Service) {
	key := svc.Key()
	removeFrom(s.svcByHost, svc.Hostname, key)
	for _, v := range svc.VIPs {
		if s.svcByVIP[v] == key {
			delete(s.svcByVIP, v)
		}
	}
}

func (s *Store) removeService(svc *Service, ch Changes) {
	s.unindexService(svc)
	delete(s.services, svc.Key())
	ch.Services[svc.Key()] = struct{}{}
}

func (s *Store) upsertPolicy(p Policy, ch Changes) {
	k := p.Key()
	if old, ok := s.policies[k]; ok {
		if proto.Equal(old.Authorization, p.Authorization) {
			return
		}
		s.unindexPolicy(old)
	}
	s.policies[k] = p
	switch p.GetScope() {
	case security.Scope_GLOBAL:
		s.polGlobal[k] = struct{}{}
	case security.Scope_NAMESPACE:
		addTo(s.polByNS, p.GetNamespace(), k)
	}
	ch.Policies[k] = struct{}{}
}

func (s *Store) unindexPolicy(p Policy) {
	delete(s.polGlobal, p.Key())
	removeFrom(s.polByNS, p.GetNamespace(), p.Key())
}

func (s *Store) removePolicy(p Policy, ch Changes) {
	s.unindexPolicy(p)
	delete(s.policies, p.Key())
	ch.Policies[p.Key()] = struct{}{}
}

// --- reads ---

// Workload returns a workload by UID.
func (s *Store) Workload(uid string) *Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.workloads[uid]
}

// WorkloadByAddr returns the workload owning an address.
func (s *Store) WorkloadByAddr(a NetworkAddr) *Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.workloads[s.wlByAddr[a]]
}

// WorkloadByHostname returns the workload with a hostname (DNS-addressed workloads).
func (s *Store) WorkloadByHostname(h string) *Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.workloads[s.wlByHost[h]]
}

// WorkloadsOnNode returns the workloads scheduled on node.
func (s *Store) WorkloadsOnNode(node string) []*Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*Workload, 0, len(s.wlByNode[node]))
	for _, uid := range slices.Sorted(maps.Keys(s.wlByNode[node])) {
		out = append(out, s.workloads[uid])
	}
	return out
}

// Service returns a service by key ("namespace/hostname").
func (s *Store) Service(key string) *Service {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.services[key]
}

// ServiceByVIP returns the service owning a VIP.
func (s *Store) ServiceByVIP(a NetworkAddr) *Service {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.services[s.svcByVIP[a]]
}

// ServicesByHostname returns the services with a hostname, in every namespace.
func (s *Store) ServicesByHostname(h string) []*Service {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []*Service
	for _, k := range slices.Sorted(maps.Keys(s.svcByHost[h])) {
		out = append(out, s.services[k])
	}
	return out
}

// Endpoint is a workload's membership in a service.
type Endpoint struct {
	Workload *Workload
	Ports    []Port
}

// Endpoints returns the known workloads of a service, sorted by UID.
func (s *Store) Endpoints(key string) []Endpoint {
	s.mu.RLock()
	defer s.mu.RUnlock()
	uids := slices.Sorted(maps.Keys(s.endpoints[key]))
	out := make([]Endpoint, 0, len(uids))
	for _, uid := range uids {
		if w := s.workloads[uid]; w != nil {
			ports, _ := w.PortsFor(key)
			out = append(out, Endpoint{Workload: w, Ports: ports})
		}
	}
	return out
}

// Policy returns a policy by key ("namespace/name").
func (s *Store) Policy(key string) (Policy, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	p, ok := s.policies[key]
	return p, ok
}

// PoliciesFor returns the policies that apply to a workload: global ones,
// its namespace's, and the selector-scoped ones istiod listed on it.
func (s *Store) PoliciesFor(w *Workload) []Policy {
	s.mu.RLock()
	defer s.mu.RUnlock()
	keys := set{}
	maps.Copy(keys, s.polGlobal)
	maps.Copy(keys, s.polByNS[w.Meta().Namespace])
	for _, k := range w.AuthorizationPolicies {
		keys[k] = struct{}{}
	}
	var out []Policy
	for _, k := range slices.Sorted(maps.Keys(keys)) {
		if p, ok := s.policies[k]; ok {
			out = append(out, p)
		}
	}
	return out
}

// Snapshot is the whole store, for dumps.
type Snapshot struct {
	Workloads []*Workload `json:"workloads"`
	Services  []*Service  `json:"services"`
	Policies  []Policy    `json:"policies"`
}

// Snapshot copies the store's contents, sorted by key.
func (s *Store) Snapshot() Snapshot {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var snap Snapshot
	for _, k := range slices.Sorted(maps.Keys(s.workloads)) {
		snap.Workloads = append(snap.Workloads, s.workloads[k])
	}
	for _, k := range slices.Sorted(maps.Keys(s.services)) {
		snap.Services = append(snap.Services, s.services[k])
	}
	for _, k := range slices.Sorted(maps.Keys(s.policies)) {
		snap.Policies = append(snap.Policies, s.policies[k])
	}
	return snap
}

// Counts returns how many objects of each kind the store holds.
func (s *Store) Counts() (workloads, services, policies int) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.workloads), len(s.services), len(s.policies)
}
