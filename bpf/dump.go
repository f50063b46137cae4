package bpf

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
)

// Table is a decoded map, ready to print: one row per entry.
type Table struct {
	Map    string
	Header []string
	Rows   [][]string
	// Note says why a map has no rows to show, when it cannot have any.
	Note string
}

// dumpers decode each map of the object. TestEveryMapDecodes fails when a
// map is added to kmesh_maps.h without one here.
var dumpers = map[string]func(*Maps) (Table, error){
	"kmesh_managed":      dumpManaged,
	"kmesh_frontend":     dumpFrontends,
	"kmesh_service":      dumpServices,
	"kmesh_endpoint":     dumpEndpoints,
	"kmesh_backend":      dumpBackends,
	"kmesh_tunnel":       dumpTunnels,
	"kmesh_udp":          dumpUDP,
	"kmesh_stats":        dumpStats,
	"kmesh_sock_orig":    dumpSockOrig,
	"kmesh_inproxy":      dumpInboundListeners,
	"kmesh_proxy_sk":     dumpProxySockets,
	"kmesh_events":       dumpEvents,
	"kmesh_dns":          dumpDNS,
	"kmesh_stats_ext":    dumpStatsExt,
	"kmesh_authz":        dumpAuthz,
	"kmesh_authed":       dumpAuthed,
	"kmesh_splice":       dumpSplice,
	"kmesh_splice_sk":    dumpSpliceSockets,
	"kmesh_splice_ns":    dumpSpliceNS,
	"kmesh_vip":          dumpVIPs,
	"kmesh_splice_tx":    dumpSpliceTx,
	"kmesh_splice_rx":    dumpSpliceRx,
	"kmesh_sidecar":      dumpSidecarAddrs,
	"kmesh_sidecar_ns":   dumpSidecarPods,
	"kmesh_sidecar_orig": dumpSidecarOrigs,
	"kmesh_splice_sent":  dumpSpliceSent,
	"kmesh_sidecar_on":   dumpSidecarOn,
}

// Dump decodes every entry of the named map (kmesh_*), every field and
// flag spelled out.
func (m *Maps) Dump(name string) (Table, error) {
	d, ok := dumpers[name]
	if !ok {
		return Table{}, fmt.Errorf("no decoder for map %s", name)
	}
	if m.byName[name] == nil {
		return Table{}, fmt.Errorf("map %s is not open", name)
	}
	t, err := d(m)
	t.Map = name
	return t, err
}

func addrOrDash(a netip.Addr) string {
	if !a.IsValid() {
		return "-"
	}
	return a.String()
}

func dumpManaged(m *Maps) (Table, error) {
	ms, err := m.Managed()
	t := Table{Header: []string{"NETNS COOKIE", "BACKEND"}}
	for _, c := range slices.Sorted(maps.Keys(ms)) {
		t.Rows = append(t.Rows, []string{fmt.Sprint(c), fmt.Sprint(ms[c])})
	}
	return t, err
}

func dumpFrontends(m *Maps) (Table, error) {
	fes, err := m.Frontends()
	slices.SortFunc(fes, func(a, b Frontend) int { return cmp.Compare(a.Key.String(), b.Key.String()) })
	t := Table{Header: []string{"FRONTEND", "KIND", "ID", "TARGET PORT", "PATH"}}
	for _, f := range fes {
		kind, path := "service", f.Path.String()
		if f.Kind == FrontendWorkload {
			kind, path = "workload", "(the backend's)"
		} else if f.Kind != FrontendService {
			kind = fmt.Sprintf("kind(%d)", f.Kind)
		}
		t.Rows = append(t.Rows, []string{f.Key.String(), kind, fmt.Sprint(f.ID), fmt.Sprint(f.TargetPort), path})
	}
	return t, err
}

