package cluster

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"kmesh.dev/kmesh/integration/podnet"
)

// ServiceProxy stands in for kube-proxy on the simulated nodes: pods that
// are not in the mesh (istiod, the node agents, the kmesh-daemon's own
// pod) reach Services by ClusterIP, e.g. the daemon's XDS_ADDRESS
// istiod.istio-system.svc:15012 (the kubelet's /etc/hosts gives the
// name's ClusterIP). In each node's network namespace, and only there, a
// nat chain DNATs every ClusterIP:port with ready endpoints to one of
// them (chosen at random per connection, as kube-proxy's iptables mode
// does). What it rewrote towards a pod on the node's own bridge is
// masqueraded to the node's bridge address, so the reply comes back
// through the node to be un-DNATed (no br_netfilter needed); towards
// another node it keeps the pod's source (pods route only the pod
// prefix, and the reply passes this node anyway). A ClusterIP without endpoints matches nothing and, with no
// route beyond the simulated cluster, goes nowhere. Mesh pods' ClusterIP
// connections never get here: Kmesh rewrites them at connect().
type ServiceProxy struct {
	Kube kubernetes.Interface
	// Nodes lists the nodes' network namespaces to program (called on
	// every sync: nodes may come later).
	Nodes func() []*podnet.Netns
	Logf  func(string, ...any)

	mu    sync.Mutex
	setup map[*podnet.Netns]string // rules last written, by node
}

const (
	svcChain  = "KMESH-SERVICES"
	masqChain = "KMESH-SVC-MASQ"
)

// Run syncs the rules every interval until ctx ends.
func (s *ServiceProxy) Run(ctx context.Context, interval time.Duration) {
	for {
		if err := s.Sync(ctx); err != nil && s.Logf != nil && ctx.Err() == nil {
			s.Logf("service proxy: %v", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(interval):
		}
	}
}

// Sync writes the current rules to every node that lacks them.
func (s *ServiceProxy) Sync(ctx context.Context) error {
	svcs, err := s.Kube.CoreV1().Services("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	eps, err := s.Kube.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	rules := serviceRules(svcs.Items, eps.Items)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.setup == nil {
		s.setup = map[*podnet.Netns]string{}
	}
	var errs []string
	for _, ns := range s.Nodes() {
		last, known := s.setup[ns]
		if known && last == rules {
			continue
		}
		if err := ns.Do(func() error { return applyServiceRules(rules, !known) }); err != nil {
			errs = append(errs, err.Error())
			continue
		}
		s.setup[ns] = rules
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return nil
}

// applyServiceRules runs iptables-restore in the calling thread's network
// namespace (the child inherits it). The first time, the chains are
// hooked into PREROUTING, OUTPUT and POSTROUTING.
func applyServiceRules(rules string, first bool) error {
	if first {
		in := "*nat\n:" + svcChain + " - [0:0]\n:" + masqChain + " - [0:0]\n" +
			"-A PREROUTING -j " + svcChain + "\n-A OUTPUT -j " + svcChain + "\n-A POSTROUTING -j " + masqChain + "\n" +
			"-A " + masqChain + " -o br0 -m conntrack --ctstate DNAT -m comment --comment kmesh-service-proxy -j MASQUERADE\nCOMMIT\n"
		if err := iptablesRestore(in); err != nil {
			return err
		}
	}
	return iptablesRestore(rules)
}

func iptablesRestore(in string) error {
	cmd := exec.Command("iptables-restore", "--noflush", "-w", "5")
	cmd.Stdin = strings.NewReader(in)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("iptables-restore: %w: %s\ninput:\n%s", err, strings.TrimSpace(out.String()), in)
	}
	return nil
}

// serviceRules is the nat table input (iptables-restore --noflush) that
// replaces the service chain: one DNAT per ready endpoint of each
// ClusterIP service port (IPv4, TCP and UDP), the n-th of k taken with
// probability 1/(k-n) so each is equally likely.
func serviceRules(svcs []corev1.Service, eps []discoveryv1.EndpointSlice) string {
	var b strings.Builder
	b.WriteString("*nat\n:" + svcChain + " - [0:0]\n")
	sorted := slices.Clone(svcs)
	slices.SortFunc(sorted, func(a, b corev1.Service) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	for _, s := range sorted {
		vip, err := netip.ParseAddr(s.Spec.ClusterIP)
		if err != nil || !vip.Is4() {
			continue // headless or IPv6: not used here
		}
		for _, sp := range s.Spec.Ports {
			proto := sp.Protocol
			if proto == "" {
				proto = corev1.ProtocolTCP
			}
			if proto != corev1.ProtocolTCP && proto != corev1.ProtocolUDP {
				continue
			}
			var dsts []string
			for _, ep := range readyEndpoints(eps, &s, sp.Name, proto) {
				if ep.Addr().Is4() {
					dsts = append(dsts, ep.String())
				}
			}
			slices.Sort(dsts)
			dsts = slices.Compact(dsts)
			match := fmt.Sprintf("-A %s -d %s/32 -p %s --dport %d -m comment --comment %s/%s:%s", svcChain, vip, strings.ToLower(string(proto)), sp.Port, s.Namespace, s.Name, sp.Name)
			for i, d := range dsts {
				left := len(dsts) - i
				if left > 1 {
					fmt.Fprintf(&b, "%s -m statistic --mode random --probability %.5f -j DNAT --to-destination %s\n", match, 1/float64(left), d)
				} else {
					fmt.Fprintf(&b, "%s -j DNAT --to-destination %s\n", match, d)
				}
			}
		}
	}
	b.WriteString("COMMIT\n")
	return b.String()
}
