package cluster_test

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	securityapi "istio.io/api/security/v1"
	typeapi "istio.io/api/type/v1beta1"
	securityclient "istio.io/client-go/pkg/apis/security/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"kmesh.dev/kmesh/integration/cluster"
	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/integration/sim"
)

// load sends requests from a pod, each on a new connection, until stopped,
// and tallies answers and failures.
type load struct {
	stop chan struct{}
	once sync.Once
	wg   sync.WaitGroup
	mu   sync.Mutex
	ok   map[string]int
	errs map[string]int
	// start and failed: when the load began, and when each helper run
	// that saw a failure ran (offsets from start), so that a failure can
	// be matched against the daemons' logs.
	start  time.Time
	failed []string
}

func startLoad(t *testing.T, from *meshPod, urls map[string]string) *load {
	l := &load{stop: make(chan struct{}), ok: map[string]int{}, errs: map[string]int{}, start: time.Now()}
	// Stopped however the test ends (a Fatal in a helper too), so that
	// no load runs into the next test.
	t.Cleanup(func() { l.end() })
	for path, url := range urls {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				var res podnet.ClientResult
				began := time.Since(l.start)
				err := from.Helper(&res, "http", "-url", url, "-n", "20", "-timeout", "3s")
				ran := fmt.Sprintf("%s: run from +%s to +%s", path, began.Round(time.Millisecond), time.Since(l.start).Round(time.Millisecond))
				l.mu.Lock()
				if err != nil {
					l.errs[path+": helper: "+err.Error()]++
					l.failed = append(l.failed, fmt.Sprintf("%s: helper: %v", ran, err))
				} else {
					l.ok[path] += res.Names.Total()
					for k, v := range res.Errors {
						l.errs[path+": "+k] += v
					}
					if len(res.Errors) > 0 {
						l.failed = append(l.failed, fmt.Sprintf("%s: %d answered, failed: %v", ran, res.Names.Total(), res.Errors))
					}
				}
				l.mu.Unlock()
			}
		}()
	}
	return l
}

// explain logs what a failed load needs looking into: when the failing
// runs ran, and the lines every node's kmesh-daemon logged since the load
// began (the run directory is gone once the test binary ends).
func (l *load) explain(t *testing.T, c *sim.Cluster) {
	t.Helper()
	l.mu.Lock()
	failed := append([]string(nil), l.failed...)
	l.mu.Unlock()
	t.Logf("load began at %s", l.start.UTC().Format(time.RFC3339Nano))
	for _, f := range failed {
		t.Logf("  %s", f)
	}
	// The simulator's kubelet writes <node>/<pod>_<container>.log, the
	// external one <node>/logs/<namespace>_<pod>_<container>.log.
	var logs []string
	_ = filepath.WalkDir(c.RunDir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasPrefix(d.Name(), cluster.IstioNamespace+"_ztunnel-") && strings.HasSuffix(d.Name(), ".log") {
			logs = append(logs, path)
		}
		return nil
	})
	if len(logs) == 0 {
		t.Logf("no ztunnel pod logs under %s", c.RunDir)
	}
	for _, f := range logs {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Logf("%s: %v", f, err)
			continue
		}
		var since []string
		for _, line := range strings.Split(string(b), "\n") {
			// The daemon's own log (time=...), and access log lines
			// (time, tab, level) other than info: the connections that
			// failed.
			var ts string
			if rest, ok := strings.CutPrefix(line, "time="); ok {
				ts, _, _ = strings.Cut(rest, " ")
			} else if fields := strings.SplitN(line, "\t", 3); len(fields) == 3 && fields[1] != "info" {
				ts = fields[0]
			}
			if at, err := time.Parse(time.RFC3339Nano, ts); err == nil && !at.Before(l.start) {
				since = append(since, line)
			}
		}
		if len(since) > 200 {
			since = since[len(since)-200:]
		}
		t.Logf("%s since the load began (%d lines shown):\n%s", f, len(since), strings.Join(since, "\n"))
	}
}

// end stops the load (once; later calls only wait) and returns its counts.
func (l *load) end() (map[string]int, map[string]int) {
	l.once.Do(func() { close(l.stop) })
	l.wg.Wait()
	return l.ok, l.errs
}

// kernelAndTunnel is the load of the lifecycle tests: the client on
// node-1 calls web-1 on its own node (kernel path) and web-2 on node-2
// (HBONE through both nodes' daemons), by pod IP so each path is known.
func kernelAndTunnel(t *testing.T, c *sim.Cluster) (*meshPod, map[string]string) {
	client := pod(t, c, "shop", "client")
	web1, web2 := pod(t, c, "shop", "web-1"), pod(t, c, "shop", "web-2")
	urls := map[string]string{
		"kernel path (same node)": "http://" + web1.ip + ":8080/",
		"tunnel path (HBONE)":     "http://" + web2.ip + ":8080/",
	}
	for path, url := range urls {
		eventually(t, path, func() (bool, string) {
			return only(httpFrom(t, client, url, 5), map[bool]string{true: "web-1", false: "web-2"}[path[0] == 'k'])
		})
	}
	return client, urls
}

