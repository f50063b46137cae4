// Package bpftest is an in-memory stand-in for the kernel's maps (bpf.Maps)
// for tests that check what user space writes without root: the same typed
// API, the same capacities and MapFullError, the kernel's batch semantics
// (a batch that fails part-way leaves the entries before the failure
// written), and faults injected at any write.
package bpftest

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"

	"kmesh.dev/kmesh/bpf"
)

// Map names, as the kernel's maps are called.
const (
	Managed  = "kmesh_managed"
	Frontend = "kmesh_frontend"
	Service  = "kmesh_service"
	Endpoint = "kmesh_endpoint"
	Backend  = "kmesh_backend"
	Authz    = "kmesh_authz"
	VIP      = "kmesh_vip"
)

// Maps holds the load-balancing maps in memory. Safe for concurrent use.
type Maps struct {
	mu        sync.Mutex
	managed   table[uint64, uint32]
	frontends table[bpf.FrontendKey, bpf.Frontend]
	services  table[uint32, bpf.Service]
	endpoints table[bpf.EndpointKey, bpf.EndpointSlot]
	backends  table[uint32, bpf.Backend]
	authz     table[bpf.AuthzKey, bpf.Authz]
	vips      table[netip.Addr, uint32]

	// Fault, when set, is asked before every element written or deleted:
	// a non-nil error stops that batch there (earlier elements stay
	// written, as with the kernel's batch operations) and is returned.
	Fault func(op Op) error
	ops   map[string]int
}

// Op names one element write: the map, "put" or "delete", and its index
// within the batch.
type Op struct {
	Map   string
	Kind  string
	Index int
}

type table[K comparable, V any] struct {
	name string
	max  uint32
	m    map[K]V
}

// New returns empty maps with the given capacities; a zero size means the
// kernel object's default.
func New(sizes bpf.MapSizes) *Maps {
	def := func(n, d uint32) uint32 {
		if n == 0 {
			return d
		}
		return n
	}
	return &Maps{
		managed:   table[uint64, uint32]{Managed, def(sizes.Managed, 4096), map[uint64]uint32{}},
		frontends: table[bpf.FrontendKey, bpf.Frontend]{Frontend, def(sizes.Frontend, 262144), map[bpf.FrontendKey]bpf.Frontend{}},
		services:  table[uint32, bpf.Service]{Service, def(sizes.Service, 65536), map[uint32]bpf.Service{}},
		endpoints: table[bpf.EndpointKey, bpf.EndpointSlot]{Endpoint, def(sizes.Endpoint, 524288), map[bpf.EndpointKey]bpf.EndpointSlot{}},
		backends:  table[uint32, bpf.Backend]{Backend, def(sizes.Backend, 131072), map[uint32]bpf.Backend{}},
		authz:     table[bpf.AuthzKey, bpf.Authz]{Authz, 65536, map[bpf.AuthzKey]bpf.Authz{}},
		vips:      table[netip.Addr, uint32]{VIP, 65536, map[netip.Addr]uint32{}},
		ops:       map[string]int{},
	}
}

func put[K comparable, V any](m *Maps, t *table[K, V], keys []K, vals []V) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i, k := range keys {
		if m.Fault != nil {
			if err := m.Fault(Op{Map: t.name, Kind: "put", Index: i}); err != nil {
				return err
			}
		}
		if _, ok := t.m[k]; !ok && uint32(len(t.m)) >= t.max {
			return &bpf.MapFullError{Map: t.name, MaxEntries: t.max}
		}
		t.m[k] = vals[i]
		m.ops[t.name+" put"]++
	}
	return nil
}

func del[K comparable, V any](m *Maps, t *table[K, V], keys []K) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i, k := range keys {
		if m.Fault != nil {
			if err := m.Fault(Op{Map: t.name, Kind: "delete", Index: i}); err != nil {
				return err
			}
		}
		if _, ok := t.m[k]; ok {
			delete(t.m, k)
			m.ops[t.name+" delete"]++
		}
	}
	return nil
}

func values[K comparable, V any](m *Maps, t *table[K, V]) []V {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Collect(maps.Values(t.m))
}

// Writes returns how many elements were written ("put") or removed
// ("delete") in the named map since New or ResetCounts.
func (m *Maps) Writes(mapName, kind string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.ops[mapName+" "+kind]
}

// ResetCounts zeroes the write counters.
func (m *Maps) ResetCounts() {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.ops)
}

