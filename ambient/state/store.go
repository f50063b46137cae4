package state

import (
	"hash/maphash"
	"maps"
	"reflect"
	"slices"
	"strings"
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
//
// A node holds every workload of the mesh, so the workload indexes are
// compact: each workload has a small integer handle (its slot in wl), and
// the secondary indexes hold handles, not UID strings or pointers. Slices
// that many workloads have in common (the services selecting them, their
// waypoint) are shared through ref-counted tables.
type Store struct {
	mu sync.RWMutex

	wl     []*Workload // by handle; nil: a free slot
	free   []wid
	byUID  hashIndex[string]
	byAddr hashIndex[addrKey]
	seed   maphash.Seed
	byHost map[string]wid
	byNode map[sym]*widSet
	// endpoints: service key -> workloads listing it in Workload.Services.
	endpoints map[string]*widSet
	// networks numbers network names for addrKey; it only grows (a mesh
	// has a handful of networks).
	networks map[string]uint32

	svcPorts  sharedTable[[]ServicePorts]
	gateways  sharedTable[*GatewayAddress]
	policyIDs sharedTable[[]string]
	scratch   []byte // for shared-table keys; writers hold mu

	services  map[string]*Service
	svcByHost map[string][]string // hostname -> keys, sorted (one hostname may live in several namespaces; usually one)
	svcByVIP  map[addrKey]string
	policies  map[string]Policy
	polByNS   map[string]set // namespace-scoped policies by namespace
	polGlobal set
}

// NewStore returns an empty store.
func NewStore() *Store {
	s := &Store{
		byHost: map[string]wid{}, byNode: map[sym]*widSet{}, seed: maphash.MakeSeed(),
		endpoints: map[string]*widSet{}, networks: map[string]uint32{"": 0},
		services: map[string]*Service{}, svcByHost: map[string][]string{}, svcByVIP: map[addrKey]string{},
		policies: map[string]Policy{}, polByNS: map[string]set{}, polGlobal: set{},
	}
	s.byUID.holds = func(id wid, uid string) bool { return s.wl[id] != nil && s.wl[id].UID == uid }
	s.byAddr.holds = s.holdsAddr
	return s
}

func (s *Store) hashUID(uid string) uint64 { return maphash.String(s.seed, uid) }

func (s *Store) hashAddr(k addrKey) uint64 {
	h := maphash.Bytes(s.seed, k.ip[:]) ^ uint64(k.net)*0x9e3779b97f4a7c15
	if k.is4 {
		h ^= 0xbf58476d1ce4e5b9
	}
	return h ^ h>>29
}

// holdsAddr reports whether workload id has address key k.
func (s *Store) holdsAddr(id wid, k addrKey) bool {
	w := s.wl[id]
	if w == nil || s.netID(w.Network(), false) != k.net {
		return false
	}
	for _, a := range w.Addresses {
		if keyOf(k.net, a) == k {
			return true
		}
	}
	return false
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
// store holds are not reported. The store takes the objects: they must not
// be modified afterwards, and Apply may replace a workload's slices and
// gateways by equal ones other workloads share.
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
		if id, ok := s.byUID.get(s.hashUID(name), name); ok {
			s.removeWorkload(id, s.wl[id], ch)
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
	id, ok := s.byUID.get(s.hashUID(w.UID), w.UID)
	if ok {
		old := s.wl[id]
		if old == w || workloadEqual(old, w) {
			return
		}
		s.unindexWorkload(id, old, ch)
		w.UID = old.UID // one copy of the text (the xDS versions hold the first)
		s.wl[id] = w
	} else {
		id = s.alloc()
		s.wl[id] = w
		s.byUID.put(s.hashUID(w.UID), w.UID, id)
	}
	s.indexWorkload(id, w, ch)
	ch.Workloads[w.UID] = struct{}{}
}

func (s *Store) alloc() wid {
	if n := len(s.free); n > 0 {
		id := s.free[n-1]
		s.free = s.free[:n-1]
		return id
	}
	s.wl = append(s.wl, nil)
	return wid(len(s.wl) - 1)
}

func (s *Store) indexWorkload(id wid, w *Workload, ch Changes) {
	net := s.netID(w.Network(), true)
	for _, a := range w.Addresses {
		k := keyOf(net, a)
		s.byAddr.put(s.hashAddr(k), k, id)
	}
	if w.Hostname != "" {
		s.byHost[w.Hostname] = id
	}
	addWid(s.byNode, w.nodeSym(), id)
	for _, sp := range w.Services {
		addWid(s.endpoints, sp.Service, id)
		ch.Services[sp.Service] = struct{}{}
	}
	s.share(w)
}

func (s *Store) unindexWorkload(id wid, w *Workload, ch Changes) {
	net := s.netID(w.Network(), false)
	for _, a := range w.Addresses {
		k := keyOf(net, a)
		s.byAddr.del(s.hashAddr(k), k, id)
	}
	if w.Hostname != "" {
		if cur, ok := s.byHost[w.Hostname]; ok && cur == id {
			delete(s.byHost, w.Hostname)
		}
	}
	removeWid(s.byNode, w.nodeSym(), id)
	for _, sp := range w.Services {
		removeWid(s.endpoints, sp.Service, id)
		ch.Services[sp.Service] = struct{}{}
	}
	s.unshare(w)
}

func (s *Store) removeWorkload(id wid, w *Workload, ch Changes) {
	s.unindexWorkload(id, w, ch)
	s.byUID.del(s.hashUID(w.UID), w.UID, id)
	s.wl[id] = nil
	s.free = append(s.free, id)
	ch.Workloads[w.UID] = struct{}{}
}

// share replaces the workload's slices and gateways by equal ones already
// held for other workloads (the pods of a deployment have the same).
func (s *Store) share(w *Workload) {
	if len(w.Services) > 0 {
		s.scratch = appendServicesKey(s.scratch[:0], w.Services)
		w.Services = s.svcPorts.take(s.scratch, w.Services)
	}
	if len(w.AuthorizationPolicies) > 0 {
		s.scratch = appendStringsKey(s.scratch[:0], w.AuthorizationPolicies)
		w.AuthorizationPolicies = s.policyIDs.take(s.scratch, w.AuthorizationPolicies)
	}
	if w.Waypoint != nil {
		s.scratch = appendGatewayKey(s.scratch[:0], w.Waypoint)
		w.Waypoint = s.gateways.take(s.scratch, w.Waypoint)
	}
	if w.NetworkGateway != nil {
		s.scratch = appendGatewayKey(s.scratch[:0], w.NetworkGateway)
		w.NetworkGateway = s.gateways.take(s.scratch, w.NetworkGateway)
	}
}

func (s *Store) unshare(w *Workload) {
	if len(w.Services) > 0 {
		s.scratch = appendServicesKey(s.scratch[:0], w.Services)
		s.svcPorts.release(s.scratch)
	}
	if len(w.AuthorizationPolicies) > 0 {
		s.scratch = appendStringsKey(s.scratch[:0], w.AuthorizationPolicies)
		s.policyIDs.release(s.scratch)
	}
	if w.Waypoint != nil {
		s.scratch = appendGatewayKey(s.scratch[:0], w.Waypoint)
		s.gateways.release(s.scratch)
	}
	if w.NetworkGateway != nil {
		s.scratch = appendGatewayKey(s.scratch[:0], w.NetworkGateway)
		s.gateways.release(s.scratch)
	}
}

// netID numbers a network name; unknown names get a number only when add.
func (s *Store) netID(name string, add bool) uint32 {
	id, ok := s.networks[name]
	if !ok && add {
		id = uint32(len(s.networks))
		s.networks[name] = id
	}
	if !ok && !add {
		return noNetwork
	}
	return id
}

// key returns the index key of a, and false when its network was never seen.
func (s *Store) key(a NetworkAddr) (addrKey, bool) {
	net := s.netID(a.Network, false)
	return keyOf(net, a.Addr), net != noNetwork
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
	if keys := s.svcByHost[svc.Hostname]; !slices.Contains(keys, key) {
		keys = append(keys, key)
		slices.Sort(keys)
		s.svcByHost[svc.Hostname] = slices.Clip(keys)
	}
	for _, v := range svc.VIPs {
		s.svcByVIP[keyOf(s.netID(v.Network, true), v.Addr)] = key
	}
	ch.Services[key] = struct{}{}
}

func (s *Store) unindexService(svc *Service) {
	key := svc.Key()
	if keys := slices.DeleteFunc(slices.Clone(s.svcByHost[svc.Hostname]), func(k string) bool { return k == key }); len(keys) > 0 {
		s.svcByHost[svc.Hostname] = keys
	} else {
		delete(s.svcByHost, svc.Hostname)
	}
	for _, v := range svc.VIPs {
		if k, ok := s.key(v); ok && s.svcByVIP[k] == key {
			delete(s.svcByVIP, k)
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

func (s *Store) workload(uid string) *Workload {
	if id, ok := s.byUID.get(s.hashUID(uid), uid); ok {
		return s.wl[id]
	}
	return nil
}

// Workload returns a workload by UID.
func (s *Store) Workload(uid string) *Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.workload(uid)
}

// WorkloadByAddr returns the workload owning an address.
func (s *Store) WorkloadByAddr(a NetworkAddr) *Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	k, ok := s.key(a)
	if !ok {
		return nil
	}
	if id, ok := s.byAddr.get(s.hashAddr(k), k); ok {
		return s.wl[id]
	}
	return nil
}

// WorkloadByHostname returns the workload with a hostname (DNS-addressed workloads).
func (s *Store) WorkloadByHostname(h string) *Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if id, ok := s.byHost[h]; ok {
		return s.wl[id]
	}
	return nil
}

// workloads returns the workloads of a handle set, sorted by UID.
func (s *Store) workloads(set *widSet) []*Workload {
	if set == nil {
		return []*Workload{}
	}
	out := make([]*Workload, 0, set.len())
	for id := range set.all() {
		out = append(out, s.wl[id])
	}
	slices.SortFunc(out, func(a, b *Workload) int { return strings.Compare(a.UID, b.UID) })
	return out
}

// WorkloadsOnNode returns the workloads scheduled on node.
func (s *Store) WorkloadsOnNode(node string) []*Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.workloads(s.byNode[symOf(node)])
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
	k, ok := s.key(a)
	if !ok {
		return nil
	}
	return s.services[s.svcByVIP[k]]
}

// ServicesByHostname returns the services with a hostname, in every namespace.
func (s *Store) ServicesByHostname(h string) []*Service {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []*Service
	for _, k := range s.svcByHost[h] {
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
	ws := s.workloads(s.endpoints[key])
	out := make([]Endpoint, len(ws))
	for i, w := range ws {
		ports, _ := w.PortsFor(key)
		out[i] = Endpoint{Workload: w, Ports: ports}
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
	maps.Copy(keys, s.polByNS[w.Namespace()])
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
	for _, w := range s.wl {
		if w != nil {
			snap.Workloads = append(snap.Workloads, w)
		}
	}
	slices.SortFunc(snap.Workloads, func(a, b *Workload) int { return strings.Compare(a.UID, b.UID) })
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
	return s.byUID.len(), len(s.services), len(s.policies)
}
