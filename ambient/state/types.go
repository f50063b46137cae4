// Package state holds what the control plane told this node: workloads,
// services and authorization policies, as pure data with the indexes the
// data path and the proxies look things up by. It does no I/O; the xDS
// client fills it, the reconciler reads it.
package state

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"unique"

	"google.golang.org/protobuf/reflect/protoreflect"
	"istio.io/istio/pkg/workloadapi"
	"istio.io/istio/pkg/workloadapi/security"
)

// NetworkAddr is an IP address within a network: the same IP can exist in
// several networks of a multi-network mesh.
type NetworkAddr struct {
	Network string
	Addr    netip.Addr
}

func (a NetworkAddr) String() string {
	if a.Network == "" {
		return a.Addr.String()
	}
	return a.Network + "/" + a.Addr.String()
}

// Locality is where a workload runs.
type Locality struct {
	Region, Zone, Subzone string
}

// Port maps a service port to a target port.
type Port struct {
	ServicePort uint16 `json:"servicePort"`
	TargetPort  uint16 `json:"targetPort"`
}

// GatewayAddress is a waypoint or network gateway: by hostname or address.
type GatewayAddress struct {
	// Hostname is "namespace/hostname" when addressed by name.
	Hostname      string       `json:"hostname,omitempty"`
	Address       *NetworkAddr `json:"address,omitempty"`
	HBONEMTLSPort uint16       `json:"hboneMtlsPort"`
}

// Workload is one workload (a pod, a WorkloadEntry, …). A node's daemon
// holds every workload of the mesh, so the struct is kept small: what the
// pods of a deployment share lives once, in an interned record, and so does
// what the pods of a node share. A Workload is immutable once converted (or
// once handed to Store.Apply, which may replace its slices by equal shared
// ones): readers share it without copying.
type Workload struct {
	UID       string
	Name      string
	Addresses []netip.Addr
	Hostname  string
	deploy    unique.Handle[deployMeta]
	place     unique.Handle[placeMeta]
	// HBONE is true when the workload accepts HBONE (it is in the mesh).
	HBONE       bool
	Healthy     bool
	HostNetwork bool
	// Capacity is Istio's load-balancing weight (1 when unset; 0 drains).
	Capacity uint32
	// Services lists the services selecting this workload ("namespace/
	// hostname") with the workload's own port mapping for each. A slice,
	// not a map: nearly every workload is in one or two services, and a
	// map per workload costs half a kilobyte.
	Services              []ServicePorts
	AuthorizationPolicies []string
	Waypoint              *GatewayAddress
	NetworkGateway        *GatewayAddress
}

// WorkloadMeta is what workloads of one deployment share, with the node
// they run on.
type WorkloadMeta struct {
	Namespace         string   `json:"namespace"`
	Network           string   `json:"network,omitempty"`
	TrustDomain       string   `json:"trustDomain"`
	ServiceAccount    string   `json:"serviceAccount"`
	Node              string   `json:"node"`
	ClusterID         string   `json:"clusterId"`
	Locality          Locality `json:"locality"`
	CanonicalName     string   `json:"canonicalName"`
	CanonicalRevision string   `json:"canonicalRevision"`
	WorkloadName      string   `json:"workloadName"`
	WorkloadType      string   `json:"workloadType"`
}

// sym is an interned string: 8 bytes, compared by pointer, and its text is
// stored once however many records hold it.
type sym = unique.Handle[string]

func symOf(s string) sym {
	if s == "" {
		return sym{}
	}
	return unique.Make(s)
}

func str(h sym) string {
	if h == (sym{}) {
		return ""
	}
	return h.Value()
}

// deployMeta is what the pods of one deployment share. It is interned from
// interned strings, so that the strings common to many deployments (the
// namespace, the trust domain, the cluster) are stored once, not once per
// deployment.
type deployMeta struct {
	namespace, network, trustDomain, serviceAccount, clusterID   sym
	canonicalName, canonicalRevision, workloadName, workloadType sym
}

// placeMeta is what the pods of one node share. Kept apart from deployMeta:
// a deployment's pods spread over nodes, and the product of the two is
// nearly one record per pod.
type placeMeta struct {
	node, region, zone, subzone sym
}

