// Package configdump renders the daemon's view of the mesh in ztunnel's
// /config_dump format, so that `istioctl ztunnel-config` (workloads,
// services, policies, certificates, connections, all) reads a Kmesh node
// as it reads a ztunnel.
//
// The format is whatever istioctl's parser accepts
// (istioctl/pkg/writer/ztunnel/configdump in istio/istio): the tests feed
// this package's output to that parser and its table writers, so a field
// renamed here or there fails them. Build is pure: the agent gathers the
// state, the certificates and the enrolled pods, and serves the result.
package configdump

import (
	"crypto/x509"
	"encoding/pem"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"istio.io/istio/pkg/workloadapi"
	"istio.io/istio/pkg/workloadapi/security"

	"kmesh.dev/kmesh/ambient/identity"
	"kmesh.dev/kmesh/ambient/state"
)

// Dump is ztunnel's config dump: the top-level keys istioctl reads.
type Dump struct {
	Workloads    []Workload `json:"workloads"`
	Services     []Service  `json:"services"`
	Policies     []Policy   `json:"policies"`
	Certificates []Certs    `json:"certificates"`
	// WorkloadState is keyed by the pod's enrolment UID (ZDS), as
	// ztunnel's is.
	WorkloadState map[string]PodState `json:"workloadState"`
}

// Locality is where a workload runs.
type Locality struct {
	Region  string `json:"region,omitempty"`
	Zone    string `json:"zone,omitempty"`
	Subzone string `json:"subzone,omitempty"`
}

// Gateway is a waypoint or network gateway. Destination is "namespace/
// hostname" or "network/ip" (network may be empty: "/10.96.0.1"): istioctl
// finds the waypoint's service by comparing it with those two forms.
type Gateway struct {
	Destination   string `json:"destination"`
	HBONEMTLSPort uint16 `json:"hboneMtlsPort"`
}

// Workload is one workload.
type Workload struct {
	UID                   string    `json:"uid"`
	WorkloadIPs           []string  `json:"workloadIps"`
	Waypoint              *Gateway  `json:"waypoint,omitempty"`
	NetworkGateway        *Gateway  `json:"networkGateway,omitempty"`
	Protocol              string    `json:"protocol"`
	Name                  string    `json:"name"`
	Namespace             string    `json:"namespace"`
	ServiceAccount        string    `json:"serviceAccount"`
	WorkloadName          string    `json:"workloadName"`
	WorkloadType          string    `json:"workloadType"`
	CanonicalName         string    `json:"canonicalName"`
	CanonicalRevision     string    `json:"canonicalRevision"`
	ClusterID             string    `json:"clusterId"`
	TrustDomain           string    `json:"trustDomain,omitempty"`
	Locality              *Locality `json:"locality,omitempty"`
	Node                  string    `json:"node"`
	Network               string    `json:"network,omitempty"`
	Status                string    `json:"status"`
	Hostname              string    `json:"hostname,omitempty"`
	Capacity              uint32    `json:"capacity"`
	NetworkMode           string    `json:"networkMode,omitempty"`
	AuthorizationPolicies []string  `json:"authorizationPolicies,omitempty"`
}

// Endpoint is a workload's membership in a service; Port maps service
// ports to the workload's target ports.
type Endpoint struct {
	WorkloadUID string            `json:"workloadUid"`
	Service     string            `json:"service"`
	Address     string            `json:"address,omitempty"`
	Port        map[uint16]uint16 `json:"port"`
}

// LoadBalancer is a service's load-balancing policy, in ztunnel's words.
type LoadBalancer struct {
	Mode               string   `json:"mode"`
	RoutingPreferences []string `json:"routingPreferences"`
	HealthPolicy       string   `json:"healthPolicy"`
}

// Service is one service. Endpoints are keyed by workload UID.
type Service struct {
	Name            string               `json:"name"`
	Namespace       string               `json:"namespace"`
	Hostname        string               `json:"hostname"`
	VIPs            []string             `json:"vips"`
	Ports           map[uint16]uint16    `json:"ports"`
	Endpoints       map[string]*Endpoint `json:"endpoints"`
	SubjectAltNames []string             `json:"subjectAltNames,omitempty"`
	Waypoint        *Gateway             `json:"waypoint,omitempty"`
	LoadBalancer    *LoadBalancer        `json:"loadBalancer,omitempty"`
	IPFamilies      string               `json:"ipFamilies,omitempty"`
}

