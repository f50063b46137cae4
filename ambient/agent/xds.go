package agent

import (
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
	"istio.io/istio/pkg/workloadapi"
	"istio.io/istio/pkg/workloadapi/security"

	"kmesh.dev/kmesh/ambient/config"
	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/ambient/xds"
)

// NodeID is the xDS node id istiod expects from a node proxy of ztunnel's kind.
func NodeID(cfg *config.Config) string {
	ip := cfg.InstanceIP
	if ip == "" {
		ip = "1.1.1.1" // ztunnel's default when INSTANCE_IP is unset
	}
	return fmt.Sprintf("ztunnel~%s~%s.%s~%s.svc.cluster.local", ip, cfg.PodName, cfg.PodNamespace, cfg.PodNamespace)
}

// IstioVersion is the Istio release whose ztunnel this daemon stands in
// for (the pinned istio.io/istio module's; TestIstioVersionIsThePinnedIstio
// keeps them equal). It is sent as ztunnel sends its own, so istiod's
// proxy version checks and `istioctl proxy-status` see a known version.
const IstioVersion = "1.31"

// xdsNode builds the node sent to istiod: ztunnel's metadata fields plus
// every ISTIO_META_* variable, as ztunnel sends them.
func xdsNode(cfg *config.Config, environ []string) (*core.Node, error) {
	meta := map[string]any{
		"ISTIO_VERSION": IstioVersion,
		"NAME":          cfg.PodName,
		"NAMESPACE":     cfg.PodNamespace,
		"INSTANCE_IPS":  cfg.InstanceIP,
		"NODE_NAME":     cfg.NodeName,
		"CLUSTER_ID":    cfg.ClusterID,
	}
	for _, kv := range environ {
		k, v, ok := strings.Cut(kv, "=")
		if ok && strings.HasPrefix(k, "ISTIO_META_") {
			meta[strings.TrimPrefix(k, "ISTIO_META_")] = v
		}
	}
	st, err := structpb.NewStruct(meta)
	if err != nil {
		return nil, err
	}
	return &core.Node{Id: NodeID(cfg), Metadata: st}, nil
}

// handleXDS applies one xDS response: decode and validate each resource
// (invalid ones are rejected by name and keep their previous version),
// apply the valid ones to the state, push the changes to the kernel, and
// reject whatever the kernel refused.
func (a *Agent) handleXDS(typeURL string, resources *xds.Resources, removed []string) []xds.Rejection {
	var u state.Update
	var rejected []xds.Rejection
	reject := func(name string, err error) { rejected = append(rejected, xds.Rejection{Name: name, Reason: err}) }
	switch typeURL {
	case xds.AddressType:
		// One message of each kind, reset for each resource: only what the
		// conversion keeps outlives the loop.
		var wl workloadapi.Workload
		var svc workloadapi.Service
		for r := range resources.All() {
			kind, err := decodeAddress(r, &wl, &svc)
			if err != nil {
				reject(r.Name, fmt.Errorf("decoding: %w", err))
				continue
			}
			switch kind {
			case addressWorkload:
				if wl.GetUid() == r.Name {
					wl.Uid = r.Name // one copy of the string, shared with the xDS bookkeeping
				}
				w, err := state.ConvertWorkload(&wl)
				if err != nil {
					reject(r.Name, err)
					continue
				}
				u.Workloads = append(u.Workloads, w)
			case addressService:
				s, err := state.ConvertService(&svc)
				if err != nil {
					reject(r.Name, err)
					continue
				}
				u.Services = append(u.Services, s)
			default:
				reject(r.Name, fmt.Errorf("address is neither a workload nor a service"))
			}
		}
		u.RemovedAddresses = removed
	case xds.AuthorizationType:
		for r := range resources.All() {
			p := new(security.Authorization) // kept by the state
			if err := r.UnmarshalTo(p); err != nil {
				reject(r.Name, fmt.Errorf("decoding: %w", err))
				continue
			}
			pol, err := state.ConvertPolicy(p)
			if err != nil {
				reject(r.Name, err)
				continue
			}
			u.Policies = append(u.Policies, pol)
		}
		u.RemovedPolicies = removed
	default:
		for r := range resources.All() {
			reject(r.Name, fmt.Errorf("unexpected type %s", typeURL))
		}
		return rejected
	}
	ch := a.Store.Apply(u)
	u = state.Update{} // the store holds what it needs
	for name, err := range a.reconcile(ch) {
		reject(name, err)
	}
	return rejected
}

