package podnet

import (
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func setLinkUp(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	return netlink.LinkSetUp(l)
}

// Node is a simulated node's network: a namespace holding a bridge that the
// node's pods hang off. Pods of one node share an L2 segment.
type Node struct {
	Name string
	NS   *Netns

	h      *netlink.Handle
	bridge netlink.Link
	v4, v6 netip.Prefix
	// gw4/gw6 are the node's addresses on its pod bridge when the node is on
	// a Fabric; pods then route the cluster prefixes through them.
	gw4, gw6           netip.Addr
	cluster4, cluster6 netip.Prefix
	uplink4, uplink6   netip.Addr

	mu   sync.Mutex
	pods []*Pod
	seq  int
}

// Pod is a network namespace with one interface, eth0, on its node's bridge.
type Pod struct {
	Name string
	NS   *Netns
	IPv4 netip.Addr // invalid when the pod has no IPv4 address
	IPv6 netip.Addr // invalid when the pod has no IPv6 address
}

// NewNode creates a node namespace with a bridge carrying the given pod
// prefixes. Either prefix may be the zero value to leave that family out.
func NewNode(name string, v4, v6 netip.Prefix) (*Node, error) {
	ns, err := NewNetns("node-" + name)
	if err != nil {
		return nil, err
	}
	n := &Node{Name: name, NS: ns, v4: v4, v6: v6}
	if err := n.init(); err != nil {
		n.Close()
		return nil, fmt.Errorf("node %s: %w", name, err)
	}
	return n, nil
}

func (n *Node) init() error {
	h, err := netlink.NewHandleAt(n.NS.h)
	if err != nil {
		return err
	}
	n.h = h
	if n.bridge, err = addBridge(h, "br0"); err != nil {
		return fmt.Errorf("adding bridge: %w", err)
	}
	return nil
}

// addBridge creates a bridge with an address of its own and brings it up.
// A bridge without one takes the lowest address among its ports. When the
// pod whose veth had it leaves, the bridge takes the next lowest, and the
// other pods' ARP entries for the gateway point at an address nobody owns
// any more: their traffic off the node (across the fabric: the tunnel
// path) goes nowhere until the entry is probed again
// (TestPrivilegedOffNodeTrafficSurvivesAPodLeaving). A pod leaving a node
// (istiod's old pod in TestPrivilegedClusterIstiodRestart) must not
// disturb the other pods, as on a real node, where the CNI's bridge keeps
// its address.
func addBridge(h *netlink.Handle, name string) (netlink.Link, error) {
	if err := h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}); err != nil {
		return nil, err
	}
	br, err := h.LinkByName(name)
	if err != nil {
		return nil, err
	}
	// Set after creation, as `ip link set address` does: that marks the
	// address as assigned (NET_ADDR_SET), which the bridge then keeps.
	if err := h.LinkSetHardwareAddr(br, localMAC()); err != nil {
		return nil, fmt.Errorf("setting %s's address: %w", name, err)
	}
	return br, h.LinkSetUp(br)
}

// localMAC is a random locally administered unicast address.
func localMAC() net.HardwareAddr {
	var b [6]byte
	_, _ = rand.Read(b[:])
	b[0] = b[0]&^1 | 2
	return b[:]
}

// AddPod creates a pod namespace on this node with the given addresses (the
// zero Addr leaves a family out). Routes cover the node's prefixes only.
func (n *Node) AddPod(name string, v4, v6 netip.Addr) (*Pod, error) {
	if v4.IsValid() && !n.v4.Contains(v4) || v6.IsValid() && !n.v6.Contains(v6) {
		return nil, fmt.Errorf("pod %s: addresses %v %v outside node prefixes %v %v", name, v4, v6, n.v4, n.v6)
	}
	ns, err := NewNetns("pod-" + name)
	if err != nil {
		return nil, err
	}
	p := &Pod{Name: name, NS: ns, IPv4: v4, IPv6: v6}
	if err := n.plumb(p); err != nil {
		ns.Close()
		return nil, fmt.Errorf("pod %s: %w", name, err)
	}
	n.mu.Lock()
	n.pods = append(n.pods, p)
	n.mu.Unlock()
	return p, nil
}