// TestPrivilegedClusterRollout: a change to the ztunnel DaemonSet's pod
// template (the log level, as `--set values.ztunnel.logLevel=warn` would)
// rolls the kmesh-daemon out node by node with maxSurge 1: the new daemon
// starts beside the old one, takes the data path and the pods' listeners
// over, the old one drains. Requests on new connections, on the kernel
// path and on the tunnel path, see no failure throughout.
func TestPrivilegedClusterRollout(t *testing.T) {
	c, _ := theShop(t)
	client, urls := kernelAndTunnel(t, c)
	kube := shared.cp.Kube
	ctx := context.Background()
	old := map[string]bool{}
	for _, p := range podsOf(t, "ztunnel-") {
		old[p.Name] = true
	}
	l := startLoad(t, client, urls)
	time.Sleep(2 * time.Second) // load before the rollout
	start := time.Now()
	// With the restartedAt annotation `kubectl rollout restart` sets, so
	// that each run (go test -count) rolls a new generation out.
	patch := fmt.Sprintf(`{"spec":{"template":{"metadata":{"annotations":{"kubectl.kubernetes.io/restartedAt":%q}},`+
		`"spec":{"containers":[{"name":"istio-proxy","env":[{"name":"RUST_LOG","value":"warn"}]}]}}}}`, time.Now().Format(time.RFC3339Nano))
	ds, err := kube.AppsV1().DaemonSets(cluster.IstioNamespace).Patch(ctx, "ztunnel", types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{})
	if err != nil {
		t.Fatal(err)
	}
	gen := ds.Generation
	var last string
	for {
		ds, err := kube.AppsV1().DaemonSets(cluster.IstioNamespace).Get(ctx, "ztunnel", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		st := ds.Status
		pods := podsOf(t, "ztunnel-")
		stale := 0
		for _, p := range pods {
			if old[p.Name] {
				stale++
			}
		}
		last = fmt.Sprintf("generation %d/%d, desired %d, updated %d, available %d, unavailable %d, pods %d (%d old)",
			st.ObservedGeneration, gen, st.DesiredNumberScheduled, st.UpdatedNumberScheduled, st.NumberAvailable, st.NumberUnavailable, len(pods), stale)
		if st.ObservedGeneration >= gen && st.UpdatedNumberScheduled == st.DesiredNumberScheduled && st.NumberAvailable == st.DesiredNumberScheduled &&
			st.NumberUnavailable == 0 && stale == 0 && len(pods) == len(c.Nodes) {
			break
		}
		if time.Since(start) > 3*time.Minute {
			dumpPods(t)
			t.Fatalf("the rollout did not finish in 3 minutes: %s", last)
		}
		time.Sleep(200 * time.Millisecond)
	}
	took := time.Since(start)
	time.Sleep(2 * time.Second) // load after it
	ok, errs := l.end()
	t.Logf("rollout of %d nodes in %s (%s); requests answered: %v", len(c.Nodes), took.Round(time.Millisecond), last, ok)
	if len(errs) > 0 {
		t.Errorf("failed requests during the rollout: %v", errs)
		l.explain(t, c)
	}
	for path := range urls {
		if ok[path] == 0 {
			t.Errorf("no request answered on the %s", path)
		}
	}
	// The new daemons serve: still both paths, and a fresh pod's traffic.
	kernelAndTunnel(t, c)
}

// TestPrivilegedClusterIstiodRestart: deleting istiod's pod (its
// Deployment replaces it, with a new pod IP behind the same Service)
// disturbs no request on either path, and the daemons reconnect: a policy
// written after the restart is enforced.
func TestPrivilegedClusterIstiodRestart(t *testing.T) {
	c, vip := theShop(t)
	client, urls := kernelAndTunnel(t, c)
	intruder := pod(t, c, "shop", "intruder")
	kube := shared.cp.Kube
	ctx := context.Background()
	olds := podsOf(t, "istiod-")
	if len(olds) != 1 {
		t.Fatalf("%d istiod pods, want 1", len(olds))
	}
	l := startLoad(t, client, urls)
	time.Sleep(time.Second)
	start := time.Now()
	if err := kube.CoreV1().Pods(cluster.IstioNamespace).Delete(ctx, olds[0].Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	for {
		ps := podsOf(t, "istiod-")
		if len(ps) == 1 && ps[0].Name != olds[0].Name && ready(ps[0]) {
			t.Logf("istiod %s replaced by %s (%s) in %s", olds[0].Name, ps[0].Name, ps[0].Status.PodIP, time.Since(start).Round(time.Millisecond))
			break
		}
		if time.Since(start) > 2*time.Minute {
			dumpPods(t)
			t.Fatal("istiod was not replaced within 2 minutes")
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(2 * time.Second)
	ok, errs := l.end()
	t.Logf("requests answered across the istiod restart: %v", ok)
	if len(errs) > 0 {
		t.Errorf("failed requests across the istiod restart: %v", errs)
		l.explain(t, c)
	}
	// Reconnected: a DENY for the intruder, written now, is enforced on
	// both backends, and lifted again.
	aps := mesh.istio.SecurityV1().AuthorizationPolicies("shop")
	if _, err := aps.Create(ctx, &securityclient.AuthorizationPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "after-restart", Namespace: "shop"},
		Spec: securityapi.AuthorizationPolicy{
			Selector: &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "web"}},
			Action:   securityapi.AuthorizationPolicy_DENY,
			Rules: []*securityapi.Rule{{From: []*securityapi.Rule_From{{Source: &securityapi.Source{
				Principals: []string{"cluster.local/ns/shop/sa/intruder"}}}}}},
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = aps.Delete(context.Background(), "after-restart", metav1.DeleteOptions{}) })
	eventually(t, "the new istiod's policy enforced", func() (bool, string) {
		return refused(httpFrom(t, intruder, "http://"+vip+"/", 10), 10)
	})
	if err := aps.Delete(ctx, "after-restart", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the policy lifted", func() (bool, string) {
		return only(httpFrom(t, intruder, "http://"+vip+"/", 20), "web-1", "web-2")
	})
}
