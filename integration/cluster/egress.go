package cluster

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// The API server's own outgoing calls to the cluster (admission and
// conversion webhooks, aggregated APIs, the kubelet API for logs, exec and
// port-forward) dial a ClusterIP, a pod IP or a node address. Dialed from
// this machine's network namespace, a ClusterIP like 10.96.0.10 would
// leave the machine. So the API server gets an egress selector
// configuration (--egress-selector-config-file) that sends every such
// call through an HTTP CONNECT proxy the test serves on a Unix socket:
//
//   - egress type "cluster" (webhooks, aggregated APIs, kubelets): the
//     proxy maps a Service's ClusterIP:port to a ready endpoint (from the
//     EndpointSlices, as kube-proxy would) and dials it from inside a
//     simulated node's network namespace; a pod or node address of the
//     simulated cluster is dialed there as is; anything else is refused
//     and logged, never dialed.
//   - egress type "controlplane": loopback only, dialed from here;
//     anything else refused. The API server uses it for admission webhooks
//     addressed by URL (clientConfig.url; seen in TestPrivilegedClusterEgress)
//     and for authentication/authorization webhooks and OIDC discovery
//     (none configured here). Istio's webhooks are addressed by Service, so
//     they take the "cluster" path.
//   - egress type "etcd" is not configured: the API server dials
//     --etcd-servers directly, which is 127.0.0.1.

// EgressSockets names the proxies' Unix sockets.
type EgressSockets struct {
	Cluster      string
	ControlPlane string
}

func (e *EgressSockets) config() string {
	return fmt.Sprintf(`apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: HTTPConnect
    transport:
      uds:
        udsName: %s
- name: controlplane
  connection:
    proxyProtocol: HTTPConnect
    transport:
      uds:
        udsName: %s
`, e.Cluster, e.ControlPlane)
}

// DialFunc dials from inside a simulated node's network namespace.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// EgressEvent is one CONNECT the proxy answered.
type EgressEvent struct {
	Target string // what the API server asked for
	Dialed string // what was dialed, empty when refused
	Err    string // why it was refused or failed
}

// EgressProxy is an HTTP CONNECT proxy on a Unix socket.
type EgressProxy struct {
	Sock string
	// resolve maps a CONNECT target to the address to dial and the dialer.
	resolve func(ctx context.Context, target string) (netip.AddrPort, DialFunc, error)
	logf    func(string, ...any)
	ln      net.Listener
	wg      sync.WaitGroup

	mu     sync.Mutex
	events []EgressEvent
	conns  map[net.Conn]bool
	closed bool
}

// ClusterEgress is what the "cluster" proxy needs to map and dial.
type ClusterEgress struct {
	// Inside lists the simulated cluster's pod and node prefixes: the only
	// addresses ever dialed (from a node's network namespace).
	Inside []netip.Prefix

	mu   sync.Mutex
	dial DialFunc
	kube kubernetes.Interface
}

// SetKube gives the proxy its API client (once the API server is up).
func (c *ClusterEgress) SetKube(k kubernetes.Interface) {
	c.mu.Lock()
	c.kube = k
	c.mu.Unlock()
}

// SetDialer sets how to dial from a simulated node (nil: refuse all) and
// returns the previous one.
func (c *ClusterEgress) SetDialer(d DialFunc) DialFunc {
	c.mu.Lock()
	defer c.mu.Unlock()
	prev := c.dial
	c.dial = d
	return prev
}

