package sim_test

import (
	"testing"

	"kmesh.dev/kmesh/integration/sim"
)

// A dual-stack service, as Kubernetes writes one (clusterIPs of both
// families), reached over IPv6: the IPv6 VIP is load-balanced in the
// kernel to a same-node backend and, over HBONE on IPv6, to a backend on
// the other node; the pods' own IPv6 addresses work too. The IPv4 VIP of
// the same service keeps working beside it.
func TestPrivilegedSimDualStack(t *testing.T) {
	c := startClusterWith(t, sim.Options{Nodes: 2, IPv6: true, Objects: objects + dualStackService})
	create(t, c,
		echoPod("demo", "web-0", "node-1", map[string]string{"app": "web"}),
		echoPod("demo", "web-1", "node-2", map[string]string{"app": "web"}),
		clientPod("demo", "client", "node-1"),
		clientPod("legacy", "outsider", "node-1"),
	)
	client, _ := c.Pod("demo", "client")
	outsider, _ := c.Pod("legacy", "outsider")
	web1, _ := c.Pod("demo", "web-1")
	ips := web1.IPs()
	if len(ips) != 2 || !ips[1].Is6() {
		t.Fatalf("web-1 is not dual-stack: %v", ips)
	}

	eventually(t, "both backends through the IPv6 VIP", func() (bool, string) {
		return sameKeys(httpFrom(t, client, "http://[fd00:96::20]/", 40), "web-0", "web-1")
	})
	eventually(t, "both backends through the IPv4 VIP", func() (bool, string) {
		return sameKeys(httpFrom(t, client, "http://10.96.0.20/", 40), "web-0", "web-1")
	})
	eventually(t, "the other node's pod by its IPv6 address", func() (bool, string) {
		return sameKeys(httpFrom(t, client, "http://["+ips[1].String()+"]:8080/", 5), "web-1")
	})
	// Cross-node IPv6 went through node-1's tunnel with mTLS, and node-2's
	// inbound saw the client's identity.
	requireMetric(t, c.Nodes[0].Daemon, "istio_tcp_connections_opened_total", `reporter="source"`,
		`destination_workload="web-1"`, `connection_security_policy="mutual_tls"`)
	requireMetric(t, c.Nodes[1].Daemon, "istio_tcp_connections_opened_total", `reporter="destination"`,
		`ns/demo/sa/default"`, `destination_workload="web-1"`, `connection_security_policy="mutual_tls"`)
	// Outside the mesh the IPv6 VIP is not load-balanced: nothing answers.
	if res := httpFrom(t, outsider, "http://[fd00:96::20]/", 3); res.Errors.Total() != 3 {
		t.Fatalf("a pod outside the mesh reached the IPv6 VIP: %+v", res)
	}
}

const dualStackService = `
---
apiVersion: v1
kind: Service
metadata: {name: web6, namespace: demo}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, "fd00:96::20"]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
`
