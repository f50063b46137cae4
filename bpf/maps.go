package bpf

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"syscall"

	"github.com/cilium/ebpf"
)

// MapFullError says a map had no room for an entry. The caller gets it back
// (nothing is dropped silently) and is expected to log and count it.
type MapFullError struct {
	Map        string
	MaxEntries uint32
}

func (e *MapFullError) Error() string {
	return fmt.Sprintf("BPF map %s is full (max_entries %d): raise its size in the daemon configuration", e.Map, e.MaxEntries)
}

// Maps is the typed API over the data path's maps.
type Maps struct {
	// byName holds every map of the object, by name: the list comes from
	// the object itself (mapsOf), never from a list kept by hand.
	byName   map[string]*ebpf.Map
	managed  *ebpf.Map
	frontend *ebpf.Map
	service  *ebpf.Map
	endpoint *ebpf.Map
	backend  *ebpf.Map
	stats    *ebpf.Map
	statsExt *ebpf.Map // kmesh_stats_ext: counters from statMax on
	tunnel   *ebpf.Map
	inproxy  *ebpf.Map
	proxySk  *ebpf.Map
	authz    *ebpf.Map
	spliceNS *ebpf.Map
	vip      *ebpf.Map
}

// newMaps wraps the object's maps, by name.
func newMaps(byName map[string]*ebpf.Map) *Maps {
	return &Maps{byName: byName,
		managed: byName["kmesh_managed"], frontend: byName["kmesh_frontend"], service: byName["kmesh_service"],
		endpoint: byName["kmesh_endpoint"], backend: byName["kmesh_backend"], stats: byName["kmesh_stats"], statsExt: byName["kmesh_stats_ext"],
		tunnel: byName["kmesh_tunnel"], inproxy: byName["kmesh_inproxy"], proxySk: byName["kmesh_proxy_sk"],
		authz: byName["kmesh_authz"], spliceNS: byName["kmesh_splice_ns"], vip: byName["kmesh_vip"]}
}

// mapsOf lists the maps of a bpf2go objects struct by their ebpf tags.
func mapsOf(objs any) map[string]*ebpf.Map {
	out := map[string]*ebpf.Map{}
	v := reflect.ValueOf(objs).Elem()
	for i := range v.NumField() {
		if name := v.Type().Field(i).Tag.Get("ebpf"); name != "" {
			if m, ok := v.Field(i).Interface().(*ebpf.Map); ok {
				out[name] = m
			}
		}
	}
	return out
}

// MapNames lists the data path's maps, from the embedded object.
func MapNames() ([]string, error) {
	spec, err := loadSockAddr()
	if err != nil {
		return nil, err
	}
	var names []string
	for name := range spec.Maps {
		if !strings.HasPrefix(name, ".") {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return names, nil
}

// batchChunk bounds one batch syscall: big enough to amortise the syscall,
// small enough not to hold the map's buckets for long.
const batchChunk = 4096

func mapName(m *ebpf.Map) string {
	if info, err := m.Info(); err == nil && info.Name != "" {
		return info.Name
	}
	return m.String()
}

// wrapErr turns the kernel's "no room" answers into a MapFullError.
func wrapErr(m *ebpf.Map, op string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, syscall.E2BIG) || errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.ENOMEM) {
		return &MapFullError{Map: mapName(m), MaxEntries: m.MaxEntries()}
	}
	return fmt.Errorf("%s %s: %w", op, mapName(m), err)
}

func batchUpdate[K, V any](m *ebpf.Map, keys []K, vals []V) error {
	for start := 0; start < len(keys); start += batchChunk {
		end := min(start+batchChunk, len(keys))
		if _, err := m.BatchUpdate(keys[start:end], vals[start:end], nil); err != nil {
			return wrapErr(m, "update", err)
		}
	}
	return nil
}

