package sim_test

import (
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"kmesh.dev/kmesh/integration/istioapps"
	"kmesh.dev/kmesh/integration/sim"
)

// Kmesh daemons and Istio's own HBONE implementations, across two nodes,
// with certificates from Istio's CA:
//   - our client → Istio's HBONE server: an ambient client on node-1
//     reaches a pod on node-2 whose 15008 is served by istio.io/istio/pkg/hbone;
//   - Istio's HBONE client → our server: Istio's dialer, and Istio's echo
//     app forwarding over HBONE, reach an ambient pod on node-2 through the
//     node-2 daemon's 15008, from a pod outside the mesh on node-1.
func TestPrivilegedSimIstioHBONEInterop(t *testing.T) {
	c := startCluster(t)
	dir := t.TempDir()
	peerCert, err := c.CP.SignWorkloadCert("spiffe://cluster.local/ns/legacy/sa/peer", time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile, err := istioapps.WriteCert(dir, peerCert)
	if err != nil {
		t.Fatal(err)
	}
	// A pod outside the mesh that speaks HBONE itself (Istio's server),
	// announced as such to istiod by the annotation, with Istio's echo app.
	peer := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "peer", Namespace: "legacy", Labels: map[string]string{"app": "peer"},
			Annotations: map[string]string{"ambient.istio.io/redirection": "enabled"}},
		Spec: corev1.PodSpec{NodeName: "node-2", ServiceAccountName: "peer", Containers: []corev1.Container{
			{Name: "hbone", Command: []string{istioapps.Serve, "-cert", certFile, "-key", keyFile}},
			{Name: "echo", Command: []string{"echo", "-http", "8080", "-tcp", "9090"}},
		}},
	}
	create(t, c,
		echoPod("demo", "web-0", "node-2", map[string]string{"app": "web"}),
		clientPod("demo", "client", "node-1"),
		clientPod("legacy", "outsider", "node-1"),
		peer,
	)
	client, _ := c.Pod("demo", "client")
	outsider, _ := c.Pod("legacy", "outsider")
	web0, _ := c.Pod("demo", "web-0")
	peerPod, _ := c.Pod("legacy", "peer")
	peerIP, web0IP := peerPod.IPs()[0].String(), web0.IPs()[0].String()

	eventually(t, "our client through Istio's HBONE server", func() (bool, string) {
		return sameKeys(httpFrom(t, client, "http://"+peerIP+":8080/", 5), "peer")
	})
	// ... and it went through node-1's tunnel with mTLS, not around it.
	requireMetric(t, c.Nodes[0].Daemon, "istio_tcp_connections_opened_total", `reporter="source"`,
		`destination_workload="peer"`, `connection_security_policy="mutual_tls"`)

	var line string
	if err := outsider.Helper(&line, istioapps.Dial, "-proxy", web0IP+":15008", "-target", web0IP+":9090",
		"-send", "hello", "-cert", certFile, "-key", keyFile); err != nil || !strings.Contains(line, "Hostname=web-0") {
		t.Fatalf("Istio's HBONE dialer through our inbound: %q, %v", line, err)
	}

	var out []string
	if err := outsider.Helper(&out, istioapps.EchoHBONE, "-proxy", web0IP+":15008", "-url", "http://"+web0IP+":8080/",
		"-count", "3", "-cert", certFile, "-key", keyFile); err != nil {
		t.Fatalf("Istio's echo app forwarding over HBONE: %v", err)
	}
	if n := strings.Count(strings.Join(out, "\n"), "Hostname=web-0"); n != 3 {
		t.Fatalf("Istio's echo app over HBONE: %d of 3 answers from web-0:\n%s", n, strings.Join(out, "\n"))
	}
	// node-2's inbound saw Istio's client with its certificate's identity.
	requireMetric(t, c.Nodes[1].Daemon, "istio_tcp_connections_opened_total", `reporter="destination"`,
		`ns/legacy/sa/peer"`, `destination_workload="web-0"`, `connection_security_policy="mutual_tls"`)
}

// requireMetric fails unless a sample of the daemon's metric with all the
// given label fragments has a value above zero.
func requireMetric(t *testing.T, d *sim.Daemon, name string, fragments ...string) {
	t.Helper()
	text, err := d.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	var seen []string
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, name+"{") {
			continue
		}
		seen = append(seen, line)
		ok := !strings.HasSuffix(line, " 0")
		for _, f := range fragments {
			ok = ok && strings.Contains(line, f)
		}
		if ok {
			return
		}
	}
	t.Fatalf("no %s sample with %v above 0; samples:\n%s", name, fragments, strings.Join(seen, "\n"))
}