// StringMatch is ztunnel's serialization of a string matcher: one key.
type StringMatch struct {
	Exact    string `json:"Exact,omitempty"`
	Prefix   string `json:"Prefix,omitempty"`
	Suffix   string `json:"Suffix,omitempty"`
	Presence any    `json:"Presence,omitempty"`
}

// ServiceAccountMatch matches a source by namespace and service account.
type ServiceAccountMatch struct {
	Namespace      string `json:"namespace"`
	ServiceAccount string `json:"serviceAccount"`
}

// Match is one match of a rule; every non-empty field must hold.
type Match struct {
	Namespaces          []StringMatch         `json:"namespaces,omitempty"`
	NotNamespaces       []StringMatch         `json:"notNamespaces,omitempty"`
	Principals          []StringMatch         `json:"principals,omitempty"`
	NotPrincipals       []StringMatch         `json:"notPrincipals,omitempty"`
	SourceIPs           []string              `json:"sourceIps,omitempty"`
	NotSourceIPs        []string              `json:"notSourceIps,omitempty"`
	DestinationIPs      []string              `json:"destinationIps,omitempty"`
	NotDestinationIPs   []string              `json:"notDestinationIps,omitempty"`
	DestinationPorts    []uint16              `json:"destinationPorts,omitempty"`
	NotDestinationPorts []uint16              `json:"notDestinationPorts,omitempty"`
	ServiceAccounts     []ServiceAccountMatch `json:"serviceAccounts,omitempty"`
	NotServiceAccounts  []ServiceAccountMatch `json:"notServiceAccounts,omitempty"`
}

// Policy is an authorization policy. Rules nest as istiod sends them:
// groups (all must match) of rules (any may match) of matches.
type Policy struct {
	Name      string       `json:"name"`
	Namespace string       `json:"namespace"`
	Scope     string       `json:"scope"`
	Action    string       `json:"action"`
	DryRun    bool         `json:"dryRun,omitempty"`
	Rules     [][][]*Match `json:"rules"`
}

// Cert is one certificate of a chain.
type Cert struct {
	PEM string `json:"pem"`
	// SerialNumber is decimal: istioctl parses it base 10 and prints hex.
	SerialNumber   string `json:"serialNumber"`
	ValidFrom      string `json:"validFrom"`
	ExpirationTime string `json:"expirationTime"`
}

// Certs is one identity's certificate. State is "Available",
// "Initializing" or "Unavailable: <why>" (istioctl shows "Unavailable").
type Certs struct {
	Identity  string `json:"identity"`
	State     string `json:"state"`
	CertChain []Cert `json:"certChain"`
	RootCerts []Cert `json:"rootCerts"`
}

// Connection is one connection the node proxy carries for a pod.
type Connection struct {
	Src         string `json:"src"`
	OriginalDst string `json:"originalDst"`
	ActualDst   string `json:"actualDst"`
	Protocol    string `json:"protocol"`
}

// Connections are a pod's proxied connections by direction.
type Connections struct {
	Inbound  []Connection `json:"inbound"`
	Outbound []Connection `json:"outbound"`
}

// PodInfo names an enrolled pod.
type PodInfo struct {
	Name           string `json:"name"`
	Namespace      string `json:"namespace"`
	TrustDomain    string `json:"trustDomain,omitempty"`
	ServiceAccount string `json:"serviceAccount"`
}

// PodState is an enrolled pod as ztunnel reports it ("Up" once its
// listeners are open and the kernel redirects it).
type PodState struct {
	State       string      `json:"state"`
	Connections Connections `json:"connections"`
	Info        PodInfo     `json:"info"`
	// NetnsCookie is Kmesh's own: the key of the pod's namespace in the
	// kernel's kmesh_managed map (`kmeshctl dump managed`), which names
	// pods by it.
	NetnsCookie uint64 `json:"netnsCookie,omitempty"`
}