// batchDelete deletes keys, ignoring the ones already gone.
func batchDelete[K any](m *ebpf.Map, keys []K) error {
	for start := 0; start < len(keys); start += batchChunk {
		end := min(start+batchChunk, len(keys))
		n, err := m.BatchDelete(keys[start:end], nil)
		if err == nil {
			continue
		}
		if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return wrapErr(m, "delete", err)
		}
		// The batch stopped at a missing key: finish the chunk one by one.
		for _, k := range keys[start+n : end] {
			if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return wrapErr(m, "delete", err)
			}
		}
	}
	return nil
}

func dump[K, V any](m *ebpf.Map, fn func(K, V)) error {
	var k K
	var v V
	it := m.Iterate()
	for it.Next(&k, &v) {
		fn(k, v)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("dumping %s: %w", mapName(m), err)
	}
	return nil
}

// SetManaged enrols a pod's network namespace: from now on its sockets are
// load-balanced. backendID is the pod's own workload, 0 when not yet known.
func (m *Maps) SetManaged(netnsCookie uint64, backendID uint32) error {
	return wrapErr(m.managed, "update", m.managed.Put(netnsCookie, sockAddrManagedValue{BackendId: backendID}))
}

// DeleteManaged unenrols a network namespace; absent cookies are ignored.
func (m *Maps) DeleteManaged(netnsCookie uint64) error {
	return batchDelete(m.managed, []uint64{netnsCookie})
}

// Managed returns the enrolled network namespace cookies and their workloads.
func (m *Maps) Managed() (map[uint64]uint32, error) {
	out := map[uint64]uint32{}
	err := dump(m.managed, func(k uint64, v sockAddrManagedValue) { out[k] = v.BackendId })
	return out, err
}

// UpsertFrontends writes frontends, replacing existing ones.
func (m *Maps) UpsertFrontends(fs []Frontend) error {
	keys := make([]sockAddrFrontendKey, len(fs))
	vals := make([]sockAddrFrontendValue, len(fs))
	for i, f := range fs {
		keys[i], vals[i] = encodeFrontendKey(f.Key), encodeFrontendValue(f)
	}
	return batchUpdate(m.frontend, keys, vals)
}

// DeleteFrontends removes frontends; absent keys are ignored.
func (m *Maps) DeleteFrontends(ks []FrontendKey) error {
	keys := make([]sockAddrFrontendKey, len(ks))
	for i, k := range ks {
		keys[i] = encodeFrontendKey(k)
	}
	return batchDelete(m.frontend, keys)
}

// Frontends dumps kmesh_frontend.
func (m *Maps) Frontends() ([]Frontend, error) {
	var out []Frontend
	err := dump(m.frontend, func(k sockAddrFrontendKey, v sockAddrFrontendValue) { out = append(out, decodeFrontend(k, v)) })
	return out, err
}

// PutServices writes services, replacing existing ones.
func (m *Maps) PutServices(ss []Service) error {
	keys := make([]uint32, len(ss))
	vals := make([]sockAddrServiceValue, len(ss))
	for i, s := range ss {
		keys[i], vals[i] = s.ID, encodeService(s)
	}
	return batchUpdate(m.service, keys, vals)
}

// DeleteServices removes services; absent ids are ignored.
func (m *Maps) DeleteServices(ids []uint32) error {
	return batchDelete(m.service, ids)
}

// Services dumps kmesh_service.
func (m *Maps) Services() ([]Service, error) {
	var out []Service
	err := dump(m.service, func(k uint32, v sockAddrServiceValue) { out = append(out, decodeService(k, v)) })
	return out, err
}

// PutEndpoints writes alias-table slots.
func (m *Maps) PutEndpoints(es []Endpoint) error {
	keys := make([]sockAddrEndpointKey, len(es))
	vals := make([]sockAddrEndpointValue, len(es))
	for i, e := range es {
		keys[i], vals[i] = encodeEndpointKey(e.Key), encodeEndpoint(e)
	}
	return batchUpdate(m.endpoint, keys, vals)
}