// Meta returns the workload's shared attributes.
func (w *Workload) Meta() WorkloadMeta {
	var m WorkloadMeta
	if w.deploy != (unique.Handle[deployMeta]{}) {
		d := w.deploy.Value()
		m.Namespace, m.Network, m.TrustDomain, m.ServiceAccount, m.ClusterID = str(d.namespace), str(d.network), str(d.trustDomain), str(d.serviceAccount), str(d.clusterID)
		m.CanonicalName, m.CanonicalRevision, m.WorkloadName, m.WorkloadType = str(d.canonicalName), str(d.canonicalRevision), str(d.workloadName), str(d.workloadType)
	}
	if w.place != (unique.Handle[placeMeta]{}) {
		p := w.place.Value()
		m.Node, m.Locality = str(p.node), Locality{Region: str(p.region), Zone: str(p.zone), Subzone: str(p.subzone)}
	}
	return m
}

// SetMeta replaces the workload's shared attributes (tests, conversions).
func (w *Workload) SetMeta(m WorkloadMeta) {
	w.deploy = unique.Make(deployMeta{namespace: symOf(m.Namespace), network: symOf(m.Network), trustDomain: symOf(m.TrustDomain),
		serviceAccount: symOf(m.ServiceAccount), clusterID: symOf(m.ClusterID), canonicalName: symOf(m.CanonicalName),
		canonicalRevision: symOf(m.CanonicalRevision), workloadName: symOf(m.WorkloadName), workloadType: symOf(m.WorkloadType)})
	w.place = unique.Make(placeMeta{node: symOf(m.Node), region: symOf(m.Locality.Region), zone: symOf(m.Locality.Zone), subzone: symOf(m.Locality.Subzone)})
}

// Node returns the node the workload runs on (Meta().Node, without
// assembling the rest).
func (w *Workload) Node() string {
	if w.place == (unique.Handle[placeMeta]{}) {
		return ""
	}
	return str(w.place.Value().node)
}

// Network returns the workload's network (Meta().Network).
func (w *Workload) Network() string {
	if w.deploy == (unique.Handle[deployMeta]{}) {
		return ""
	}
	return str(w.deploy.Value().network)
}

// Namespace returns the workload's namespace (Meta().Namespace).
func (w *Workload) Namespace() string {
	if w.deploy == (unique.Handle[deployMeta]{}) {
		return ""
	}
	return str(w.deploy.Value().namespace)
}

func (w *Workload) nodeSym() sym {
	if w.place == (unique.Handle[placeMeta]{}) {
		return sym{}
	}
	return w.place.Value().node
}

// MarshalJSON flattens the workload for /config_dump.
func (w *Workload) MarshalJSON() ([]byte, error) {
	type plain struct {
		UID                   string          `json:"uid"`
		Name                  string          `json:"name"`
		Addresses             []netip.Addr    `json:"workloadIps"`
		Hostname              string          `json:"hostname,omitempty"`
		HBONE                 bool            `json:"hbone"`
		Healthy               bool            `json:"healthy"`
		HostNetwork           bool            `json:"hostNetwork,omitempty"`
		Capacity              uint32          `json:"capacity"`
		Services              []ServicePorts  `json:"services,omitempty"`
		AuthorizationPolicies []string        `json:"authorizationPolicies,omitempty"`
		Waypoint              *GatewayAddress `json:"waypoint,omitempty"`
		NetworkGateway        *GatewayAddress `json:"networkGateway,omitempty"`
		WorkloadMeta
	}
	return json.Marshal(plain{w.UID, w.Name, w.Addresses, w.Hostname, w.HBONE, w.Healthy, w.HostNetwork, w.Capacity,
		w.Services, w.AuthorizationPolicies, w.Waypoint, w.NetworkGateway, w.Meta()})
}

// ServicePorts is a workload's port mapping for one service.
type ServicePorts struct {
	Service string `json:"service"`
	Ports   []Port `json:"ports"`
}

// PortsFor returns the workload's port mapping for a service.
func (w *Workload) PortsFor(svc string) ([]Port, bool) {
	for _, sp := range w.Services {
		if sp.Service == svc {
			return sp.Ports, true
		}
	}
	return nil, false
}

