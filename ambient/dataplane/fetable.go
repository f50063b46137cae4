package dataplane

import (
	"net/netip"

	"kmesh.dev/kmesh/bpf"
)

// feTable mirrors the service entries of kmesh_frontend with their owners,
// compactly (a node holds every service port of the mesh, twice: TCP and
// UDP): 20-byte pointer-free keys and 12-byte values, where a map of
// bpf.FrontendKey to owner key and bpf.Frontend took 80 bytes a slot.
type feTable map[feKey]feVal

type feKey struct {
	addr  [16]byte
	port  uint16
	proto bpf.Proto
}

type feVal struct {
	owner  uint32 // service index; orphanOwner until adopted
	id     uint32
	target uint16
	kind   bpf.FrontendKind
	path   bpf.Path
}

func keyOf(k bpf.FrontendKey) feKey {
	return feKey{addr: k.Addr.Unmap().As16(), port: k.Port, proto: k.Proto}
}

func (k feKey) frontendKey() bpf.FrontendKey {
	return bpf.FrontendKey{Addr: netip.AddrFrom16(k.addr).Unmap(), Port: k.port, Proto: k.proto}
}

// get returns the entry of k, with its kernel value whole.
func (t feTable) get(k bpf.FrontendKey) (feEntry, bool) {
	v, ok := t[keyOf(k)]
	if !ok {
		return feEntry{}, false
	}
	return feEntry{owner: v.owner, val: bpf.Frontend{Key: k, Kind: v.kind, ID: v.id, TargetPort: v.target, Path: v.path}}, true
}

func (t feTable) set(owner uint32, f bpf.Frontend) {
	t[keyOf(f.Key)] = feVal{owner: owner, id: f.ID, target: f.TargetPort, kind: f.Kind, path: f.Path}
}

func (t feTable) del(k bpf.FrontendKey) { delete(t, keyOf(k)) }