// Pod is a pod enrolled on this node (the agent's enroller knows them).
type Pod struct {
	// UID is the enrolment's id (ZDS uid: the Kubernetes pod UID).
	UID                                          string
	Name, Namespace, ServiceAccount, TrustDomain string
	// State is "Up" for a pod whose enrolment completed.
	State       string
	Connections Connections
	NetnsCookie uint64
}

// Input is what the dump is built from.
type Input struct {
	State state.Snapshot
	// Certificates are the identity manager's (nil without a CA).
	Certificates []identity.Held
	Pods         []Pod
	// Now decides whether a held certificate is still valid.
	Now time.Time
}

// Build renders in as ztunnel's config dump. Lists are never nil, so the
// JSON shows [] and {} rather than null (Istio's own test of
// `istioctl ztunnel-config ... -o json` wants non-empty values).
func Build(in Input) Dump {
	d := Dump{
		Workloads:     make([]Workload, 0, len(in.State.Workloads)),
		Services:      make([]Service, 0, len(in.State.Services)),
		Policies:      make([]Policy, 0, len(in.State.Policies)),
		Certificates:  make([]Certs, 0, len(in.Certificates)),
		WorkloadState: make(map[string]PodState, len(in.Pods)),
	}
	for _, w := range in.State.Workloads {
		d.Workloads = append(d.Workloads, workload(w))
	}
	eps := endpoints(in.State.Workloads)
	for _, s := range in.State.Services {
		d.Services = append(d.Services, service(s, eps[s.Key()]))
	}
	for _, p := range in.State.Policies {
		d.Policies = append(d.Policies, policy(p.Authorization))
	}
	for _, h := range in.Certificates {
		d.Certificates = append(d.Certificates, certs(h, in.Now))
	}
	for _, p := range in.Pods {
		c := p.Connections
		if c.Inbound == nil {
			c.Inbound = []Connection{}
		}
		if c.Outbound == nil {
			c.Outbound = []Connection{}
		}
		d.WorkloadState[p.UID] = PodState{State: p.State, Connections: c, NetnsCookie: p.NetnsCookie,
			Info: PodInfo{Name: p.Name, Namespace: p.Namespace, TrustDomain: p.TrustDomain, ServiceAccount: p.ServiceAccount}}
	}
	return d
}

// netAddr is ztunnel's "network/ip", with an empty network kept as a
// leading slash: istioctl compares waypoints and VIPs in this form.
func netAddr(network string, a netip.Addr) string { return network + "/" + a.String() }

func gateway(g *state.GatewayAddress) *Gateway {
	if g == nil {
		return nil
	}
	out := &Gateway{Destination: g.Hostname, HBONEMTLSPort: g.HBONEMTLSPort}
	if g.Address != nil {
		out.Destination = netAddr(g.Address.Network, g.Address.Addr)
	}
	return out
}

func workload(w *state.Workload) Workload {
	m := w.Meta()
	out := Workload{
		UID: w.UID, Name: w.Name, Namespace: m.Namespace, ServiceAccount: m.ServiceAccount,
		WorkloadName: m.WorkloadName, WorkloadType: m.WorkloadType, CanonicalName: m.CanonicalName,
		CanonicalRevision: m.CanonicalRevision, ClusterID: m.ClusterID, TrustDomain: m.TrustDomain,
		Node: m.Node, Network: m.Network, Hostname: w.Hostname, Capacity: w.Capacity,
		Waypoint: gateway(w.Waypoint), NetworkGateway: gateway(w.NetworkGateway),
		AuthorizationPolicies: w.AuthorizationPolicies,
		WorkloadIPs:           make([]string, len(w.Addresses)),
		Protocol:              "TCP", Status: "Unhealthy",
	}
	for i, a := range w.Addresses {
		out.WorkloadIPs[i] = a.String()
	}
	if w.HBONE {
		out.Protocol = "HBONE"
	}
	if w.Healthy {
		out.Status = "Healthy"
	}
	if w.HostNetwork {
		out.NetworkMode = "HostNetwork"
	}
	if l := m.Locality; l != (state.Locality{}) {
		out.Locality = &Locality{Region: l.Region, Zone: l.Zone, Subzone: l.Subzone}
	}
	return out
}