// Len returns the number of entries of the named map.
func (m *Maps) Len(mapName string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch mapName {
	case Managed:
		return len(m.managed.m)
	case Frontend:
		return len(m.frontends.m)
	case Service:
		return len(m.services.m)
	case Endpoint:
		return len(m.endpoints.m)
	case Backend:
		return len(m.backends.m)
	case Authz:
		return len(m.authz.m)
	case VIP:
		return len(m.vips.m)
	}
	panic(fmt.Sprintf("bpftest: no map %q", mapName))
}

func (m *Maps) SetManaged(cookie uint64, backendID uint32) error {
	return put(m, &m.managed, []uint64{cookie}, []uint32{backendID})
}

func (m *Maps) DeleteManaged(cookie uint64) error { return del(m, &m.managed, []uint64{cookie}) }

func (m *Maps) Managed() (map[uint64]uint32, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return maps.Clone(m.managed.m), nil
}

func (m *Maps) UpsertFrontends(fs []bpf.Frontend) error {
	keys := make([]bpf.FrontendKey, len(fs))
	for i, f := range fs {
		keys[i] = f.Key
	}
	return put(m, &m.frontends, keys, fs)
}

func (m *Maps) DeleteFrontends(ks []bpf.FrontendKey) error { return del(m, &m.frontends, ks) }

func (m *Maps) Frontends() ([]bpf.Frontend, error) { return values(m, &m.frontends), nil }

// LookupFrontend reads one frontend.
func (m *Maps) LookupFrontend(k bpf.FrontendKey) (bpf.Frontend, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	f, ok := m.frontends.m[k]
	return f, ok, nil
}

func (m *Maps) PutServices(ss []bpf.Service) error {
	keys := make([]uint32, len(ss))
	for i, s := range ss {
		keys[i] = s.ID
	}
	return put(m, &m.services, keys, ss)
}

func (m *Maps) DeleteServices(ids []uint32) error { return del(m, &m.services, ids) }

func (m *Maps) Services() ([]bpf.Service, error) { return values(m, &m.services), nil }

func (m *Maps) PutEndpoints(es []bpf.Endpoint) error {
	keys := make([]bpf.EndpointKey, len(es))
	vals := make([]bpf.EndpointSlot, len(es))
	for i, e := range es {
		keys[i], vals[i] = e.Key, e.Slot
	}
	return put(m, &m.endpoints, keys, vals)
}

func (m *Maps) DeleteEndpoints(ks []bpf.EndpointKey) error { return del(m, &m.endpoints, ks) }

func (m *Maps) Endpoints() ([]bpf.Endpoint, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]bpf.Endpoint, 0, len(m.endpoints.m))
	for k, v := range m.endpoints.m {
		out = append(out, bpf.Endpoint{Key: k, Slot: v})
	}
	return out, nil
}

func (m *Maps) PutBackends(bs []bpf.Backend) error {
	keys := make([]uint32, len(bs))
	for i, b := range bs {
		keys[i] = b.ID
	}
	return put(m, &m.backends, keys, bs)
}

func (m *Maps) DeleteBackends(ids []uint32) error { return del(m, &m.backends, ids) }

func (m *Maps) Backends() ([]bpf.Backend, error) { return values(m, &m.backends), nil }

func (m *Maps) PutAuthz(as []bpf.Authz) error {
	keys := make([]bpf.AuthzKey, len(as))
	for i, a := range as {
		if len(a.Except) > bpf.AuthzPorts {
			return fmt.Errorf("authz entry %v: %d port exceptions, at most %d fit", a.Key, len(a.Except), bpf.AuthzPorts)
		}
		keys[i] = a.Key
		as[i].Except = slices.Clone(a.Except)
	}
	return put(m, &m.authz, keys, as)
}

func (m *Maps) DeleteAuthz(ks []bpf.AuthzKey) error { return del(m, &m.authz, ks) }

func (m *Maps) Authz() ([]bpf.Authz, error) { return values(m, &m.authz), nil }

// PutVIPs writes the entries in address order (as bpf.Maps does).
func (m *Maps) PutVIPs(vips map[netip.Addr]uint32) error {
	keys := slices.SortedFunc(maps.Keys(vips), netip.Addr.Compare)
	vals := make([]uint32, len(keys))
	for i, a := range keys {
		vals[i] = vips[a]
	}
	return put(m, &m.vips, keys, vals)
}

func (m *Maps) DeleteVIPs(as []netip.Addr) error { return del(m, &m.vips, as) }

func (m *Maps) VIPs() (map[netip.Addr]uint32, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return maps.Clone(m.vips.m), nil
}