// DeleteEndpoints removes slots; absent keys are ignored.
func (m *Maps) DeleteEndpoints(ks []EndpointKey) error {
	keys := make([]sockAddrEndpointKey, len(ks))
	for i, k := range ks {
		keys[i] = encodeEndpointKey(k)
	}
	return batchDelete(m.endpoint, keys)
}

// Endpoints dumps kmesh_endpoint.
func (m *Maps) Endpoints() ([]Endpoint, error) {
	var out []Endpoint
	err := dump(m.endpoint, func(k sockAddrEndpointKey, v sockAddrEndpointValue) {
		out = append(out, Endpoint{Key: decodeEndpointKey(k), Slot: decodeSlot(v)})
	})
	return out, err
}

// PutBackends writes backends, replacing existing ones.
func (m *Maps) PutBackends(bs []Backend) error {
	keys := make([]uint32, len(bs))
	vals := make([]sockAddrBackendValue, len(bs))
	for i, b := range bs {
		keys[i], vals[i] = b.ID, encodeBackend(b)
	}
	return batchUpdate(m.backend, keys, vals)
}

// DeleteBackends removes backends; absent ids are ignored.
func (m *Maps) DeleteBackends(ids []uint32) error {
	return batchDelete(m.backend, ids)
}

// Backends dumps kmesh_backend.
func (m *Maps) Backends() ([]Backend, error) {
	var out []Backend
	err := dump(m.backend, func(k uint32, v sockAddrBackendValue) { out = append(out, decodeBackend(k, v)) })
	return out, err
}

// PutAuthz writes kmesh_authz entries, replacing existing ones.
func (m *Maps) PutAuthz(as []Authz) error {
	keys := make([]sockAddrAuthzKey, len(as))
	vals := make([]sockAddrAuthzValue, len(as))
	for i, a := range as {
		k, v, err := encodeAuthz(a)
		if err != nil {
			return err
		}
		keys[i], vals[i] = k, v
	}
	return batchUpdate(m.authz, keys, vals)
}

// DeleteAuthz removes kmesh_authz entries; absent keys are ignored.
func (m *Maps) DeleteAuthz(ks []AuthzKey) error {
	keys := make([]sockAddrAuthzKey, len(ks))
	for i, k := range ks {
		keys[i] = encodeAuthzKey(k)
	}
	return batchDelete(m.authz, keys)
}

// Authz dumps kmesh_authz.
func (m *Maps) Authz() ([]Authz, error) {
	var out []Authz
	err := dump(m.authz, func(_ sockAddrAuthzKey, v sockAddrAuthzValue) { out = append(out, decodeAuthz(v)) })
	return out, err
}

// PutVIPs writes kmesh_vip entries: addresses that are service VIPs and
// nothing else, with how many services claim each. The connect programs
// refuse such an address on a port no frontend names.
func (m *Maps) PutVIPs(vips map[netip.Addr]uint32) error {
	keys := make([]sockAddrVipKey, 0, len(vips))
	vals := make([]sockAddrVipValue, 0, len(vips))
	for _, a := range slices.SortedFunc(maps.Keys(vips), netip.Addr.Compare) {
		keys = append(keys, sockAddrVipKey{Addr: addrWords(a)})
		vals = append(vals, sockAddrVipValue{Services: vips[a]})
	}
	return batchUpdate(m.vip, keys, vals)
}

// DeleteVIPs removes kmesh_vip entries; absent keys are ignored.
func (m *Maps) DeleteVIPs(as []netip.Addr) error {
	keys := make([]sockAddrVipKey, len(as))
	for i, a := range as {
		keys[i] = sockAddrVipKey{Addr: addrWords(a)}
	}
	return batchDelete(m.vip, keys)
}

// VIPs dumps kmesh_vip.
func (m *Maps) VIPs() (map[netip.Addr]uint32, error) {
	out := map[netip.Addr]uint32{}
	err := dump(m.vip, func(k sockAddrVipKey, v sockAddrVipValue) { out[wordsAddr(k.Addr)] = v.Services })
	return out, err
}

