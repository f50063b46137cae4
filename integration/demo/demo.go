// Package demo shows Kmesh doing its job on one machine: a simulated
// two-node cluster with Istio's control plane, a Kmesh daemon per node, an
// ambient namespace with a client and a three-replica service, a pod outside
// the mesh, traffic through the service VIP, and the numbers that matter
// next to direct pod-to-pod traffic measured in the same run.
package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/integration/sim"
)

// Options tune the demo.
type Options struct {
	Out io.Writer
	// Requests sent through the VIP in the distribution phase.
	Requests int
	// DaemonBin is the kmesh-daemon binary; default: next to this binary.
	DaemonBin string
	// Keep leaves the cluster running until ctx ends, to look around.
	Keep bool
}

const objects = `
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: web-0, namespace: shop}
spec:
  clusterIP: 10.96.0.21
  selector: {app: web, instance: web-0}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
`

const (
	vip     = "10.96.0.20"
	web0VIP = "10.96.0.21" // a service of web-0 alone: the fair latency comparison
)

func pod(ns, name, node, app string, cmd ...string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": app, "instance": name}},
		Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: app,
			Containers: []corev1.Container{{Name: app, Command: cmd}}},
	}
}

// FindDaemon looks for kmesh-daemon next to the running binary, then in PATH.
func FindDaemon() (string, error) {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "kmesh-daemon")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		p := filepath.Join(dir, "kmesh-daemon")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", errors.New("kmesh-daemon not found next to this binary or in PATH: run make build (or make demo)")
}

type printer struct{ w io.Writer }

func (p printer) step(format string, args ...any) func() {
	t := time.Now()
	fmt.Fprintf(p.w, "  ▸ %s ... ", fmt.Sprintf(format, args...))
	return func() { fmt.Fprintf(p.w, "done (%s)\n", time.Since(t).Round(time.Millisecond)) }
}

func bar(w io.Writer, label string, done, total int) {
	const width = 30
	n := done * width / total
	end := ""
	if done == total {
		end = "\n"
	}
	fmt.Fprintf(w, "\r    %-34s [%s%s] %d/%d%s", label, strings.Repeat("#", n), strings.Repeat(".", width-n), done, total, end)
}

