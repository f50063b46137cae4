package state

import (
	"encoding/binary"
	"iter"
	"maps"
	"net/netip"
	"slices"
)

// Compact index pieces: a node's daemon indexes every workload of the mesh
// (100k workloads is a mid-sized mesh), so what is stored per workload per
// index counts.

// wid is a workload's handle in a Store: its slot in Store.wl. Secondary
// indexes hold handles (4 bytes, no pointer for the GC to scan) instead of
// UID strings (16 bytes plus the text) or pointers.
type wid uint32

// addrKey is an address within a network as the indexes key it: 24 bytes
// without pointers, where NetworkAddr is 40 with two (and a map of them is
// scanned by the GC).
type addrKey struct {
	ip  [16]byte
	net uint32 // the network's number in Store.networks
	is4 bool   // 10.0.0.1 and ::ffff:10.0.0.1 stay distinct keys, as in netip
}

// noNetwork numbers a network the store has never seen: no key holds it.
const noNetwork = ^uint32(0)

// keyOf ignores a's IPv6 zone: addresses from the control plane carry none.
func keyOf(net uint32, a netip.Addr) addrKey {
	return addrKey{ip: a.As16(), net: net, is4: a.Is4()}
}

// smallSet is the size up to which a widSet is a slice: a service usually
// has a handful of endpoints, and a slice of them costs 4 bytes each where
// a map costs a few dozen bytes of table even when nearly empty.
const smallSet = 32

// widSet is a set of workload handles: a slice while small, a map beyond
// smallSet (a node's workloads, a large service's endpoints).
type widSet struct {
	small []wid
	big   map[wid]struct{}
}

func (s *widSet) add(id wid) {
	switch {
	case s.big != nil:
		s.big[id] = struct{}{}
	case slices.Contains(s.small, id):
	case len(s.small) < smallSet:
		s.small = append(s.small, id)
	default:
		s.big = make(map[wid]struct{}, 2*smallSet)
		for _, x := range s.small {
			s.big[x] = struct{}{}
		}
		s.big[id] = struct{}{}
		s.small = nil
	}
}

func (s *widSet) remove(id wid) {
	if s.big != nil {
		delete(s.big, id)
		return
	}
	if i := slices.Index(s.small, id); i >= 0 {
		last := len(s.small) - 1
		s.small[i] = s.small[last]
		s.small = s.small[:last]
	}
}

func (s *widSet) len() int {
	if s.big != nil {
		return len(s.big)
	}
	return len(s.small)
}

// all yields the handles in no particular order.
func (s *widSet) all() iter.Seq[wid] {
	if s.big != nil {
		return maps.Keys(s.big)
	}
	return slices.Values(s.small)
}

func addWid[K comparable](m map[K]*widSet, k K, id wid) {
	s := m[k]
	if s == nil {
		s = &widSet{}
		m[k] = s
	}
	s.add(id)
}

func removeWid[K comparable](m map[K]*widSet, k K, id wid) {
	if s := m[k]; s != nil {
		s.remove(id)
		if s.len() == 0 {
			delete(m, k)
		}
	}
}

// sharedTable holds one copy of values many workloads have in common, by
// content, counting their holders: the services selecting the pods of a
// deployment, their waypoint. Values are never modified once shared.
type sharedTable[T any] struct {
	m map[string]*sharedValue[T]
}

type sharedValue[T any] struct {
	v    T
	refs int
}

// take returns the shared value with content key (v itself if none is
// shared yet) and counts one more holder.
func (t *sharedTable[T]) take(key []byte, v T) T {
	if e, ok := t.m[string(key)]; ok {
		e.refs++
		return e.v
	}
	if t.m == nil {
		t.m = map[string]*sharedValue[T]{}
	}
	t.m[string(key)] = &sharedValue[T]{v: v, refs: 1}
	return v
}

// release counts one holder less of the value with content key.
func (t *sharedTable[T]) release(key []byte) {
	if e, ok := t.m[string(key)]; ok {
		if e.refs--; e.refs == 0 {
			delete(t.m, string(key))
		}
	}
}

func (t *sharedTable[T]) len() int { return len(t.m) }

// Content keys: unambiguous encodings (lengths before contents).

func appendStr(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendServicesKey(b []byte, sps []ServicePorts) []byte {
	for _, sp := range sps {
		b = appendStr(b, sp.Service)
		n := uint64(len(sp.Ports)) + 1 // 0: nil, which compares unequal to empty
		if sp.Ports == nil {
			n = 0
		}
		b = binary.AppendUvarint(b, n)
		for _, p := range sp.Ports {
			b = binary.BigEndian.AppendUint16(b, p.ServicePort)
			b = binary.BigEndian.AppendUint16(b, p.TargetPort)
		}
	}
	return b
}

func appendStringsKey(b []byte, ss []string) []byte {
	for _, s := range ss {
		b = appendStr(b, s)
	}
	return b
}

func appendGatewayKey(b []byte, g *GatewayAddress) []byte {
	b = appendStr(b, g.Hostname)
	b = binary.BigEndian.AppendUint16(b, g.HBONEMTLSPort)
	if g.Address != nil {
		b = append(b, 1)
		b = appendStr(b, g.Address.Network)
		b, _ = g.Address.Addr.AppendBinary(b)
	}
	return b
}
