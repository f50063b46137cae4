package podnet

import (
	"fmt"
	"net/netip"
	"os"
	"testing"

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
	if os.Geteuid() != 0 {
		if os.Getenv("KMESH_REQUIRE_PRIVILEGED") != "" {
			t.Fatal("needs root")
		}
		t.Skip("needs root")
	}
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
	if os.Geteuid() != 0 {
		if os.Getenv("KMESH_REQUIRE_PRIVILEGED") != "" {
			t.Fatal("needs root")
		}
		t.Skip("needs root")
	}
	f, err := NewFabric(netip.MustParsePrefix("10.244.0.0/16"), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, err := f.AddNode("n1", 1)
	if err != nil {
		t.Fatal(err)
	}
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