// statMax is STAT_MAX: kmesh_stats' size (frozen), where kmesh_stats_ext
// takes over (TestStatNames checks both against the object).
const statMax = 24

// Stat names, in the order of enum kmesh_stat.
var statNames = []string{
	"lb_service",
	"lb_no_endpoint",
	"lb_no_family",
	"lb_retry",
	"lb_passthrough",
	"workload_direct",
	"peer_rewritten",
	"storage_fail",
	"udp_affinity",
	"tunnel",
	"tunnel_no_orig",
	"tunnel_record",
	"tunnel_record_fail",
	"path_refused",
	"no_backend",
	"inbound_proxy",
	"inbound_no_proxy",
	"record_reused",
	"conn_event",
	"conn_event_drop",
	"dns_captured",
	"dns_no_storage",
	"authz_allow",
	"authz_deny",
	"authz_no_entry",
	"inbound_authed",
	"splice_insert",
	"splice_full",
	"splice_bytes",
	"splice_no_peer",
	"vip_no_port",
	"sidecar_captured",
	"sidecar_orig",
	"sidecar_no_record",
	"splice_budget",
}

// Stats sums the per-CPU data path counters.
func (m *Maps) Stats() (map[string]uint64, error) {
	out := make(map[string]uint64, len(statNames))
	for i, name := range statNames {
		var perCPU []uint64
		sm, idx := m.stats, uint32(i)
		if i >= statMax {
			sm, idx = m.statsExt, uint32(i-statMax)
		}
		if err := sm.Lookup(idx, &perCPU); err != nil {
			return nil, fmt.Errorf("reading kmesh_stats[%s]: %w", name, err)
		}
		var sum uint64
		for _, v := range perCPU {
			sum += v
		}
		out[name] = sum
	}
	return out, nil
}

// MaxEntries returns the capacity of each sized map, by map name (socket
// storage has none: it lives and dies with its sockets).
func (m *Maps) MaxEntries() map[string]uint32 {
	out := map[string]uint32{}
	for name, mp := range m.byName {
		if n := mp.MaxEntries(); n > 0 && mp.Type() != ebpf.PerCPUArray {
			out[name] = n
		}
	}
	return out
}

// LookupFrontend reads one frontend.
func (m *Maps) LookupFrontend(k FrontendKey) (Frontend, bool, error) {
	var v sockAddrFrontendValue
	ek := encodeFrontendKey(k)
	if err := m.frontend.Lookup(&ek, &v); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Frontend{}, false, nil
		}
		return Frontend{}, false, wrapErr(m.frontend, "lookup", err)
	}
	return decodeFrontend(ek, v), true, nil
}

// LookupService reads one service.
func (m *Maps) LookupService(id uint32) (Service, bool, error) {
	var v sockAddrServiceValue
	if err := m.service.Lookup(&id, &v); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Service{}, false, nil
		}
		return Service{}, false, wrapErr(m.service, "lookup", err)
	}
	return decodeService(id, v), true, nil
}

// TakeTunnel returns, and forgets, what the kernel recorded for the tunnelled
// connection whose client is client (as the proxy's accepted socket sees its
// peer) inside the network namespace with the given cookie.
func (m *Maps) TakeTunnel(netnsCookie uint64, client netip.AddrPort) (TunnelOrig, bool, error) {
	k := encodeTunnelKey(netnsCookie, client)
	var v sockAddrTunnelValue
	if err := m.tunnel.LookupAndDelete(&k, &v); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return TunnelOrig{}, false, nil
		}
		return TunnelOrig{}, false, wrapErr(m.tunnel, "lookup", err)
	}
	return decodeTunnel(v), true, nil
}

// SetInboundListener makes the socket with file descriptor fd (the node
// proxy's listener on 15006 inside a pod) where the pod's inbound
// enforcement (kmesh_inbound) sends connections to addr that policies must
// see. The kernel drops the entry when the socket closes.
func (m *Maps) SetInboundListener(addr netip.Addr, fd uintptr) error {
	k := sockAddrInboundKey{Addr: addrWords(netip.AddrFrom16(addr.As16()))}
	return wrapErr(m.inproxy, "update", m.inproxy.Update(&k, uint64(fd), ebpf.UpdateAny))
}

