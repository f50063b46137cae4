package path

import (
	"testing"

	"kmesh.dev/kmesh/bpf"
)

func TestForWorkload(t *testing.T) {
	const (
		refuse   = bpf.PathRefuse
		direct   = bpf.PathDirect
		plain    = bpf.PathPlain
		tunnel   = bpf.PathTunnel
		waypoint = bpf.PathWaypoint
		authz    = bpf.PathAuthz
	)
	here := Node{Name: "n1", Network: "net1"}
	for _, tc := range []struct {
		name string
		src  Node
		dst  Workload
		want Verdicts
	}{
		{"mesh workload on this node", here, Workload{HBONE: true, Node: "n1"}, Verdicts{direct, direct, direct, direct}},
		{"mesh workload on this node with policies: inbound plaintext to the proxy", here, Workload{HBONE: true, Node: "n1", Policies: true}, Verdicts{tunnel, tunnel, direct, tunnel}},
		{"policies the kernel evaluates: authz in the kernel, inbound plaintext still to the proxy", here,
			Workload{HBONE: true, Node: "n1", Policies: true, KernelAuthz: true}, Verdicts{authz, authz, direct, tunnel}},
		{"kernel authz on another node changes nothing", here, Workload{HBONE: true, Node: "n2", Policies: true, KernelAuthz: true}, Verdicts{tunnel, tunnel, plain, direct}},
		{"kernel authz without policies: direct", here, Workload{HBONE: true, Node: "n1", KernelAuthz: true}, Verdicts{direct, direct, direct, direct}},
		{"kernel authz, own waypoint: addressed traffic to the waypoint", here,
			Workload{HBONE: true, Node: "n1", Policies: true, KernelAuthz: true, Waypoint: true}, Verdicts{authz, waypoint, direct, tunnel}},
		{"mesh workload on another node", here, Workload{HBONE: true, Node: "n2"}, Verdicts{tunnel, tunnel, plain, direct}},
		{"policies on another node change nothing", here, Workload{HBONE: true, Node: "n2", Policies: true}, Verdicts{tunnel, tunnel, plain, direct}},
		{"this node's name unknown: no workload is local", Node{}, Workload{HBONE: true, Node: ""}, Verdicts{tunnel, tunnel, plain, direct}},
		{"outside the mesh, this node", here, Workload{Node: "n1"}, Verdicts{plain, plain, plain, direct}},
		{"outside the mesh, another node", here, Workload{Node: "n2"}, Verdicts{plain, plain, plain, direct}},
		{"own waypoint: addressed traffic goes there, service traffic does not", here,
			Workload{HBONE: true, Node: "n2", Waypoint: true}, Verdicts{tunnel, waypoint, plain, direct}},
		{"own waypoint on this node", here, Workload{HBONE: true, Node: "n1", Waypoint: true}, Verdicts{direct, waypoint, direct, direct}},
		{"own waypoint, outside the mesh (a ServiceEntry workload)", here, Workload{Node: "", Waypoint: true}, Verdicts{plain, waypoint, plain, direct}},
		{"another network: refused, never plaintext", here, Workload{HBONE: true, Node: "n9", Network: "net2"}, Verdicts{refuse, refuse, refuse, direct}},
		{"another network, own waypoint", here, Workload{Network: "net2", Waypoint: true}, Verdicts{refuse, refuse, refuse, direct}},
		{"workload's network unset matches", here, Workload{HBONE: true, Node: "n1"}, Verdicts{direct, direct, direct, direct}},
		{"node's network unset matches", Node{Name: "n1"}, Workload{HBONE: true, Node: "n1", Network: "net2"}, Verdicts{direct, direct, direct, direct}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := ForWorkload(tc.src, tc.dst); got != tc.want {
				t.Errorf("ForWorkload(%+v, %+v) = %+v, want %+v", tc.src, tc.dst, got, tc.want)
			}
		})
	}
}

func TestForService(t *testing.T) {
	for _, tc := range []struct {
		s     Service
		proto bpf.Proto
		want  bpf.Path
	}{
		{Service{}, bpf.TCP, bpf.PathBalance},
		{Service{}, bpf.UDP, bpf.PathBalance},
		{Service{Waypoint: true}, bpf.TCP, bpf.PathWaypoint},
		{Service{Waypoint: true}, bpf.UDP, bpf.PathBalance},
		{Service{Passthrough: true}, bpf.TCP, bpf.PathPassthrough},
		{Service{Passthrough: true, Waypoint: true}, bpf.TCP, bpf.PathPassthrough},
		{Service{Passthrough: true}, bpf.UDP, bpf.PathPassthrough},
	} {
		if got := ForService(tc.s, tc.proto); got != tc.want {
			t.Errorf("ForService(%+v, %s) = %s, want %s", tc.s, tc.proto, got, tc.want)
		}
	}
}

// Every verdict a record can carry is one the kernel acts on: a workload's
// verdicts are final (never BALANCE or PASSTHROUGH), UDP never goes to the
// node proxy.
func TestVerdictsAreFinal(t *testing.T) {
	for _, hbone := range []bool{false, true} {
		for _, node := range []string{"", "n1", "n2"} {
			for _, netw := range []string{"", "net1", "net2"} {
				for _, wp := range []bool{false, true} {
					for _, pol := range []bool{false, true} {
						dst := Workload{HBONE: hbone, Node: node, Network: netw, Waypoint: wp, Policies: pol}
						v := ForWorkload(Node{Name: "n1", Network: "net1"}, dst)
						for _, p := range []bpf.Path{v.Service, v.Addr, v.UDP} {
							if p == bpf.PathBalance || p == bpf.PathPassthrough {
								t.Errorf("%+v: verdict %s is not final", dst, p)
							}
						}
						if v.UDP.ViaProxy() {
							t.Errorf("%+v: UDP verdict %s goes to the node proxy", dst, v.UDP)
						}
						if v.Inbound != bpf.PathDirect && v.Inbound != bpf.PathTunnel {
							t.Errorf("%+v: inbound verdict %s is neither direct nor tunnel", dst, v.Inbound)
						}
					}
				}
			}
		}
	}
}
