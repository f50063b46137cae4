package sim_test

import (
	"encoding/json"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"kmesh.dev/kmesh/integration/cluster/bins"
	"kmesh.dev/kmesh/integration/sim"
)

// istioctlEnv names an istioctl binary to use instead of the cached one.
const istioctlEnv = "KMESH_ISTIOCTL"

// istioctl returns the real istioctl at the Istio version Kmesh pins, from
// the cluster tier's build cache (integration/cluster/bins: built from
// Kmesh's own module, so it shares the compiled Istio packages; make test
// runs make cluster-bins first, so a cold build never counts against this
// package's timeout).
func istioctl(t *testing.T) string {
	t.Helper()
	if p := os.Getenv(istioctlEnv); p != "" {
		return p
	}
	b, err := bins.New()
	if err != nil {
		t.Fatal(err)
	}
	p, err := b.Path(bins.Istioctl)
	if err != nil {
		t.Fatalf("istioctl (make cluster-bins builds it; %s names another): %v", istioctlEnv, err)
	}
	return p
}

// runIstioctl runs `istioctl ztunnel-config ARGS --file dump`, with a
// kubeconfig naming a cluster nobody serves: istioctl builds a client
// before it looks at --file, and must not find a real one.
func runIstioctl(t *testing.T, bin, dump string, args ...string) string {
	t.Helper()
	dir := filepath.Dir(dump)
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if _, err := os.Stat(kubeconfig); err != nil {
		const kc = `apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:1"}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
users: [{name: none, user: {}}]
current-context: none
`
		if err := os.WriteFile(kubeconfig, []byte(kc), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	argv := append([]string{"ztunnel-config"}, args...)
	argv = append(argv, "--file", dump, "--kubeconfig", kubeconfig)
	cmd := exec.Command(bin, argv...)
	cmd.Env = append(os.Environ(), "HOME="+dir)
	out, err := cmd.CombinedOutput()
	t.Logf("istioctl %s:\n%s", strings.Join(args, " "), out)
	if err != nil {
		t.Fatalf("istioctl %s: %v\n%s", strings.Join(argv, " "), err, out)
	}
	return string(out)
}

func adminGet(t *testing.T, d *sim.Daemon, path string) []byte {
	t.Helper()
	resp, err := http.Get("http://" + d.AdminAddr + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %v\n%s", path, resp.StatusCode, err, b)
	}
	return b
}

// tableRow finds the row of an istioctl table whose fields start with
// the given ones.
func tableRow(table string, prefix ...string) []string {
	for _, l := range strings.Split(table, "\n") {
		f := strings.Fields(l)
		if len(f) >= len(prefix) && strings.Join(f[:len(prefix)], " ") == strings.Join(prefix, " ") {
			return f
		}
	}
	return nil
}

// The real istioctl reads a real daemon's /config_dump: what
// `istioctl ztunnel-config` shows for a Kmesh node (it port-forwards to
// 15000 and reads the same document; --file skips the port-forward).
func TestPrivilegedSimIstioctlZtunnelConfig(t *testing.T) {
	bin := istioctl(t) // before the cluster: a cold build takes minutes
	c := startCluster(t)
	create(t, c,
		echoPod("demo", "web-0", "node-1", map[string]string{"app": "web"}),
		echoPod("demo", "web-1", "node-2", map[string]string{"app": "web"}),
		clientPod("demo", "client", "node-1"),
		clientPod("legacy", "outsider", "node-1"),
	)
	client, _ := c.Pod("demo", "client")
	// Traffic across nodes: node-1 then holds web's certificate (HBONE).
	eventually(t, "traffic to both backends", func() (bool, string) {
		return sameKeys(httpFrom(t, client, "http://10.96.0.10/", 40), "web-0", "web-1")
	})

	// Two connections held open while the dump is taken: one on the
	// kernel path (web-0, same node), one through the tunnel (web-1).
	web0, _ := c.Pod("demo", "web-0")
	web1, _ := c.Pod("demo", "web-1")
	heldKernel := stream(t, client, netip.AddrPortFrom(web0.Net.IPv4, 9090).String(), 20*time.Second)
	heldTunnel := stream(t, client, netip.AddrPortFrom(web1.Net.IPv4, 9090).String(), 20*time.Second)
	defer func() { <-heldKernel; <-heldTunnel }()

	n1 := c.Nodes[0]
	dump := filepath.Join(t.TempDir(), "config_dump.json")
	var raw []byte
	eventually(t, "node-1's certificates available and both held connections listed", func() (bool, string) {
		raw = adminGet(t, n1.Daemon, "/config_dump")
		s := string(raw)
		return strings.Contains(s, `"state": "Available"`) && strings.Contains(s, `"protocol": "HBONE"`) &&
			strings.Contains(s, `"protocol": "TCP"`), s
	})
	if err := os.WriteFile(dump, raw, 0o644); err != nil {
		t.Fatal(err)
	}

	out := runIstioctl(t, bin, dump, "workloads")
	for _, want := range [][]string{
		{"demo", "web-0", "", "node-1", "None", "HBONE"},
		{"demo", "web-1", "", "node-2", "None", "HBONE"},
		{"demo", "client", "", "node-1", "None", "HBONE"},
		{"legacy", "outsider", "", "node-1", "None", "TCP"},
	} {
		row := tableRow(out, want[0], want[1])
		pod, _ := c.Pod(want[0], want[1])
		addr := pod.Net.IPv4.String()
		if pod.Net.IPv6.IsValid() {
			addr += "," + pod.Net.IPv6.String()
		}
		if len(row) != 6 || row[2] != addr || row[3] != want[3] || row[4] != want[4] || row[5] != want[5] {
			t.Errorf("istioctl ztunnel-config workloads shows %s/%s as %q; want %s %s %s %s\n%s", want[0], want[1], row, addr, want[3], want[4], want[5], out)
		}
	}

	out = runIstioctl(t, bin, dump, "services")
	if row := tableRow(out, "demo", "web"); len(row) != 5 || row[2] != "10.96.0.10" || row[4] != "2/2" {
		t.Errorf("istioctl ztunnel-config services shows demo/web as %q; want VIP 10.96.0.10 and 2/2 healthy endpoints\n%s", row, out)
	}

	out = runIstioctl(t, bin, dump, "certificates")
	leaf := tableRow(out, "spiffe://cluster.local/ns/demo/sa/web", "Leaf")
	root := tableRow(out, "spiffe://cluster.local/ns/demo/sa/web", "Root")
	if len(leaf) < 4 || leaf[2] != "Available" || leaf[3] != "true" || len(root) < 4 || root[3] != "true" {
		t.Errorf("istioctl ztunnel-config certificates: leaf %q, root %q; want both valid, Available\n%s", leaf, root, out)
	}

	// istioctl names addresses by workload: the client's two outbound
	// connections (kernel path to web-0, HBONE to web-1) and web-0's
	// inbound one, which only the kernel saw.
	out = runIstioctl(t, bin, dump, "connections")
	if !strings.HasPrefix(strings.TrimSpace(out), "WORKLOAD") {
		t.Errorf("istioctl ztunnel-config connections:\n%s", out)
	}
	for _, want := range [][]string{
		{"client.demo", "Outbound", "web-0.demo", "TCP"},
		{"client.demo", "Outbound", "web-1.demo", "HBONE"},
		{"web-0.demo", "Inbound", "client.demo", "TCP"},
	} {
		found := false
		for _, line := range strings.Split(out, "\n") {
			f := strings.Fields(line)
			if len(f) >= 6 && f[0] == want[0] && f[1] == want[1] && slices.ContainsFunc(f[2:], func(v string) bool { return strings.HasPrefix(v, want[2]+":") }) && f[len(f)-1] == want[3] {
				found = true
			}
		}
		if !found {
			t.Errorf("istioctl ztunnel-config connections has no row %q:\n%s", want, out)
		}
	}

	// `all -o json`, as Istio's TestZtunnelConfig checks ztunnel: every
	// section present and, for a node with pods, not empty.
	var all map[string]json.RawMessage
	out = runIstioctl(t, bin, dump, "all", "-o", "json")
	if err := json.Unmarshal([]byte(out), &all); err != nil {
		t.Fatalf("istioctl ztunnel-config all -o json: %v\n%s", err, out)
	}
	for _, k := range []string{"workloads", "services", "certificates", "workloadState"} {
		if v := strings.TrimSpace(string(all[k])); v == "" || v == "[]" || v == "{}" || v == "null" {
			t.Errorf("all -o json: %s is %q", k, v)
		}
	}
	// workloadState names node-1's enrolled pods, Up; not node-2's.
	var ws map[string]struct {
		State string `json:"state"`
		Info  struct{ Name, Namespace string }
	}
	_ = json.Unmarshal(all["workloadState"], &ws)
	up := map[string]string{}
	for _, s := range ws {
		up[s.Info.Namespace+"/"+s.Info.Name] = s.State
	}
	if up["demo/web-0"] != "Up" || up["demo/client"] != "Up" || up["demo/web-1"] != "" || up["legacy/outsider"] != "" {
		t.Errorf("workloadState of node-1: %v; want web-0 and client Up, nothing else", up)
	}
}