// DeleteInboundListener forgets a pod address's listener; absent ones are
// ignored.
func (m *Maps) DeleteInboundListener(addr netip.Addr) error {
	k := sockAddrInboundKey{Addr: addrWords(netip.AddrFrom16(addr.As16()))}
	if err := m.inproxy.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return wrapErr(m.inproxy, "delete", err)
	}
	return nil
}

// InboundListeners returns the addresses with a listener, and each
// listener's socket cookie.
func (m *Maps) InboundListeners() (map[netip.Addr]uint64, error) {
	out := map[netip.Addr]uint64{}
	err := dump(m.inproxy, func(k sockAddrInboundKey, cookie uint64) { out[wordsAddr(k.Addr)] = cookie })
	return out, err
}

// MarkProxySocket records the socket with file descriptor fd as the node
// proxy's own: the connect programs leave its connect alone. Call it
// before connecting from inside a pod.
func (m *Maps) MarkProxySocket(fd uintptr) error {
	return wrapErr(m.proxySk, "update", m.proxySk.Update(int32(fd), uint32(1), ebpf.UpdateAny))
}

// SetDNSCapture turns the kernel's DNS capture on or off: enrolled pods'
// queries to port 53 go to port on their own loopback (the node proxy's
// DNS server) while it is on.
func (m *Maps) SetDNSCapture(on bool, port uint16) error {
	v := sockAddrDnsConfig{Port: port}
	if on {
		v.Enabled = 1
	}
	mp := m.byName["kmesh_dns"]
	return wrapErr(mp, "update", mp.Update(uint32(0), v, ebpf.UpdateAny))
}

// DNSCapture reads the capture switch and port.
func (m *Maps) DNSCapture() (on bool, port uint16, err error) {
	var v sockAddrDnsConfig
	mp := m.byName["kmesh_dns"]
	if err := mp.Lookup(uint32(0), &v); err != nil {
		return false, 0, wrapErr(mp, "lookup", err)
	}
	return v.Enabled != 0, v.Port, nil
}

// MarkProxySocketPinned is MarkProxySocket on the maps a daemon pinned
// under root (for tests that play the proxy from another process).
func MarkProxySocketPinned(root string, fd uintptr) error {
	m, err := ebpf.LoadPinnedMap(filepath.Join(PinDir(root), "kmesh_proxy_sk"), nil)
	if err != nil {
		return err
	}
	defer m.Close()
	return (&Maps{proxySk: m}).MarkProxySocket(fd)
}

// SetSpliceNS opts the network namespace with the given cookie into
// splicing (flags: SpliceInPod for a pod that keeps an Istio sidecar,
// SplicePeers for an enrolled pod while Config.Splice is off). Zero flags
// withdraw the opt-in; connections spliced so far stay spliced until they
// close.
func (m *Maps) SetSpliceNS(netnsCookie uint64, flags SpliceNS) error {
	if flags == 0 {
		if err := m.spliceNS.Delete(netnsCookie); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return wrapErr(m.spliceNS, "delete", err)
		}
		return nil
	}
	return wrapErr(m.spliceNS, "update", m.spliceNS.Update(netnsCookie, uint32(flags), ebpf.UpdateAny))
}

// SpliceNamespaces lists the namespaces opted into splicing.
func (m *Maps) SpliceNamespaces() (map[uint64]SpliceNS, error) {
	out := map[uint64]SpliceNS{}
	err := dump(m.spliceNS, func(k uint64, v uint32) { out[k] = SpliceNS(v) })
	return out, err
}

// SpliceEnd is one spliced connection end as kmesh_splice holds it.
type SpliceEnd struct {
	Local, Remote netip.AddrPort
	// NetnsCookie is set when both ends share a namespace (in-pod legs).
	NetnsCookie  uint64
	SocketCookie uint64
}