// ListenClusterEgress serves the "cluster" proxy at sock.
func ListenClusterEgress(sock string, c *ClusterEgress, logf func(string, ...any)) (*EgressProxy, error) {
	return listenEgress(sock, logf, func(ctx context.Context, target string) (netip.AddrPort, DialFunc, error) {
		c.mu.Lock()
		d, kube := c.dial, c.kube
		c.mu.Unlock()
		if d == nil {
			return netip.AddrPort{}, nil, errors.New("no simulated node to dial from yet")
		}
		if kube == nil {
			return netip.AddrPort{}, nil, errors.New("no API client yet")
		}
		svcs, err := kube.CoreV1().Services("").List(ctx, metav1.ListOptions{})
		if err != nil {
			return netip.AddrPort{}, nil, fmt.Errorf("listing services: %w", err)
		}
		eps, err := kube.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{})
		if err != nil {
			return netip.AddrPort{}, nil, fmt.Errorf("listing endpointslices: %w", err)
		}
		ap, err := egressTarget(target, svcs.Items, eps.Items, c.Inside)
		return ap, d, err
	})
}

// ListenLoopbackEgress serves the "controlplane" proxy: loopback targets
// only, dialed from this network namespace.
func ListenLoopbackEgress(sock string, logf func(string, ...any)) (*EgressProxy, error) {
	var d net.Dialer
	return listenEgress(sock, logf, func(_ context.Context, target string) (netip.AddrPort, DialFunc, error) {
		ap, err := netip.ParseAddrPort(target)
		if err != nil {
			return netip.AddrPort{}, nil, fmt.Errorf("not an address: %w", err)
		}
		if !ap.Addr().Unmap().IsLoopback() {
			return netip.AddrPort{}, nil, errors.New("the control-plane egress reaches loopback only")
		}
		return ap, d.DialContext, nil
	})
}

func listenEgress(sock string, logf func(string, ...any), resolve func(context.Context, string) (netip.AddrPort, DialFunc, error)) (*EgressProxy, error) {
	_ = os.Remove(sock)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return nil, err
	}
	if logf == nil {
		logf = func(string, ...any) {}
	}
	p := &EgressProxy{Sock: sock, resolve: resolve, logf: logf, ln: ln, conns: map[net.Conn]bool{}}
	p.wg.Add(1)
	go p.serve()
	return p, nil
}

// Events lists what the proxy answered so far.
func (p *EgressProxy) Events() []EgressEvent {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.events)
}

func (p *EgressProxy) record(e EgressEvent) {
	p.mu.Lock()
	if len(p.events) < 10000 { // bounded: the API server retries
		p.events = append(p.events, e)
	}
	p.mu.Unlock()
	if e.Err != "" {
		p.logf("egress %s: CONNECT %s refused: %s", p.Sock, e.Target, e.Err)
	}
}

// Close stops the proxy and its tunnels.
func (p *EgressProxy) Close() error {
	err := p.ln.Close()
	p.mu.Lock()
	p.closed = true
	for c := range p.conns {
		_ = c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	return err
}

func (p *EgressProxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.conns[c] = true
	return true
}

func (p *EgressProxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
}

func (p *EgressProxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		if !p.track(c) {
			_ = c.Close()
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			defer p.untrack(c)
			defer c.Close()
			p.handle(c)
		}()
	}
}

func (p *EgressProxy) handle(c net.Conn) {
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReaderSize(c, 4096)
	req, err := http.ReadRequest(br)
	if err != nil {
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	if req.Method != http.MethodConnect {
		p.record(EgressEvent{Target: req.RequestURI, Err: "not a CONNECT"})
		fmt.Fprint(c, "HTTP/1.1 405 Method Not Allowed\r\n\r\n")
		return
	}
	target := req.RequestURI
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ap, dial, err := p.resolve(ctx, target)
	if err != nil {
		p.record(EgressEvent{Target: target, Err: err.Error()})
		fmt.Fprintf(c, "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n\r\nkmesh cluster tier egress: %s: %v\n", target, err)
		return
	}
	up, err := dial(ctx, "tcp", ap.String())
	if err != nil {
		p.record(EgressEvent{Target: target, Dialed: ap.String(), Err: err.Error()})
		fmt.Fprintf(c, "HTTP/1.1 503 Service Unavailable\r\n\r\n")
		return
	}
	defer up.Close()
	p.record(EgressEvent{Target: target, Dialed: ap.String()})
	if !p.track(up) {
		return
	}
	defer p.untrack(up)
	fmt.Fprint(c, "HTTP/1.1 200 Connection established\r\n\r\n")
	// The client speaks first (TLS), so br holds nothing unread; copy it
	// anyway in case it does.
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(up, br); closeWrite(up); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, up); closeWrite(c); done <- struct{}{} }()
	<-done
	<-done
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
}