func dumpServices(m *Maps) (Table, error) {
	ss, err := m.Services()
	slices.SortFunc(ss, func(a, b Service) int { return cmp.Compare(a.ID, b.ID) })
	t := Table{Header: []string{"SET", "MODE", "GEN", "EPOCH", "IPV4 SLOTS BY RANK", "IPV6 SLOTS BY RANK"}}
	for _, s := range ss {
		t.Rows = append(t.Rows, []string{fmt.Sprint(s.ID), s.Mode.String(), fmt.Sprint(s.Gen), fmt.Sprint(s.Epoch),
			fmt.Sprint(s.Counts[FamilyV4]), fmt.Sprint(s.Counts[FamilyV6])})
	}
	return t, err
}

func dumpEndpoints(m *Maps) (Table, error) {
	es, err := m.Endpoints()
	slices.SortFunc(es, func(a, b Endpoint) int {
		return cmp.Or(cmp.Compare(a.Key.Service, b.Key.Service), cmp.Compare(a.Key.Gen, b.Key.Gen),
			cmp.Compare(a.Key.Family, b.Key.Family), cmp.Compare(a.Key.Rank, b.Key.Rank), cmp.Compare(a.Key.Index, b.Key.Index))
	})
	t := Table{Header: []string{"SET", "GEN", "FAMILY", "RANK", "SLOT", "BACKEND:PORT", "ALIAS:PORT", "P(BACKEND)"}}
	for _, e := range es {
		t.Rows = append(t.Rows, []string{fmt.Sprint(e.Key.Service), fmt.Sprint(e.Key.Gen), e.Key.Family.String(), fmt.Sprint(e.Key.Rank),
			fmt.Sprint(e.Key.Index), fmt.Sprintf("%d:%d", e.Slot.Backend, e.Slot.Port), fmt.Sprintf("%d:%d", e.Slot.Alias, e.Slot.AliasPort),
			fmt.Sprintf("%.3f", float64(e.Slot.Threshold)/(1<<32))})
	}
	return t, err
}

// BackendInputs names what a backend's verdicts were decided from.
func BackendInputs(b Backend) string {
	var from []string
	for _, f := range []struct {
		on   bool
		name string
	}{{b.HBONE, "hbone"}, {b.Local, "local"}, {b.Waypoint, "waypoint"}, {b.Policy, "policy"}, {b.KernelAuthz, "kernel-authz"}} {
		if f.on {
			from = append(from, f.name)
		}
	}
	if len(from) == 0 {
		return "-"
	}
	return strings.Join(from, ",")
}

func dumpBackends(m *Maps) (Table, error) {
	bs, err := m.Backends()
	slices.SortFunc(bs, func(a, b Backend) int { return cmp.Compare(a.ID, b.ID) })
	t := Table{Header: []string{"BACKEND", "IPV4", "IPV6", "CAPACITY", "IDENTITY", "PATH VIA SERVICE", "PATH BY IP", "PATH UDP", "PATH INBOUND", "DECIDED FROM"}}
	for _, b := range bs {
		t.Rows = append(t.Rows, []string{fmt.Sprint(b.ID), addrOrDash(b.Addr4), addrOrDash(b.Addr6), fmt.Sprint(b.Capacity), fmt.Sprint(b.Identity),
			b.PathSvc.String(), b.PathAddr.String(), b.PathUDP.String(), b.PathIn.String(), BackendInputs(b)})
	}
	return t, err
}

func dumpAuthz(m *Maps) (Table, error) {
	as, err := m.Authz()
	t := Table{Header: []string{"DESTINATION", "SOURCE", "FAMILY", "VERDICT", "EXCEPT PORTS (OTHER VERDICT)"}}
	for _, a := range as {
		verdict, fam, except := "deny", "ipv4", "-"
		if a.Allow {
			verdict = "allow"
		}
		if a.Key.Family == FamilyV6 {
			fam = "ipv6"
		}
		if len(a.Except) > 0 {
			except = strings.Trim(fmt.Sprint(a.Except), "[]")
		}
		t.Rows = append(t.Rows, []string{fmt.Sprint(a.Key.Dst), fmt.Sprint(a.Key.Src), fam, verdict, except})
	}
	sortRows(t.Rows)
	return t, err
}