// LBScope mirrors Istio's LoadBalancing.Scope.
type LBScope = workloadapi.LoadBalancing_Scope

// LoadBalancing is a service's policy.
type LoadBalancing struct {
	Mode              workloadapi.LoadBalancing_Mode         `json:"mode"`
	RoutingPreference []LBScope                              `json:"routingPreference,omitempty"`
	HealthPolicy      workloadapi.LoadBalancing_HealthPolicy `json:"healthPolicy"`
}

// Service is one service: a Kubernetes Service or a ServiceEntry host.
type Service struct {
	Name            string          `json:"name"`
	Namespace       string          `json:"namespace"`
	Hostname        string          `json:"hostname"`
	VIPs            []NetworkAddr   `json:"vips"`
	Ports           []Port          `json:"ports"`
	SubjectAltNames []string        `json:"subjectAltNames,omitempty"`
	Waypoint        *GatewayAddress `json:"waypoint,omitempty"`
	LoadBalancing   *LoadBalancing  `json:"loadBalancer,omitempty"`
	key             string          // cached Key: it is looked up on every change
}

// Key is the service's resource name: "namespace/hostname".
func (s *Service) Key() string {
	if s.key == "" {
		return s.Namespace + "/" + s.Hostname
	}
	return s.key
}

// Policy is an authorization policy as istiod sends it to node proxies.
type Policy struct {
	*security.Authorization
}

// Key is the policy's resource name: "namespace/name".
func (p Policy) Key() string { return p.Namespace + "/" + p.Name }

// --- conversion from Istio's protos, with validation ---

// intern returns the canonical copy of a string shared by many objects.
func intern(s string) string {
	if s == "" {
		return ""
	}
	return unique.Make(s).Value()
}

var workloadTypes = map[workloadapi.WorkloadType]string{
	workloadapi.WorkloadType_DEPLOYMENT: "deployment",
	workloadapi.WorkloadType_CRONJOB:    "cronjob",
	workloadapi.WorkloadType_POD:        "pod",
	workloadapi.WorkloadType_JOB:        "job",
}

func parseIP(b []byte) (netip.Addr, error) {
	a, ok := netip.AddrFromSlice(b)
	if !ok {
		return netip.Addr{}, fmt.Errorf("address of %d bytes is neither IPv4 nor IPv6", len(b))
	}
	return a.Unmap(), nil
}

func port16(v uint32, what string) (uint16, error) {
	if v > 65535 {
		return 0, fmt.Errorf("%s %d is not a port", what, v)
	}
	return uint16(v), nil
}

func convertPorts(ps []*workloadapi.Port) ([]Port, error) {
	out := make([]Port, 0, len(ps))
	for _, p := range ps {
		sp, err := port16(p.GetServicePort(), "service port")
		if err != nil {
			return nil, err
		}
		tp, err := port16(p.GetTargetPort(), "target port")
		if err != nil {
			return nil, err
		}
		if sp == 0 {
			return nil, fmt.Errorf("service port 0")
		}
		out = append(out, Port{ServicePort: sp, TargetPort: tp})
	}
	return out, nil
}

func convertGateway(g *workloadapi.GatewayAddress) (*GatewayAddress, error) {
	if g == nil {
		return nil, nil
	}
	hp, err := port16(g.GetHboneMtlsPort(), "HBONE port")
	if err != nil {
		return nil, err
	}
	out := &GatewayAddress{HBONEMTLSPort: hp}
	switch d := g.GetDestination().(type) {
	case *workloadapi.GatewayAddress_Hostname:
		out.Hostname = d.Hostname.GetNamespace() + "/" + d.Hostname.GetHostname()
	case *workloadapi.GatewayAddress_Address:
		a, err := parseIP(d.Address.GetAddress())
		if err != nil {
			return nil, fmt.Errorf("gateway: %w", err)
		}
		out.Address = &NetworkAddr{Network: d.Address.GetNetwork(), Addr: a}
	default:
		return nil, fmt.Errorf("gateway without destination")
	}
	return out, nil
}

