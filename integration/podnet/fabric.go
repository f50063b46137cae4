package podnet

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Fabric is the physical network of a simulated cluster: a namespace of
// its own with a bridge that every node's uplink joins. Nodes route each
// other's pod prefixes over it. Nothing on it has a route anywhere else.
type Fabric struct {
	NS *Netns

	h                  *netlink.Handle
	bridge             netlink.Link
	cluster4, cluster6 netip.Prefix

	mu    sync.Mutex
	nodes []*Node
}

// Node uplink addresses on the fabric.
var (
	fabric4 = netip.MustParsePrefix("10.255.0.0/24")
	fabric6 = netip.MustParsePrefix("fd00:ff::/64")
)

// NewFabric creates the fabric for a cluster whose pods live in cluster4
// (split into /24s, one per node) and cluster6 (/64s); either may be zero.
func NewFabric(cluster4, cluster6 netip.Prefix) (*Fabric, error) {
	ns, err := NewNetns("fabric")
	if err != nil {
		return nil, err
	}
	f := &Fabric{NS: ns, cluster4: cluster4, cluster6: cluster6}
	if f.h, err = netlink.NewHandleAt(ns.h); err != nil {
		ns.Close()
		return nil, err
	}
	if f.bridge, err = addBridge(f.h, "br-fabric"); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// nth returns the idx-th subnet of bits length inside p.
func nth(p netip.Prefix, bits, idx int) netip.Prefix {
	if !p.IsValid() {
		return netip.Prefix{}
	}
	a := p.Masked().Addr().As16()
	start := 0
	if p.Addr().Is4() {
		start = 12
	}
	// Write idx into the bits between p.Bits() and bits.
	shift := (16-start)*8 - bits
	v := uint64(idx) << uint(shift%8)
	for i := 15 - shift/8; i >= start && v > 0; i-- {
		a[i] |= byte(v)
		v >>= 8
	}
	addr := netip.AddrFrom16(a)
	if p.Addr().Is4() {
		addr = addr.Unmap()
	}
	return netip.PrefixFrom(addr, bits)
}

func hostIn(p netip.Prefix, host int) netip.Addr {
	a := p.Masked().Addr()
	for i := 0; i < host; i++ {
		a = a.Next()
	}
	return a
}

// NodePrefixes returns the pod prefixes of node number idx (1-based).
func (f *Fabric) NodePrefixes(idx int) (netip.Prefix, netip.Prefix) {
	return nth(f.cluster4, 24, idx), nth(f.cluster6, 64, idx)
}

// AddNode creates node number idx (1..250): its namespace, its pod bridge
// with the gateway address, its uplink on the fabric, and routes between
// it and every node already there.
func (f *Fabric) AddNode(name string, idx int) (*Node, error) {
	p4, p6 := f.NodePrefixes(idx)
	n, err := NewNode(name, p4, p6)
	if err != nil {
		return nil, err
	}
	n.cluster4, n.cluster6 = f.cluster4, f.cluster6
	if err := f.attach(n, idx); err != nil {
		n.Close()
		return nil, fmt.Errorf("node %s: %w", name, err)
	}
	f.mu.Lock()
	f.nodes = append(f.nodes, n)
	f.mu.Unlock()
	return n, nil
}

func addAddr(h *netlink.Handle, l netlink.Link, a netip.Addr, bits int) error {
	ipn := &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, a.BitLen())}
	return h.AddrAdd(l, &netlink.Addr{IPNet: ipn, Flags: unix.IFA_F_NODAD})
}

func (f *Fabric) attach(n *Node, idx int) error {
	// Gateway addresses on the node's pod bridge.
	if n.v4.IsValid() {
		n.gw4 = hostIn(n.v4, 1)
		if err := addAddr(n.h, n.bridge, n.gw4, n.v4.Bits()); err != nil {
			return err
		}
	}
	if n.v6.IsValid() {
		n.gw6 = hostIn(n.v6, 1)
		if err := addAddr(n.h, n.bridge, n.gw6, n.v6.Bits()); err != nil {
			return err
		}
	}
	if err := n.NS.Do(func() error {
		for _, k := range []string{"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"} {
			if err := os.WriteFile(k, []byte("1"), 0); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return fmt.Errorf("enabling forwarding: %w", err)
	}
	// Uplink: fabric side on the fabric bridge, node side eth0 in the node.
	up := fmt.Sprintf("up-%s", n.Name)
	if len(up) > 15 {
		up = fmt.Sprintf("up-node%d", idx)
	}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: up, MasterIndex: f.bridge.Attrs().Index},
		PeerName: "eth0", PeerNamespace: netlink.NsFd(n.NS.Fd())}
	if err := f.h.LinkAdd(veth); err != nil {
		return fmt.Errorf("uplink: %w", err)
	}
	fl, err := f.h.LinkByName(up)
	if err != nil {
		return err
	}
	if err := f.h.LinkSetUp(fl); err != nil {
		return err
	}
	eth, err := n.h.LinkByName("eth0")
	if err != nil {
		return err
	}
	n.uplink4, n.uplink6 = hostIn(fabric4, idx), hostIn(fabric6, idx)
	if err := addAddr(n.h, eth, n.uplink4, fabric4.Bits()); err != nil {
		return err
	}
	if err := addAddr(n.h, eth, n.uplink6, fabric6.Bits()); err != nil {
		return err
	}
	if err := n.h.LinkSetUp(eth); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, o := range f.nodes {
		if err := routeTo(n, o); err != nil {
			return err
		}
		if err := routeTo(o, n); err != nil {
			return err
		}
	}
	return nil
}

// routeTo makes from route to's pod prefixes through to's uplink.
func routeTo(from, to *Node) error {
	eth, err := from.h.LinkByName("eth0")
	if err != nil {
		return err
	}
	for _, r := range []struct {
		dst netip.Prefix
		gw  netip.Addr
	}{{to.v4, to.uplink4}, {to.v6, to.uplink6}} {
		if !r.dst.IsValid() {
			continue
		}
		if err := from.h.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Dst: prefixNet(r.dst), Gw: r.gw.AsSlice()}); err != nil {
			return fmt.Errorf("%s: route to %v via %v: %w", from.Name, r.dst, r.gw, err)
		}
	}
	return nil
}

// Close removes every node and the fabric.
func (f *Fabric) Close() error {
	f.mu.Lock()
	nodes := f.nodes
	f.nodes = nil
	f.mu.Unlock()
	var errs []error
	for _, n := range nodes {
		errs = append(errs, n.Close())
	}
	if f.h != nil {
		f.h.Close()
	}
	errs = append(errs, f.NS.Close())
	return errors.Join(errs...)
}