func dumpAuthed(m *Maps) (Table, error) {
	t := Table{Header: []string{"CLIENT", "SERVER", "SOURCE BACKEND"}}
	err := dump(m.byName["kmesh_authed"], func(k sockAddrAuthedKey, v uint32) {
		t.Rows = append(t.Rows, []string{netip.AddrPortFrom(wordsAddr(k.Src).Unmap(), ntohs(k.SrcPort)).String(),
			netip.AddrPortFrom(wordsAddr(k.Dst).Unmap(), ntohs(k.DstPort)).String(), fmt.Sprint(v)})
	})
	sortRows(t.Rows)
	return t, err
}

func dumpTunnels(m *Maps) (Table, error) {
	t := Table{Header: []string{"NETNS COOKIE", "CLIENT", "DIALLED", "PATH", "BACKEND"}}
	err := dump(m.tunnel, func(k sockAddrTunnelKey, v sockAddrTunnelValue) {
		o := decodeTunnel(v)
		backend := "-"
		if o.Backend.IsValid() {
			backend = o.Backend.String()
		}
		t.Rows = append(t.Rows, []string{fmt.Sprint(k.NetnsCookie), netip.AddrPortFrom(wordsAddr(k.Addr), ntohs(k.Port)).String(),
			o.Dst.String(), o.Path.String(), backend})
	})
	sortRows(t.Rows)
	return t, err
}

func dumpUDP(m *Maps) (Table, error) {
	if m.byName["kmesh_udp"].Type() != ebpf.SkStorage {
		return Table{}, fmt.Errorf("kmesh_udp is not socket storage")
	}
	return Table{Note: "per-socket storage (each unconnected UDP socket's backend per VIP): it lives in the sockets and cannot be listed from user space"}, nil
}

func dumpStats(m *Maps) (Table, error) {
	st, err := m.Stats()
	t := Table{Header: []string{"COUNTER", "VALUE"}}
	for _, n := range slices.Sorted(maps.Keys(st)) {
		t.Rows = append(t.Rows, []string{n, fmt.Sprint(st[n])})
	}
	return t, err
}

func dumpStatsExt(*Maps) (Table, error) {
	return Table{Note: "counters beyond kmesh_stats' frozen size: listed with kmesh_stats"}, nil
}

func dumpSockOrig(m *Maps) (Table, error) {
	if m.byName["kmesh_sock_orig"].Type() != ebpf.SkStorage {
		return Table{}, fmt.Errorf("kmesh_sock_orig is not socket storage")
	}
	return Table{Note: "per-socket storage (what each redirected socket dialled): it lives in the sockets and cannot be listed from user space"}, nil
}

func dumpInboundListeners(m *Maps) (Table, error) {
	ls, err := m.InboundListeners()
	t := Table{Header: []string{"POD ADDRESS", "15006 LISTENER (SOCKET COOKIE)"}}
	for a, c := range ls {
		t.Rows = append(t.Rows, []string{a.String(), fmt.Sprint(c)})
	}
	sortRows(t.Rows)
	return t, err
}

func dumpSidecarOn(m *Maps) (Table, error) {
	var on uint32
	err := m.byName["kmesh_sidecar_on"].Lookup(uint32(0), &on)
	return Table{Header: []string{"ANY POD CAPTURED"}, Rows: [][]string{{fmt.Sprint(on != 0)}}}, err
}

func dumpSpliceSent(*Maps) (Table, error) {
	return Table{Note: "per-socket storage (bytes each spliced socket redirected, its budget's count): it lives in the sockets and cannot be listed from user space"}, nil
}

func dumpProxySockets(*Maps) (Table, error) {
	return Table{Note: "per-socket storage (the node proxy's own sockets): it lives in the sockets and cannot be listed from user space"}, nil
}

func sortRows(rows [][]string) {
	slices.SortFunc(rows, func(a, b []string) int { return slices.Compare(a, b) })
}

func dumpDNS(m *Maps) (Table, error) {
	on, port, err := m.DNSCapture()
	t := Table{Header: []string{"CAPTURE", "PORT"}}
	if err == nil {
		t.Rows = append(t.Rows, []string{fmt.Sprint(on), fmt.Sprint(port)})
	}
	return t, err
}