// suffixOf returns s, sharing the bytes of whole when it ends with s: a
// pod's UID ends with its name ("Kubernetes//Pod/ns/name"), and a mesh has
// many pods.
func suffixOf(whole, s string) string {
	if strings.HasSuffix(whole, s) {
		return whole[len(whole)-len(s):]
	}
	return s
}

// ConvertWorkload validates and converts a workload. Its strings are the
// proto's: a caller that holds the resource name in a string of its own can
// set w.Uid to it first, so that both share one copy.
func ConvertWorkload(w *workloadapi.Workload) (*Workload, error) {
	if w.GetUid() == "" {
		return nil, fmt.Errorf("workload %s/%s without uid", w.GetNamespace(), w.GetName())
	}
	out := &Workload{
		UID: w.GetUid(), Name: suffixOf(w.GetUid(), w.GetName()), Hostname: w.GetHostname(),
		HBONE: w.GetTunnelProtocol() == workloadapi.TunnelProtocol_HBONE, Healthy: w.GetStatus() == workloadapi.WorkloadStatus_HEALTHY,
		Capacity: 1, HostNetwork: w.GetNetworkMode() == workloadapi.NetworkMode_HOST_NETWORK,
	}
	meta := WorkloadMeta{
		Namespace: w.GetNamespace(), Network: w.GetNetwork(), TrustDomain: w.GetTrustDomain(), ServiceAccount: w.GetServiceAccount(),
		Node: w.GetNode(), ClusterID: w.GetClusterId(), CanonicalName: w.GetCanonicalName(), CanonicalRevision: w.GetCanonicalRevision(),
		WorkloadName: w.GetWorkloadName(), WorkloadType: workloadTypes[w.GetWorkloadType()],
	}
	if meta.TrustDomain == "" {
		meta.TrustDomain = "cluster.local"
	}
	if meta.ServiceAccount == "" {
		meta.ServiceAccount = "default"
	}
	if l := w.GetLocality(); l != nil {
		meta.Locality = Locality{Region: l.GetRegion(), Zone: l.GetZone(), Subzone: l.GetSubzone()}
	}
	out.SetMeta(meta)
	for _, p := range w.GetAuthorizationPolicies() {
		out.AuthorizationPolicies = append(out.AuthorizationPolicies, intern(p))
	}
	if c := w.GetCapacity(); c != nil {
		out.Capacity = c.GetValue()
	}
	for i, b := range w.GetAddresses() {
		a, err := parseIP(b)
		if err != nil {
			return nil, fmt.Errorf("workload %s: address %d: %w", out.UID, i, err)
		}
		out.Addresses = append(out.Addresses, a)
	}
	if len(w.GetServices()) > 0 {
		out.Services = make([]ServicePorts, 0, len(w.GetServices()))
		for svc, pl := range w.GetServices() {
			ps, err := convertPorts(pl.GetPorts())
			if err != nil {
				return nil, fmt.Errorf("workload %s: service %s: %w", out.UID, svc, err)
			}
			out.Services = append(out.Services, ServicePorts{Service: intern(svc), Ports: ps})
		}
		// Map iteration order is random: sort so equal workloads compare equal.
		slices.SortFunc(out.Services, func(a, b ServicePorts) int { return strings.Compare(a.Service, b.Service) })
	}
	var err error
	if out.Waypoint, err = convertGateway(w.GetWaypoint()); err != nil {
		return nil, fmt.Errorf("workload %s: waypoint: %w", out.UID, err)
	}
	if out.NetworkGateway, err = convertGateway(w.GetNetworkGateway()); err != nil {
		return nil, fmt.Errorf("workload %s: network gateway: %w", out.UID, err)
	}
	return out, nil
}