// egressTarget decides what the "cluster" proxy dials for a CONNECT
// target, as kube-proxy would route it: a Service's ClusterIP and port go
// to a ready endpoint of the matching port (the first, in the slices'
// order); a pod or node address inside the simulated cluster (inside) is
// dialed as is. Anything else, names included (there is no cluster DNS
// here), is refused.
func egressTarget(target string, svcs []corev1.Service, slices []discoveryv1.EndpointSlice, inside []netip.Prefix) (netip.AddrPort, error) {
	host, portS, err := net.SplitHostPort(target)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("bad target: %w", err)
	}
	port, err := strconv.ParseUint(portS, 10, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("bad port %q", portS)
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%q is not an address (no cluster DNS here)", host)
	}
	ip = ip.Unmap()
	isInside := func(a netip.Addr) bool {
		for _, p := range inside {
			if p.Contains(a) {
				return true
			}
		}
		return false
	}
	for i := range svcs {
		s := &svcs[i]
		if !slices2Contains(s.Spec.ClusterIPs, s.Spec.ClusterIP, ip) {
			continue
		}
		var sp *corev1.ServicePort
		for j := range s.Spec.Ports {
			if s.Spec.Ports[j].Port == int32(port) && (s.Spec.Ports[j].Protocol == "" || s.Spec.Ports[j].Protocol == corev1.ProtocolTCP) {
				sp = &s.Spec.Ports[j]
			}
		}
		if sp == nil {
			return netip.AddrPort{}, fmt.Errorf("service %s/%s has no TCP port %d", s.Namespace, s.Name, port)
		}
		for _, ep := range readyEndpoints(slices, s, sp.Name, corev1.ProtocolTCP) {
			if isInside(ep.Addr()) { // never dial an endpoint outside the simulated cluster
				return ep, nil
			}
		}
		return netip.AddrPort{}, fmt.Errorf("service %s/%s port %d has no ready endpoint inside the simulated cluster", s.Namespace, s.Name, port)
	}
	if isInside(ip) {
		return netip.AddrPortFrom(ip, uint16(port)), nil
	}
	return netip.AddrPort{}, fmt.Errorf("%s is neither a Service's ClusterIP nor an address inside the simulated cluster %v", ip, inside)
}

// readyEndpoints lists, from EndpointSlices, the ready endpoints of the
// port named portName (protocol proto) of Service s, as kube-proxy reads
// them: a slice's port matched by name, endpoints without a Ready
// condition counted as ready.
func readyEndpoints(eps []discoveryv1.EndpointSlice, s *corev1.Service, portName string, proto corev1.Protocol) []netip.AddrPort {
	var out []netip.AddrPort
	for _, es := range eps {
		if es.Namespace != s.Namespace || es.Labels[discoveryv1.LabelServiceName] != s.Name {
			continue
		}
		var port int32
		for _, p := range es.Ports {
			if p.Port != nil && ptrStr(p.Name) == portName && (p.Protocol == nil || *p.Protocol == proto) {
				port = *p.Port
			}
		}
		if port == 0 {
			continue
		}
		for _, ep := range es.Endpoints {
			if ep.Conditions.Ready != nil && !*ep.Conditions.Ready {
				continue
			}
			for _, a := range ep.Addresses {
				if ip, err := netip.ParseAddr(a); err == nil {
					out = append(out, netip.AddrPortFrom(ip, uint16(port)))
				}
			}
		}
	}
	return out
}

func slices2Contains(ips []string, ip string, a netip.Addr) bool {
	for _, s := range append([]string{ip}, ips...) {
		if b, err := netip.ParseAddr(s); err == nil && b == a {
			return true
		}
	}
	return false
}

func ptrStr(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}