// Run runs the demo. Everything it creates is removed before it returns,
// also when ctx is cancelled (Ctrl-C) or a step fails.
func Run(ctx context.Context, opts Options) error {
	out := opts.Out
	if out == nil {
		out = os.Stdout
	}
	if opts.Requests == 0 {
		opts.Requests = 600
	}
	if os.Geteuid() != 0 {
		return errors.New("the demo creates network namespaces, cgroups and BPF programs: run it as root (sudo)")
	}
	daemon := opts.DaemonBin
	if daemon == "" {
		var err error
		if daemon, err = FindDaemon(); err != nil {
			return err
		}
	}
	p := printer{out}
	fmt.Fprintln(out, "Kmesh demo: a simulated 2-node ambient cluster with Istio's control plane and a Kmesh daemon per node")

	done := p.step("starting the control plane, 2 nodes and their kmesh-daemons")
	c, err := sim.Start(ctx, sim.Options{Nodes: 2, Objects: objects, DaemonBin: daemon,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		fmt.Fprintln(out)
		return err
	}
	done()
	defer func() {
		d := p.step("tearing down (pods, namespaces, cgroups, BPF programs and pins, daemons)")
		_ = c.Close()
		d()
	}()

	done = p.step("creating pods: shop/client, shop/web-0..2 (ambient), legacy/outsider (outside the mesh)")
	pods := []*corev1.Pod{
		pod("shop", "web-0", "node-1", "web", "echo", "-http", "8080", "-tcp", "0"),
		pod("shop", "web-1", "node-2", "web", "echo", "-http", "8080", "-tcp", "0"),
		pod("shop", "web-2", "node-2", "web", "echo", "-http", "8080", "-tcp", "0"),
		pod("shop", "client", "node-1", "client", "sleep"),
		pod("legacy", "outsider", "node-1", "outsider", "sleep"),
	}
	for _, po := range pods {
		if _, err := c.Kube().CoreV1().Pods(po.Namespace).Create(ctx, po, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	for _, po := range pods {
		if _, err := c.WaitPod(po.Namespace, po.Name, 30*time.Second); err != nil {
			return err
		}
	}
	client, _ := c.Pod("shop", "client")
	outsider, _ := c.Pod("legacy", "outsider")
	web0, _ := c.Pod("shop", "web-0")
	// Wait until the daemons have the service's three endpoints.
	deadline := time.Now().Add(30 * time.Second)
	for {
		var res podnet.ClientResult
		if err := client.Helper(&res, "http", "-url", "http://"+vip+"/", "-n", "30"); err != nil {
			return err
		}
		if len(res.Names) == 3 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the service never reached its three backends: %v %v", res.Names, res.Errors)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		time.Sleep(100 * time.Millisecond)
	}
	done()

	before, err := kernelStats(c.Nodes[0])
	if err != nil {
		return err
	}
	names, errs := podnet.Tally{}, podnet.Tally{}
	const chunk = 100
	for sent := 0; sent < opts.Requests; sent += chunk {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		n := min(chunk, opts.Requests-sent)
		var res podnet.ClientResult
		if err := client.Helper(&res, "http", "-url", "http://"+vip+"/", "-n", strconv.Itoa(n)); err != nil {
			return err
		}
		merge(names, res.Names)
		merge(errs, res.Errors)
		bar(out, "▸ requests to http://"+vip+"/", sent+n, opts.Requests)
	}

	// Latency, new connection per request (the kernel path acts at connect),
	// to the same pod on the same node: through its service VIP, and directly.
	var viaVIP, direct []float64
	const rounds = 5
	for r := 0; r < rounds; r++ {
		for _, arm := range []struct {
			url string
			out *[]float64
		}{{"http://" + web0VIP + "/", &viaVIP}, {"http://" + web0.IPs()[0].String() + ":8080/", &direct}} {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			var res podnet.ClientResult
			if err := client.Helper(&res, "http", "-url", arm.url, "-n", "200", "-latency"); err != nil {
				return err
			}
			if len(res.LatencyUS) > 20 {
				*arm.out = append(*arm.out, res.LatencyUS[20:]...) // the first 10% warms up
			}
		}
		bar(out, "▸ latency, VIP vs direct (interleaved)", r+1, rounds)
	}
	var outside podnet.ClientResult
	if err := outsider.Helper(&outside, "http", "-url", "http://"+vip+"/", "-n", "3", "-timeout", "1s"); err != nil {
		return err
	}
	after, err := kernelStats(c.Nodes[0])
	if err != nil {
		return err
	}

	fmt.Fprintf(out, "\nWhich backends served the %d requests to http://%s/ (from shop/client on node-1)\n", opts.Requests, vip)
	for _, k := range names.Keys() {
		share := float64(names[k]) / float64(opts.Requests)
		node := "?"
		if po, err := c.Pod("shop", k); err == nil {
			node = po.Node.Name
		}
		fmt.Fprintf(out, "  %-6s on %s %5d  %5.1f%%  %s\n", k, node, names[k], 100*share, strings.Repeat("█", int(share*60+0.5)))
	}
	if errs.Total() > 0 {
		fmt.Fprintf(out, "  errors: %v\n", errs)
	}
	fmt.Fprintf(out, "\nWhich path the connections from node-1 took (kernel counters, this run)\n")
	tunnelled := after["tunnel"] - before["tunnel"]
	fmt.Fprintf(out, "  kernel fast path: VIP rewritten at connect(), no proxy   %6d  (backend on node-1)\n", max(after["lb_service"]-before["lb_service"], tunnelled)-tunnelled)
	fmt.Fprintf(out, "  HBONE tunnel: mutual TLS to the backend's node           %6d  (backend on node-2)\n", tunnelled)
	fmt.Fprintf(out, "  plaintext, addressed to a pod IP directly                %6d\n", after["workload_direct"]-before["workload_direct"])
	fmt.Fprintf(out, "  legacy/outsider (outside the mesh) → VIP: untouched by Kmesh (%s)\n", strings.Join(outside.Errors.Keys(), ", "))

	p50v, p99v := percentile(viaVIP, 50), percentile(viaVIP, 99)
	p50d, p99d := percentile(direct, 50), percentile(direct, 99)
	fmt.Fprintf(out, "\nLatency of a request on a new connection (connect + HTTP GET + close) from shop/client to web-0,\n")
	fmt.Fprintf(out, "both on node-1, %d samples each, interleaved\n", len(viaVIP))
	fmt.Fprintf(out, "  %-34s p50 %7.1f µs   p99 %7.1f µs\n", "direct to web-0's pod IP", p50d, p99d)
	fmt.Fprintf(out, "  %-34s p50 %7.1f µs   p99 %7.1f µs   (%.2f× / %.2f× direct)\n", "through the VIP of service web-0", p50v, p99v, p50v/p50d, p99v/p99d)

	n1 := c.Nodes[0]
	fmt.Fprintf(out, "\nWhere to look next\n")
	fmt.Fprintf(out, "  kmeshctl dump --pin-root %s   the kernel maps of node-1\n", filepath.Join(sim.PinParent, c.ID, n1.Name))
	fmt.Fprintf(out, "  curl http://%s/metrics       node-1's daemon metrics\n", n1.Daemon.StatsAddr)
	fmt.Fprintf(out, "  curl http://%s/config_dump   node-1's view of the mesh, in ztunnel's format\n", n1.Daemon.AdminAddr)
	fmt.Fprintf(out, "    (istioctl ztunnel-config all -f FILE reads it; Kmesh's own: /kmesh/config_dump)\n")
	fmt.Fprintf(out, "  kmeshctl version --kernel · make bench · ARCHITECTURE.md\n")
	if opts.Keep {
		fmt.Fprintln(out, "\n--keep: the cluster stays up; press Ctrl-C to tear it down")
		<-ctx.Done()
	} else {
		fmt.Fprintln(out, "  (run with --keep to leave the cluster up and try those)")
	}
	return nil
}

func merge(into, from podnet.Tally) {
	for k, v := range from {
		into[k] += v
	}
}

func kernelStats(n *sim.Node) (map[string]uint64, error) {
	m, closeMaps, err := n.Maps()
	if err != nil {
		return nil, err
	}
	defer closeMaps()
	return m.Stats()
}

func percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[int(float64(len(s)-1)*p/100)]
}