type addressKind int

const (
	addressNone addressKind = iota
	addressWorkload
	addressService
)

// decodeAddress decodes an istio.workload.Address into wl or svc (which
// are reused from one resource to the next: decoding into a fresh Address
// allocates a Workload of 400 bytes per resource, a hundred thousand of
// them in a mesh's first response). It reads the Address's oneof itself;
// the Workload or Service inside is proto-decoded as usual.
func decodeAddress(r xds.Resource, wl *workloadapi.Workload, svc *workloadapi.Service) (addressKind, error) {
	const want = "istio.workload.Address"
	if !strings.HasSuffix(r.TypeURL, "/"+want) {
		return addressNone, fmt.Errorf("resource of type %q, want %s", r.TypeURL, want)
	}
	kind, body := addressNone, []byte(nil)
	for b := r.Body; len(b) > 0; {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return addressNone, protowire.ParseError(n)
		}
		b = b[n:]
		if typ == protowire.BytesType && (num == 1 || num == 2) {
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return addressNone, protowire.ParseError(n)
			}
			kind, body = addressWorkload, v // a oneof: the last one wins
			if num == 2 {
				kind = addressService
			}
			b = b[n:]
			continue
		}
		if n = protowire.ConsumeFieldValue(num, typ, b); n < 0 {
			return addressNone, protowire.ParseError(n)
		}
		b = b[n:]
	}
	switch kind {
	case addressWorkload:
		return kind, proto.Unmarshal(body, wl)
	case addressService:
		return kind, proto.Unmarshal(body, svc)
	}
	return kind, nil
}

// reconcileChunk bounds how many objects are handed to the data path in
// one batch. istiod's first response is the whole mesh: as one batch, the
// reconciler's and the data path's working copies of every workload would
// all be alive at once, on top of the state (at 100k workloads, tens of
// megabytes more at the peak of the sync).
var reconcileChunk = 4096

// reconcile pushes a change set to the kernel; a large one in chunks, the
// workloads first and then the services, so that every service is computed
// once, with all its endpoints already known to the data path. Each chunk
// is a valid state for the kernel: every service is still written whole,
// make-before-break; only a service listing a changed workload may be
// written twice (once for the workload, once more for its own change).
func (a *Agent) reconcile(ch state.Changes) map[string]error {
	if len(ch.Workloads)+len(ch.Services) <= reconcileChunk || len(ch.Policies) > 0 {
		return a.rec.Apply(ch)
	}
	errs := map[string]error{}
	for part := range slices.Chunk(slices.Sorted(maps.Keys(ch.Workloads)), reconcileChunk) {
		c := state.Changes{Workloads: make(map[string]struct{}, len(part)), Services: map[string]struct{}{}, Policies: map[string]struct{}{}}
		for _, uid := range part {
			c.Workloads[uid] = struct{}{}
		}
		maps.Copy(errs, a.rec.Apply(c))
	}
	for part := range slices.Chunk(slices.Sorted(maps.Keys(ch.Services)), reconcileChunk) {
		c := state.Changes{Workloads: map[string]struct{}{}, Services: make(map[string]struct{}, len(part)), Policies: map[string]struct{}{}}
		for _, key := range part {
			c.Services[key] = struct{}{}
		}
		maps.Copy(errs, a.rec.Apply(c))
	}
	return errs
}

func environ() []string { return os.Environ() }