func dumpSplice(m *Maps) (Table, error) {
	es, err := m.SpliceEnds()
	t := Table{Header: []string{"LOCAL", "REMOTE", "NETNS COOKIE", "SOCKET COOKIE"}}
	for _, e := range es {
		t.Rows = append(t.Rows, []string{e.Local.String(), e.Remote.String(), fmt.Sprint(e.NetnsCookie), fmt.Sprint(e.SocketCookie)})
	}
	sortRows(t.Rows)
	return t, err
}

func dumpSpliceSockets(*Maps) (Table, error) {
	return Table{Note: "per-socket storage (whether each spliced socket's sends are redirected): it lives in the sockets and cannot be listed from user space"}, nil
}

func dumpSpliceTx(*Maps) (Table, error) {
	return Table{Note: "per-socket storage (bytes each reported spliced socket sent through sk_msg, added to its connection events): it lives in the sockets and cannot be listed from user space"}, nil
}

func dumpSpliceRx(m *Maps) (Table, error) {
	t := Table{Header: []string{"RECEIVER LOCAL", "RECEIVER REMOTE", "NETNS COOKIE", "BYTES"}}
	err := dump(m.byName["kmesh_splice_rx"], func(k sockAddrSpliceKey, n uint64) {
		t.Rows = append(t.Rows, []string{netip.AddrPortFrom(wordsAddr(k.Local), ntohs(k.LocalPort)).String(),
			netip.AddrPortFrom(wordsAddr(k.Remote), ntohs(k.RemotePort)).String(), fmt.Sprint(k.NetnsCookie), fmt.Sprint(n)})
	})
	sortRows(t.Rows)
	return t, err
}

func dumpSpliceNS(m *Maps) (Table, error) {
	ns, err := m.SpliceNamespaces()
	t := Table{Header: []string{"NETNS COOKIE", "IN-POD", "PEERS", "SIDECAR CAPTURE"}}
	for _, c := range slices.Sorted(maps.Keys(ns)) {
		t.Rows = append(t.Rows, []string{fmt.Sprint(c), fmt.Sprint(ns[c]&SpliceInPod != 0), fmt.Sprint(ns[c]&SplicePeers != 0),
			fmt.Sprint(ns[c]&SpliceSidecar != 0)})
	}
	return t, err
}

func dumpSidecarAddrs(m *Maps) (Table, error) {
	pods, err := m.sidecarAddrs()
	t := Table{Header: []string{"POD ADDRESS", "NETNS COOKIE"}}
	for _, a := range slices.SortedFunc(maps.Keys(pods), netip.Addr.Compare) {
		t.Rows = append(t.Rows, []string{a.String(), fmt.Sprint(pods[a])})
	}
	return t, err
}

func dumpSidecarPods(m *Maps) (Table, error) {
	pods, err := m.SidecarPods()
	t := Table{Header: []string{"NETNS COOKIE", "POD ADDRESS"}}
	for _, c := range slices.Sorted(maps.Keys(pods)) {
		t.Rows = append(t.Rows, []string{fmt.Sprint(c), pods[c].String()})
	}
	return t, err
}

func dumpSidecarOrigs(m *Maps) (Table, error) {
	recs, err := m.SidecarOrigs()
	t := Table{Header: []string{"LOCAL", "REMOTE", "NETNS COOKIE", "ORIGINAL DESTINATION"}}
	for _, r := range recs {
		t.Rows = append(t.Rows, []string{r.Local.String(), r.Remote.String(), fmt.Sprint(r.NetnsCookie), r.Orig.String()})
	}
	sortRows(t.Rows)
	return t, err
}

func dumpVIPs(m *Maps) (Table, error) {
	vips, err := m.VIPs()
	t := Table{Header: []string{"VIP", "SERVICES"}}
	for _, a := range slices.SortedFunc(maps.Keys(vips), netip.Addr.Compare) {
		t.Rows = append(t.Rows, []string{a.String(), fmt.Sprint(vips[a])})
	}
	return t, err
}