func (n *Node) plumb(p *Pod) error {
	n.mu.Lock()
	n.seq++
	hostIf := fmt.Sprintf("veth%d", n.seq)
	n.mu.Unlock()

	veth := &netlink.Veth{
		LinkAttrs: netlink.LinkAttrs{Name: hostIf, MasterIndex: n.bridge.Attrs().Index},
		PeerName:  "eth0",
		// Created directly inside the pod namespace: no rename dance.
		PeerNamespace: netlink.NsFd(p.NS.Fd()),
	}
	if err := n.h.LinkAdd(veth); err != nil {
		return fmt.Errorf("adding veth: %w", err)
	}
	host, err := n.h.LinkByName(hostIf)
	if err != nil {
		return err
	}
	if err := n.h.LinkSetUp(host); err != nil {
		return err
	}

	ph, err := netlink.NewHandleAt(p.NS.h)
	if err != nil {
		return err
	}
	defer ph.Close()
	eth, err := ph.LinkByName("eth0")
	if err != nil {
		return err
	}
	for _, a := range []struct {
		addr netip.Addr
		pfx  netip.Prefix
	}{{p.IPv4, n.v4}, {p.IPv6, n.v6}} {
		if !a.addr.IsValid() {
			continue
		}
		ipn := &net.IPNet{IP: a.addr.AsSlice(), Mask: net.CIDRMask(a.pfx.Bits(), a.addr.BitLen())}
		// NODAD: an IPv6 address is usable at once instead of after ~2 s.
		if err := ph.AddrAdd(eth, &netlink.Addr{IPNet: ipn, Flags: unix.IFA_F_NODAD}); err != nil {
			return fmt.Errorf("adding %v: %w", a.addr, err)
		}
	}
	if err := ph.LinkSetUp(eth); err != nil {
		return err
	}
	// On a fabric, the rest of the cluster is through the node. Only the
	// cluster's prefixes: nothing else has a route.
	for _, r := range []struct {
		dst netip.Prefix
		gw  netip.Addr
		has bool
	}{{n.cluster4, n.gw4, p.IPv4.IsValid()}, {n.cluster6, n.gw6, p.IPv6.IsValid()}} {
		if !r.gw.IsValid() || !r.has {
			continue
		}
		if err := ph.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Dst: prefixNet(r.dst), Gw: r.gw.AsSlice()}); err != nil {
			return fmt.Errorf("route to %v: %w", r.dst, err)
		}
	}
	return nil
}

// Pods returns the pods created on this node.
func (n *Node) Pods() []*Pod {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]*Pod(nil), n.pods...)
}

// Close removes every pod namespace and the node namespace.
func (n *Node) Close() error {
	var errs []error
	for _, p := range n.Pods() {
		errs = append(errs, p.NS.Close())
	}
	if n.h != nil {
		n.h.Close()
	}
	errs = append(errs, n.NS.Close())
	return errors.Join(errs...)
}

// Addr returns the pod's address of the given family ("tcp4"/"udp4" → IPv4).
func (p *Pod) Addr(v6 bool) netip.Addr {
	if v6 {
		return p.IPv6
	}
	return p.IPv4
}

// Listen opens a listener inside the pod. The caller serves it from any goroutine.
func (p *Pod) Listen(network, addr string) (net.Listener, error) {
	var l net.Listener
	err := p.NS.Do(func() (err error) {
		l, err = net.Listen(network, addr)
		return err
	})
	return l, err
}

// ListenPacket opens a packet socket inside the pod.
func (p *Pod) ListenPacket(network, addr string) (net.PacketConn, error) {
	var c net.PacketConn
	err := p.NS.Do(func() (err error) {
		c, err = net.ListenPacket(network, addr)
		return err
	})
	return c, err
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Masked().Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// Uplink4 returns the node's address on the fabric (invalid when the node
// is not on one).
func (n *Node) Uplink4() netip.Addr { return n.uplink4 }

// RemovePod deletes a pod's namespace (its veth goes with it). Processes
// still inside keep it alive until they exit: stop them first.
func (n *Node) RemovePod(p *Pod) error {
	n.mu.Lock()
	for i, q := range n.pods {
		if q == p {
			n.pods = append(n.pods[:i], n.pods[i+1:]...)
			break
		}
	}
	n.mu.Unlock()
	return p.NS.Close()
}

// RouteVia routes dst from pod p through its node's gateway. Only for
// prefixes the cluster owns: a pod never gets a route out of the machine.
func (n *Node) RouteVia(p *Pod, dst netip.Prefix) error {
	gw := n.gw4
	if dst.Addr().Is6() {
		gw = n.gw6
	}
	if !gw.IsValid() {
		return fmt.Errorf("node %s has no gateway address (not on a fabric)", n.Name)
	}
	ph, err := netlink.NewHandleAt(p.NS.h)
	if err != nil {
		return err
	}
	defer ph.Close()
	eth, err := ph.LinkByName("eth0")
	if err != nil {
		return err
	}
	return ph.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Dst: prefixNet(dst), Gw: gw.AsSlice()})
}
