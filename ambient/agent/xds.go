package agent

import (
	"fmt"
	"os"
	"strings"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
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

// xdsNode builds the node sent to istiod: ztunnel's metadata fields plus
// every ISTIO_META_* variable, as ztunnel sends them.
func xdsNode(cfg *config.Config, environ []string) (*core.Node, error) {
	meta := map[string]any{
		"NAME":         cfg.PodName,
		"NAMESPACE":    cfg.PodNamespace,
		"INSTANCE_IPS": cfg.InstanceIP,
		"NODE_NAME":    cfg.NodeName,
		"CLUSTER_ID":   cfg.ClusterID,
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
func (a *Agent) handleXDS(typeURL string, resources []*discovery.Resource, removed []string) []xds.Rejection {
	var u state.Update
	var rejected []xds.Rejection
	reject := func(name string, err error) { rejected = append(rejected, xds.Rejection{Name: name, Reason: err}) }
	switch typeURL {
	case xds.AddressType:
		for _, r := range resources {
			var addr workloadapi.Address
			if err := r.GetResource().UnmarshalTo(&addr); err != nil {
				reject(r.GetName(), fmt.Errorf("decoding: %w", err))
				continue
			}
			switch t := addr.GetType().(type) {
			case *workloadapi.Address_Workload:
				w, err := state.ConvertWorkload(t.Workload)
				if err != nil {
					reject(r.GetName(), err)
					continue
				}
				if w.UID == r.GetName() {
					w.UID = r.GetName() // one copy of the string, shared with the xDS bookkeeping
				}
				u.Workloads = append(u.Workloads, w)
			case *workloadapi.Address_Service:
				s, err := state.ConvertService(t.Service)
				if err != nil {
					reject(r.GetName(), err)
					continue
				}
				u.Services = append(u.Services, s)
			default:
				reject(r.GetName(), fmt.Errorf("address is neither a workload nor a service"))
			}
		}
		u.RemovedAddresses = removed
	case xds.AuthorizationType:
		for _, r := range resources {
			var p security.Authorization
			if err := r.GetResource().UnmarshalTo(&p); err != nil {
				reject(r.GetName(), fmt.Errorf("decoding: %w", err))
				continue
			}
			pol, err := state.ConvertPolicy(&p)
			if err != nil {
				reject(r.GetName(), err)
				continue
			}
			u.Policies = append(u.Policies, pol)
		}
		u.RemovedPolicies = removed
	default:
		for _, r := range resources {
			reject(r.GetName(), fmt.Errorf("unexpected type %s", typeURL))
		}
		return rejected
	}
	ch := a.Store.Apply(u)
	for name, err := range a.rec.Apply(ch) {
		reject(name, err)
	}
	return rejected
}

func environ() []string { return os.Environ() }