// endpoints groups workloads by the services that select them (each
// workload lists its services with its own port mapping), keyed by
// service key ("namespace/hostname").
func endpoints(ws []*state.Workload) map[string][]*state.Workload {
	out := map[string][]*state.Workload{}
	for _, w := range ws {
		for _, sp := range w.Services {
			out[sp.Service] = append(out[sp.Service], w)
		}
	}
	return out
}

func portMap(ps []state.Port) map[uint16]uint16 {
	m := make(map[uint16]uint16, len(ps))
	for _, p := range ps {
		m[p.ServicePort] = p.TargetPort
	}
	return m
}

func service(s *state.Service, members []*state.Workload) Service {
	out := Service{
		Name: s.Name, Namespace: s.Namespace, Hostname: s.Hostname, SubjectAltNames: s.SubjectAltNames,
		VIPs: make([]string, len(s.VIPs)), Ports: portMap(s.Ports), Waypoint: gateway(s.Waypoint),
		Endpoints: make(map[string]*Endpoint, len(members)),
	}
	v4, v6 := false, false
	for i, v := range s.VIPs {
		out.VIPs[i] = netAddr(v.Network, v.Addr)
		v4, v6 = v4 || v.Addr.Is4(), v6 || v.Addr.Is6()
	}
	switch {
	case v4 && v6:
		out.IPFamilies = "Dual"
	case v4:
		out.IPFamilies = "IPv4"
	case v6:
		out.IPFamilies = "IPv6"
	}
	if lb := s.LoadBalancing; lb != nil {
		out.LoadBalancer = &LoadBalancer{Mode: lbMode(lb.Mode), HealthPolicy: healthPolicy(lb.HealthPolicy),
			RoutingPreferences: make([]string, len(lb.RoutingPreference))}
		for i, sc := range lb.RoutingPreference {
			out.LoadBalancer.RoutingPreferences[i] = camel(workloadapi.LoadBalancing_Scope_name[int32(sc)])
		}
	}
	for _, w := range members {
		ep := &Endpoint{WorkloadUID: w.UID, Service: s.Key()}
		if len(w.Addresses) > 0 {
			ep.Address = netAddr(w.Network(), w.Addresses[0])
		}
		// A workload without its own mapping for the service takes the
		// service's target ports.
		if ps, ok := w.PortsFor(s.Key()); ok && len(ps) > 0 {
			ep.Port = portMap(ps)
		} else {
			ep.Port = portMap(s.Ports)
		}
		out.Endpoints[w.UID] = ep
	}
	return out
}

// camel turns a proto enum name (ONLY_HEALTHY) into ztunnel's serde name
// (OnlyHealthy).
func camel(s string) string {
	var b strings.Builder
	for _, part := range strings.Split(strings.ToLower(s), "_") {
		if part != "" {
			b.WriteString(strings.ToUpper(part[:1]) + part[1:])
		}
	}
	return b.String()
}

func lbMode(m workloadapi.LoadBalancing_Mode) string {
	if m == workloadapi.LoadBalancing_UNSPECIFIED_MODE {
		return "Standard" // ztunnel's name for "no preference"
	}
	return camel(m.String())
}

func healthPolicy(h workloadapi.LoadBalancing_HealthPolicy) string { return camel(h.String()) }

func policy(a *security.Authorization) Policy {
	out := Policy{Name: a.GetName(), Namespace: a.GetNamespace(), DryRun: a.GetDryRun(),
		Scope: camel(a.GetScope().String()), Action: camel(a.GetAction().String()),
		Rules: make([][][]*Match, 0, len(a.GetGroups()))}
	for _, g := range a.GetGroups() {
		rules := make([][]*Match, 0, len(g.GetRules()))
		for _, r := range g.GetRules() {
			ms := make([]*Match, 0, len(r.GetMatches()))
			for _, m := range r.GetMatches() {
				ms = append(ms, match(m))
			}
			rules = append(rules, ms)
		}
		out.Rules = append(out.Rules, rules)
	}
	return out
}