// SpliceEnds lists the connection ends in kmesh_splice.
func (m *Maps) SpliceEnds() ([]SpliceEnd, error) {
	var out []SpliceEnd
	err := dump(m.byName["kmesh_splice"], func(k sockAddrSpliceKey, cookie uint64) {
		out = append(out, SpliceEnd{
			Local:       netip.AddrPortFrom(wordsAddr(k.Local), ntohs(k.LocalPort)),
			Remote:      netip.AddrPortFrom(wordsAddr(k.Remote), ntohs(k.RemotePort)),
			NetnsCookie: k.NetnsCookie, SocketCookie: cookie,
		})
	})
	return out, err
}

// SpliceReceived returns the bytes sk_msg redirected into the reported
// spliced socket whose own view of its connection is local, remote (its
// kmesh_splice_rx entry; 0 when it has none), for telemetry of
// long-lived connections: TCP's counters miss those bytes. netnsCookie
// matters only for connections inside one namespace (the key's rule,
// kmesh_splice.h).
func (m *Maps) SpliceReceived(local, remote netip.AddrPort, netnsCookie uint64) (uint64, error) {
	k := sockAddrSpliceKey{Local: addrWords(local.Addr()), Remote: addrWords(remote.Addr()),
		LocalPort: htons(local.Port()), RemotePort: htons(remote.Port())}
	if r := remote.Addr().Unmap(); r.IsLoopback() || local.Addr().Unmap() == r {
		k.NetnsCookie = netnsCookie
	}
	var n uint64
	err := m.byName["kmesh_splice_rx"].Lookup(&k, &n)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, nil
	}
	return n, err
}

// SetSpliceNSPinned is SetSpliceNS on the maps a daemon pinned under root
// (the benchmark opts its arms' pods in from outside the daemon).
func SetSpliceNSPinned(root string, netnsCookie uint64, flags SpliceNS) error {
	m, err := ebpf.LoadPinnedMap(filepath.Join(PinDir(root), "kmesh_splice_ns"), nil)
	if err != nil {
		return err
	}
	defer m.Close()
	return (&Maps{spliceNS: m}).SetSpliceNS(netnsCookie, flags)
}

// SetSidecarPod registers the pod in the network namespace with the given
// cookie, at IPv4 address addr, as one whose sidecar capture the kernel
// performs (kmesh_sidecar, kmesh_sidecar_ns): its application's connects go
// to its sidecar's 15001, the sidecar of another such pod dials its 15006
// at connect, and legs between the two are spliced. Set it together with
// SpliceInPod|SpliceSidecar on the namespace (SetSpliceNS). IPv4 only: an
// IPv6 pod keeps its iptables capture.
func (m *Maps) SetSidecarPod(netnsCookie uint64, addr netip.Addr) error {
	if !addr.Unmap().Is4() {
		return fmt.Errorf("sidecar capture in the kernel is IPv4 only, not %s", addr)
	}
	k := sockAddrSidecarKey{Addr: addrWords(addr)}
	byAddr, byNS := m.byName["kmesh_sidecar"], m.byName["kmesh_sidecar_ns"]
	// The address first: a namespace whose connects are captured always
	// finds its own pod among the pods.
	if err := byAddr.Update(&k, &sockAddrSidecarValue{NetnsCookie: netnsCookie}, ebpf.UpdateAny); err != nil {
		return wrapErr(byAddr, "update", err)
	}
	if err := byNS.Update(netnsCookie, &k, ebpf.UpdateAny); err != nil {
		return wrapErr(byNS, "update", err)
	}
	on := m.byName["kmesh_sidecar_on"]
	return wrapErr(on, "update", on.Update(uint32(0), uint32(1), ebpf.UpdateAny))
}

