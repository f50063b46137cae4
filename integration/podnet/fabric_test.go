package podnet

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

func TestMain(m *testing.M) {
	MaybeRunHelper()
	os.Exit(m.Run())
}

func TestNth(t *testing.T) {
	for _, tc := range []struct {
		p    string
		bits int
		idx  int
		want string
	}{
		{"10.244.0.0/16", 24, 3, "10.244.3.0/24"},
		{"10.244.0.0/16", 24, 255, "10.244.255.0/24"},
		{"fd00:10:244::/48", 64, 3, "fd00:10:244:3::/64"},
		{"fd00:10:244::/48", 64, 300, "fd00:10:244:12c::/64"},
	} {
		if got := nth(netip.MustParsePrefix(tc.p), tc.bits, tc.idx); got.String() != tc.want {
			t.Errorf("nth(%s, %d, %d) = %s, want %s", tc.p, tc.bits, tc.idx, got, tc.want)
		}
	}
}

// Pods on two nodes reach each other across the fabric, in both families;
// nothing outside the cluster's prefixes has a route.
func TestPrivilegedFabric(t *testing.T) {
	needRoot(t)
	f, err := NewFabric(netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:10:244::/48"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var pods []*Pod
	for i, name := range []string{"n1", "n2"} {
		n, err := f.AddNode(name, i+1)
		if err != nil {
			t.Fatal(err)
		}
		p4, p6 := f.NodePrefixes(i + 1)
		p, err := n.AddPod("p-"+name, hostIn(p4, 10), hostIn(p6, 10))
		if err != nil {
			t.Fatal(err)
		}
		pods = append(pods, p)
	}
	l, err := pods[1].Listen("tcp", ":8080")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go ServeTCPName(l, "server")
	cg, err := NewCgroup("", "kmesh-fabric-test-"+RandomSuffix())
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Remove()
	for _, addr := range []string{"10.244.2.10:8080", "[fd00:10:244:2::a]:8080"} {
		var res ClientResult
		if err := pods[0].Helper(cg, &res, "tcp", "-addr", addr, "-n", "3"); err != nil {
			t.Fatal(err)
		}
		if res.Names["server"] != 3 {
			t.Fatalf("%s across nodes: %+v", addr, res)
		}
	}
	var res ClientResult
	if err := pods[0].Helper(cg, &res, "tcp", "-addr", "10.96.0.1:80", "-n", "1"); err != nil {
		t.Fatal(err)
	}
	if res.Errors["ENETUNREACH"] != 1 {
		t.Fatalf("a VIP must be unroutable from a pod: %+v", res)
	}
}

// A node's pod bridge and the fabric keep their addresses while pods and
// nodes come and go: the pods' ARP entries for their gateway stay right.
// (A bridge takes its lowest port's address unless given one: it changed
// with the first pod, and again whenever the pod holding it left, which
// left the node's other pods unable to reach other nodes.)
func TestPrivilegedBridgeKeepsItsAddress(t *testing.T) {
	f, nodes := ipv4Fabric(t, "n1")
	n := nodes[0]
	addrOf := func(h *netlink.Handle, name string) string {
		t.Helper()
		l, err := h.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		return l.Attrs().HardwareAddr.String()
	}
	node, fabric := addrOf(n.h, "br0"), addrOf(f.h, "br-fabric")
	check := func(step string) {
		t.Helper()
		if got := addrOf(n.h, "br0"); got != node {
			t.Fatalf("after %s the node's bridge is %s, was %s", step, got, node)
		}
		if got := addrOf(f.h, "br-fabric"); got != fabric {
			t.Fatalf("after %s the fabric's bridge is %s, was %s", step, got, fabric)
		}
	}
	p4, _ := f.NodePrefixes(1)
	var pods []*Pod
	for i := range 8 {
		p, err := n.AddPod(fmt.Sprintf("p%d", i), hostIn(p4, 10+i), netip.Addr{})
		if err != nil {
			t.Fatal(err)
		}
		pods = append(pods, p)
		check(fmt.Sprintf("adding pod %d", i))
	}
	for i, p := range pods[:4] {
		if err := n.RemovePod(p); err != nil {
			t.Fatal(err)
		}
		check(fmt.Sprintf("removing pod %d", i))
	}
	if _, err := f.AddNode("n2", 2); err != nil {
		t.Fatal(err)
	}
	check("adding a node")
}

// The traffic that stalled: a pod's connections to another node, right
// after the pod whose veth had the lowest address left its node. Before
// bridges had an address of their own, br0 had taken that pod's, and the
// other pods' gateway entry pointed at nobody: every connection timed out.
func TestPrivilegedOffNodeTrafficSurvivesAPodLeaving(t *testing.T) {
	_, nodes := ipv4Fabric(t, "n1", "n2")
	n1, n2 := nodes[0], nodes[1]
	client, err := n1.AddPod("client", netip.MustParseAddr("10.244.1.10"), netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	server, err := n2.AddPod("server", netip.MustParseAddr("10.244.2.10"), netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	l, err := server.Listen("tcp", "10.244.2.10:8080")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go ServeTCPName(l, "server")
	// A pod whose veth has the lowest address a veth can have.
	ports := func() map[string]bool {
		links, err := n1.h.LinkList()
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]bool{}
		for _, l := range links {
			if l.Attrs().MasterIndex == n1.bridge.Attrs().Index {
				out[l.Attrs().Name] = true
			}
		}
		return out
	}
	before := ports()
	low, err := n1.AddPod("low", netip.MustParseAddr("10.244.1.11"), netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	var lowVeth string
	for name := range ports() {
		if !before[name] {
			lowVeth = name
			veth, err := n1.h.LinkByName(name)
			if err == nil {
				err = n1.h.LinkSetHardwareAddr(veth, net.HardwareAddr{0x02, 0, 0, 0, 0, 1})
			}
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	cg, err := NewCgroup("", "kmesh-fabric-test-"+RandomSuffix())
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Remove()
	connect := func(when string) {
		t.Helper()
		var res ClientResult
		if err := client.Helper(cg, &res, "tcp", "-addr", "10.244.2.10:8080", "-n", "3", "-timeout", "1s"); err != nil {
			t.Fatal(err)
		}
		if res.Names["server"] != 3 {
			t.Fatalf("%s: connections to the other node: %+v", when, res)
		}
	}
	connect("before the pod left") // the client's gateway entry is now resolved
	if err := n1.RemovePod(low); err != nil {
		t.Fatal(err)
	}
	// The veth goes with the pod's namespace, which the kernel tears down
	// in the background.
	for deadline := time.Now().Add(10 * time.Second); ports()[lowVeth]; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s still on the bridge 10 s after its pod left", lowVeth)
		}
	}
	connect("right after the pod left")
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("KMESH_REQUIRE_PRIVILEGED") != "" {
			t.Fatal("needs root")
		}
		t.Skip("needs root")
	}
}

// ipv4Fabric is a fabric of IPv4 nodes named names (numbered from 1),
// removed when the test ends.
func ipv4Fabric(t *testing.T, names ...string) (*Fabric, []*Node) {
	t.Helper()
	needRoot(t)
	f, err := NewFabric(netip.MustParsePrefix("10.244.0.0/16"), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	var nodes []*Node
	for i, name := range names {
		n, err := f.AddNode(name, i+1)
		if err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, n)
	}
	return f, nodes
}