func match(m *security.Match) *Match {
	return &Match{
		Namespaces: stringMatches(m.GetNamespaces()), NotNamespaces: stringMatches(m.GetNotNamespaces()),
		Principals: stringMatches(m.GetPrincipals()), NotPrincipals: stringMatches(m.GetNotPrincipals()),
		SourceIPs: cidrs(m.GetSourceIps()), NotSourceIPs: cidrs(m.GetNotSourceIps()),
		DestinationIPs: cidrs(m.GetDestinationIps()), NotDestinationIPs: cidrs(m.GetNotDestinationIps()),
		DestinationPorts: ports(m.GetDestinationPorts()), NotDestinationPorts: ports(m.GetNotDestinationPorts()),
		ServiceAccounts: serviceAccounts(m.GetServiceAccounts()), NotServiceAccounts: serviceAccounts(m.GetNotServiceAccounts()),
	}
}

func stringMatches(ms []*security.StringMatch) []StringMatch {
	var out []StringMatch
	for _, m := range ms {
		switch t := m.GetMatchType().(type) {
		case *security.StringMatch_Exact:
			out = append(out, StringMatch{Exact: t.Exact})
		case *security.StringMatch_Prefix:
			out = append(out, StringMatch{Prefix: t.Prefix})
		case *security.StringMatch_Suffix:
			out = append(out, StringMatch{Suffix: t.Suffix})
		case *security.StringMatch_Presence:
			out = append(out, StringMatch{Presence: struct{}{}})
		}
	}
	return out
}

// cidrs writes addresses as prefixes ("10.0.0.0/8"); state.ConvertPolicy
// has validated them, so a bad one is skipped rather than reported.
func cidrs(as []*security.Address) []string {
	var out []string
	for _, a := range as {
		ip, ok := netip.AddrFromSlice(a.GetAddress())
		if !ok {
			continue
		}
		out = append(out, ip.Unmap().String()+"/"+strconv.Itoa(int(a.GetLength())))
	}
	return out
}

func ports(ps []uint32) []uint16 {
	var out []uint16
	for _, p := range ps {
		out = append(out, uint16(p))
	}
	return out
}

func serviceAccounts(ms []*security.ServiceAccountMatch) []ServiceAccountMatch {
	var out []ServiceAccountMatch
	for _, m := range ms {
		out = append(out, ServiceAccountMatch{Namespace: m.GetNamespace(), ServiceAccount: m.GetServiceAccount()})
	}
	return out
}

// certState is ztunnel's state word for a held identity: a certificate
// valid now is Available even while its renewal fails (it is what the
// tunnel presents); none yet and no error is Initializing.
func certState(h identity.Held, now time.Time) string {
	switch {
	case h.Cert != nil && now.Before(h.Cert.NotAfter):
		return "Available"
	case h.Err != nil:
		return "Unavailable: " + h.Err.Error()
	case h.Cert != nil:
		return "Unavailable: the certificate expired at " + h.Cert.NotAfter.UTC().Format(time.RFC3339) + "; renewing"
	default:
		return "Initializing"
	}
}

func certs(h identity.Held, now time.Time) Certs {
	out := Certs{Identity: h.Identity.String(), State: certState(h, now), CertChain: []Cert{}, RootCerts: []Cert{}}
	if h.Cert == nil {
		return out
	}
	// An expired certificate is still shown: istioctl marks it not valid,
	// which says more than an empty row.
	for _, der := range h.Cert.TLS.Certificate {
		if c, err := x509.ParseCertificate(der); err == nil {
			out.CertChain = append(out.CertChain, cert(c))
		}
	}
	for _, r := range h.Cert.Roots {
		out.RootCerts = append(out.RootCerts, cert(r))
	}
	return out
}

func cert(c *x509.Certificate) Cert {
	return Cert{
		PEM:            string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})),
		SerialNumber:   c.SerialNumber.String(),
		ValidFrom:      c.NotBefore.UTC().Format(time.RFC3339),
		ExpirationTime: c.NotAfter.UTC().Format(time.RFC3339),
	}
}