// ConvertService validates and converts a service.
func ConvertService(s *workloadapi.Service) (*Service, error) {
	if s.GetHostname() == "" || s.GetNamespace() == "" {
		return nil, fmt.Errorf("service %q without namespace or hostname", s.GetName())
	}
	out := &Service{Name: s.GetName(), Namespace: intern(s.GetNamespace()), Hostname: s.GetHostname(),
		SubjectAltNames: s.GetSubjectAltNames()}
	for i, a := range s.GetAddresses() {
		ip, err := parseIP(a.GetAddress())
		if err != nil {
			return nil, fmt.Errorf("service %s: address %d: %w", out.Key(), i, err)
		}
		out.VIPs = append(out.VIPs, NetworkAddr{Network: a.GetNetwork(), Addr: ip})
	}
	out.key = intern(out.Namespace + "/" + out.Hostname)
	ps, err := convertPorts(s.GetPorts())
	if err != nil {
		return nil, fmt.Errorf("service %s: %w", out.Key(), err)
	}
	out.Ports = ps
	if out.Waypoint, err = convertGateway(s.GetWaypoint()); err != nil {
		return nil, fmt.Errorf("service %s: waypoint: %w", out.Key(), err)
	}
	if lb := s.GetLoadBalancing(); lb != nil {
		out.LoadBalancing = &LoadBalancing{Mode: lb.GetMode(), RoutingPreference: lb.GetRoutingPreference(), HealthPolicy: lb.GetHealthPolicy()}
		for _, sc := range lb.GetRoutingPreference() {
			if sc == workloadapi.LoadBalancing_UNSPECIFIED_SCOPE || workloadapi.LoadBalancing_Scope_name[int32(sc)] == "" {
				return nil, fmt.Errorf("service %s: unknown routing preference %d", out.Key(), sc)
			}
		}
	}
	return out, nil
}

// ConvertPolicy validates an authorization policy.
func ConvertPolicy(a *security.Authorization) (Policy, error) {
	if a.GetName() == "" {
		return Policy{}, fmt.Errorf("authorization policy without name")
	}
	p := Policy{a}
	// Fail closed on what this daemon does not understand: skipping a
	// policy whose action, scope or fields are newer than this code could
	// drop a DENY. NACKed, the previous version keeps applying.
	if _, ok := security.Action_name[int32(a.GetAction())]; !ok {
		return Policy{}, fmt.Errorf("policy %s: unknown action %d (a newer istiod than this daemon understands): not applied", p.Key(), a.GetAction())
	}
	if _, ok := security.Scope_name[int32(a.GetScope())]; !ok {
		return Policy{}, fmt.Errorf("policy %s: unknown scope %d (a newer istiod than this daemon understands): not applied", p.Key(), a.GetScope())
	}
	if path := unknownFields(a.ProtoReflect(), "policy"); path != "" {
		return Policy{}, fmt.Errorf("policy %s: field unknown to this daemon in %s (a newer istiod?): not applied", p.Key(), path)
	}
	for _, g := range a.GetGroups() {
		for _, r := range g.GetRules() {
			for _, m := range r.GetMatches() {
				for _, set := range [][]*security.Address{m.GetSourceIps(), m.GetNotSourceIps(), m.GetDestinationIps(), m.GetNotDestinationIps()} {
					for _, ad := range set {
						ip, err := parseIP(ad.GetAddress())
						if err != nil {
							return Policy{}, fmt.Errorf("policy %s: %w", p.Key(), err)
						}
						if int(ad.GetLength()) > ip.BitLen() {
							return Policy{}, fmt.Errorf("policy %s: prefix /%d longer than %s", p.Key(), ad.GetLength(), ip)
						}
					}
				}
				for _, dp := range append(m.GetDestinationPorts(), m.GetNotDestinationPorts()...) {
					if _, err := port16(dp, "destination port"); err != nil {
						return Policy{}, fmt.Errorf("policy %s: %w", p.Key(), err)
					}
				}
			}
		}
	}
	return p, nil
}

// unknownFields returns where in m a field this code's protos do not know
// was set, or "".
func unknownFields(m protoreflect.Message, at string) string {
	if len(m.GetUnknown()) > 0 {
		return at
	}
	found := ""
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsList() && fd.Message() != nil:
			l := v.List()
			for i := 0; i < l.Len() && found == ""; i++ {
				found = unknownFields(l.Get(i).Message(), fmt.Sprintf("%s.%s[%d]", at, fd.Name(), i))
			}
		case fd.IsMap():
		case fd.Message() != nil:
			found = unknownFields(v.Message(), at+"."+string(fd.Name()))
		}
		return found == ""
	})
	return found
}