// DeleteSidecarPod withdraws SetSidecarPod; absent is not an error.
func (m *Maps) DeleteSidecarPod(netnsCookie uint64) error {
	byAddr, byNS := m.byName["kmesh_sidecar"], m.byName["kmesh_sidecar_ns"]
	var k sockAddrSidecarKey
	if err := byNS.Lookup(netnsCookie, &k); errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	} else if err != nil {
		return wrapErr(byNS, "lookup", err)
	}
	if err := byNS.Delete(netnsCookie); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return wrapErr(byNS, "delete", err)
	}
	var v sockAddrSidecarValue
	// The address only while it is still this namespace's.
	if err := byAddr.Lookup(&k, &v); err == nil && v.NetnsCookie == netnsCookie {
		if err := byAddr.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return wrapErr(byAddr, "delete", err)
		}
	}
	// The last one gone: other connects skip the capture again.
	var any uint64
	if err := byNS.NextKey(nil, &any); errors.Is(err, ebpf.ErrKeyNotExist) {
		on := m.byName["kmesh_sidecar_on"]
		return wrapErr(on, "update", on.Update(uint32(0), uint32(0), ebpf.UpdateAny))
	}
	return nil
}

// SidecarPods lists the pods of the kernel's sidecar capture: netns cookie
// -> pod address (kmesh_sidecar_ns).
func (m *Maps) SidecarPods() (map[uint64]netip.Addr, error) {
	out := map[uint64]netip.Addr{}
	err := dump(m.byName["kmesh_sidecar_ns"], func(c uint64, k sockAddrSidecarKey) { out[c] = wordsAddr(k.Addr) })
	return out, err
}

// sidecarAddrs lists kmesh_sidecar: pod address -> netns cookie.
func (m *Maps) sidecarAddrs() (map[netip.Addr]uint64, error) {
	out := map[netip.Addr]uint64{}
	err := dump(m.byName["kmesh_sidecar"], func(k sockAddrSidecarKey, v sockAddrSidecarValue) { out[wordsAddr(k.Addr)] = v.NetnsCookie })
	return out, err
}

// SidecarOrig is one kmesh_sidecar_orig record: a connection the sidecar
// capture redirected, as its connecting end sees it, and where it was going.
type SidecarOrig struct {
	Local, Remote netip.AddrPort
	NetnsCookie   uint64 // set when both ends share a namespace
	Orig          netip.AddrPort
}

// SidecarOrigs lists kmesh_sidecar_orig.
func (m *Maps) SidecarOrigs() ([]SidecarOrig, error) {
	var out []SidecarOrig
	err := dump(m.byName["kmesh_sidecar_orig"], func(k sockAddrSpliceKey, v sockAddrOrigDst) {
		out = append(out, SidecarOrig{
			Local:       netip.AddrPortFrom(wordsAddr(k.Local), ntohs(k.LocalPort)),
			Remote:      netip.AddrPortFrom(wordsAddr(k.Remote), ntohs(k.RemotePort)),
			NetnsCookie: k.NetnsCookie,
			Orig:        netip.AddrPortFrom(wordsAddr(v.Addr), ntohs(v.Port)),
		})
	})
	return out, err
}

// SetSidecarPinned opts a pod into the kernel's sidecar capture on the maps
// a daemon pinned under root (the benchmark, from outside the daemon):
// SpliceInPod|SpliceSidecar on its namespace and its address in
// kmesh_sidecar.
func SetSidecarPinned(root string, netnsCookie uint64, addr netip.Addr) error {
	m := &Maps{byName: map[string]*ebpf.Map{}}
	for _, name := range []string{"kmesh_splice_ns", "kmesh_sidecar", "kmesh_sidecar_ns", "kmesh_sidecar_on"} {
		mp, err := ebpf.LoadPinnedMap(filepath.Join(PinDir(root), name), nil)
		if err != nil {
			return err
		}
		defer mp.Close()
		m.byName[name] = mp
	}
	m.spliceNS = m.byName["kmesh_splice_ns"]
	if err := m.SetSidecarPod(netnsCookie, addr); err != nil {
		return err
	}
	return m.SetSpliceNS(netnsCookie, SpliceInPod|SpliceSidecar)
}
