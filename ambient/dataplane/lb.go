package dataplane

import (
	"fmt"
	"kmesh.dev/kmesh/ambient/authz"
	"kmesh.dev/kmesh/ambient/identity/spiffe"
	"math/bits"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"unique"

	"kmesh.dev/kmesh/bpf"
)

// Pure decisions: which endpoints a service port reaches, in which locality
// rank, with which weight. No maps, no I/O; table-tested in lb_test.go.

func scopeMatches(s Scope, node, ep Topology) bool {
	switch s {
	case ScopeRegion:
		return node.Locality.Region == ep.Locality.Region
	case ScopeZone:
		return node.Locality.Zone == ep.Locality.Zone
	case ScopeSubzone:
		return node.Locality.Subzone == ep.Locality.Subzone
	case ScopeNode:
		return node.Node == ep.Node
	case ScopeCluster:
		return node.Cluster == ep.Cluster
	case ScopeNetwork:
		return node.Network == ep.Network
	}
	return false
}

// uniqueScopes drops repeated scopes: repeating one adds no information and
// would only push ranks past what the kernel tables hold.
func uniqueScopes(prefs []Scope) []Scope {
	out := make([]Scope, 0, len(prefs))
	for _, s := range prefs {
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	return out
}

// Rank places an endpoint for connections from this node: 0 is the best
// rank. The kernel serves the lowest non-empty rank. Like ztunnel, an
// endpoint's match count is the number of leading routing preferences it
// shares with the source, stopping at the first mismatch. ok is false when
// STRICT excludes the endpoint.
func Rank(lb LoadBalancing, node, ep Topology) (rank uint8, ok bool) {
	if lb.Mode != bpf.LBStrict && lb.Mode != bpf.LBFailover {
		return 0, true
	}
	prefs := uniqueScopes(lb.RoutingPreference)
	matched := 0
	for _, s := range prefs {
		if !scopeMatches(s, node, ep) {
			break
		}
		matched++
	}
	if lb.Mode == bpf.LBStrict {
		return 0, matched == len(prefs)
	}
	return uint8(len(prefs) - matched), true
}

// AliasSlot is one slot of an alias table over n weighted items.
type AliasSlot struct {
	Primary, Alias int
	// Threshold/2^32 is the probability of Primary once the slot is drawn.
	Threshold uint32
}

// AliasTable builds a Vose alias table: drawing a slot uniformly, then
// Primary with probability Threshold/2^32 (else Alias), selects item i with
// probability weights[i]/sum(weights), up to 2^-32 per slot of rounding.
// Zero weights are never selected. It returns nil when every weight is zero.
//
// All arithmetic is exact integer arithmetic: item i holds weights[i]*n units
// against a slot size of sum(weights).
func AliasTable(weights []uint32) []AliasSlot {
	n := len(weights)
	var total uint64
	for _, w := range weights {
		total += uint64(w)
	}
	if n == 0 || total == 0 {
		return nil
	}
	mass := make([]uint64, n)
	var small, large []int
	for i, w := range weights {
		mass[i] = uint64(w) * uint64(n)
		if mass[i] < total {
			small = append(small, i)
		} else {
			large = append(large, i)
		}
	}
	slots := make([]AliasSlot, n)
	for len(small) > 0 && len(large) > 0 {
		s := small[len(small)-1]
		small = small[:len(small)-1]
		l := large[len(large)-1]
		// Threshold = mass[s]/total scaled to 2^32; mass[s] < total keeps the
		// high word below the divisor, as Div64 requires.
		hi, lo := bits.Mul64(mass[s], 1<<32)
		q, _ := bits.Div64(hi, lo, total)
		slots[s] = AliasSlot{Primary: s, Alias: l, Threshold: uint32(q)}
		mass[l] -= total - mass[s]
		if mass[l] < total {
			large = large[:len(large)-1]
			small = append(small, l)
		}
	}
	// What remains is full (exactly, or up to rounding): always Primary.
	for _, i := range append(small, large...) {
		slots[i] = AliasSlot{Primary: i, Alias: i, Threshold: ^uint32(0)}
	}
	return slots
}

// candidate is an endpoint as it enters a table: a backend, its target port
// for this port group (0: the frontend's) and its weight.
type candidate struct {
	uid     string
	backend uint32
	port    uint16
	weight  uint32
	topo    unique.Handle[Topology] // a handle, not the strings: a sync builds 100k of these
	addrs   [2]bool                 // has an address of each family
}

// tableSet is the kernel load-balancing set of one group of service ports:
// ports whose eligible endpoints and target ports coincide share one set.
// Compact (one of these per service in the mesh): the alias tables of all
// (family, rank) buckets are laid end to end in slots.
type tableSet struct {
	// ports are the service ports served by this set, ascending; targets[i]
	// is ports[i]'s frontend target port, 0 when endpoints carry their own.
	ports, targets []uint16
	n              [2][bpf.MaxRanks]uint32
	slots          []bpf.EndpointSlot
}

// target returns the frontend target port of service port p.
func (t *tableSet) target(p uint16) uint16 {
	if i := slices.Index(t.ports, p); i >= 0 {
		return t.targets[i]
	}
	return 0
}

func (t *tableSet) counts() [2][bpf.MaxRanks]uint32 { return t.n }

// bucket returns the alias table of one family and rank.
func (t *tableSet) bucket(f, r int) []bpf.EndpointSlot {
	off := uint32(0)
	for ff := 0; ff < 2; ff++ {
		for rr := 0; rr < bpf.MaxRanks; rr++ {
			if ff == f && rr == r {
				return t.slots[off : off+t.n[f][r]]
			}
			off += t.n[ff][rr]
		}
	}
	return nil
}

// add appends a bucket; buckets must be added in (family, rank) order.
func (t *tableSet) add(f, r int, slots []bpf.EndpointSlot) {
	t.slots = append(t.slots, slots...)
	t.n[f][r] = uint32(len(slots))
}

func (t *tableSet) equalSlots(o *tableSet) bool {
	return t.n == o.n && slices.Equal(t.slots, o.slots)
}

// resolvedWorkload is a workload as the dataplane keeps it. Compact: a
// node holds every workload of the mesh. Topologies are interned (every
// pod of a node shares one).
type resolvedWorkload struct {
	uid      string
	addrs    []netip.Addr
	capacity uint32
	healthy  bool
	hbone    bool
	waypoint bool
	policies bool
	topo     unique.Handle[Topology]
	backend  uint32
	// authz, ident: see Workload. kauthz: the kernel can hold authz's
	// policies (kreason says why not, when it cannot).
	authz   *authz.Set
	ident   *spiffe.Identity
	kauthz  bool
	kreason string
}

func resolve(w *Workload, backend uint32) resolvedWorkload {
	r := resolvedWorkload{uid: w.UID, addrs: w.Addrs, capacity: w.Capacity, healthy: w.Healthy, hbone: w.HBONE,
		waypoint: w.Waypoint, policies: w.Policies, topo: unique.Make(w.Topology), backend: backend,
		authz: w.Authz, ident: w.Identity}
	if w.Policies {
		r.kreason = authz.KernelNotCompiled
		if w.Authz != nil {
			r.kreason = w.Authz.KernelReason(w.Addrs)
		}
		r.kauthz = r.kreason == ""
	}
	return r
}

// lbEqual reports whether two versions of a workload weigh the same in
// every load-balancing table.
func (r *resolvedWorkload) lbEqual(o *resolvedWorkload) bool {
	return slices.Equal(r.addrs, o.addrs) && r.capacity == o.capacity && r.healthy == o.healthy && r.topo == o.topo
}

// resolvePort returns the target port endpoint ep serves service port p on,
// as ztunnel does: the endpoint's own mapping first, then the service's
// numeric target port; a named port the endpoint does not map excludes it.
func resolvePort(p Port, ep Endpoint) (uint16, bool) {
	for _, o := range ep.Ports {
		if o.ServicePort == p.ServicePort && o.TargetPort != 0 {
			return o.TargetPort, true
		}
	}
	if p.TargetPort != 0 {
		return p.TargetPort, true
	}
	return 0, false
}

func hasFamily(addrs []netip.Addr) (fam [2]bool) {
	for _, a := range addrs {
		fam[bpf.FamilyOf(a)] = true
	}
	return fam
}

// BuildTables computes the load-balancing sets of a service for this node.
// workloads resolves endpoint UIDs; endpoints of unknown workloads, without
// an address, excluded by health or by STRICT are left out. PASSTHROUGH
// services have no sets. The result is deterministic for equal inputs.
func buildTables(svc *Service, workloads func(uid string) *resolvedWorkload, node Topology) []*tableSet {
	if svc.LB.Mode == bpf.LBPassthrough {
		return nil
	}
	eps := slices.Clone(svc.Endpoints)
	slices.SortFunc(eps, func(a, b Endpoint) int { return strings.Compare(a.WorkloadUID, b.WorkloadUID) })

	var sets []*tableSet
	bySig := map[string]*tableSet{}
	ports := slices.Clone(svc.Ports)
	slices.SortFunc(ports, func(a, b Port) int { return int(a.ServicePort) - int(b.ServicePort) })
	for _, p := range ports {
		var cands []candidate
		for _, ep := range eps {
			w := workloads(ep.WorkloadUID)
			if w == nil || len(w.addrs) == 0 || w.capacity == 0 || (!w.healthy && !svc.LB.AllowUnhealthy) {
				continue
			}
			target, ok := resolvePort(p, ep)
			if !ok {
				continue
			}
			cands = append(cands, candidate{uid: w.uid, backend: w.backend, port: target,
				weight: w.capacity, topo: w.topo, addrs: hasFamily(w.addrs)})
		}
		// One shared target port lives in the frontend; only divergent
		// ports are carried per slot.
		frontTarget := p.TargetPort
		if len(cands) > 0 {
			frontTarget = cands[0].port
			for _, c := range cands[1:] {
				if c.port != frontTarget {
					frontTarget = 0
					break
				}
			}
			if frontTarget != 0 {
				for i := range cands {
					cands[i].port = 0
				}
			}
		}
		sig := signature(cands)
		set, ok := bySig[sig]
		if !ok {
			set = &tableSet{}
			fillSlots(set, cands, svc.LB, node)
			bySig[sig] = set
			sets = append(sets, set)
		}
		set.ports = append(set.ports, p.ServicePort)
		set.targets = append(set.targets, frontTarget)
	}
	return sets
}

func signature(cs []candidate) string {
	var b strings.Builder
	for _, c := range cs {
		b.WriteString(c.uid)
		b.WriteByte('=')
		b.WriteString(strconv.Itoa(int(c.port)))
		b.WriteByte(';')
	}
	return b.String()
}

func fillSlots(set *tableSet, cands []candidate, lb LoadBalancing, node Topology) {
	type bucket struct{ members []candidate }
	var buckets [2][bpf.MaxRanks]bucket
	for _, c := range cands {
		r, ok := Rank(lb, node, c.topo.Value())
		if !ok {
			continue
		}
		for f := range c.addrs {
			if c.addrs[f] {
				buckets[f][r].members = append(buckets[f][r].members, c)
			}
		}
	}
	for f := range buckets {
		for r := range buckets[f] {
			ms := buckets[f][r].members
			ws := make([]uint32, len(ms))
			for i, m := range ms {
				ws[i] = m.weight
			}
			table := AliasTable(ws)
			slots := make([]bpf.EndpointSlot, len(table))
			for i, s := range table {
				p, a := ms[s.Primary], ms[s.Alias]
				slots[i] = bpf.EndpointSlot{Backend: p.backend, Port: p.port, Alias: a.backend, AliasPort: a.port, Threshold: s.Threshold}
			}
			set.add(f, r, slots)
		}
	}
}

// String renders a set for logs and dumps.
func (t *tableSet) String() string {
	return fmt.Sprintf("ports=%v counts=%v", t.ports, t.counts())
}
