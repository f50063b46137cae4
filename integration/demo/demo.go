// Package demo shows Kmesh doing its job on one machine: simulated pods,
// the real kernel data path, traffic through a service VIP, and the numbers
// that matter, side by side with direct pod-to-pod traffic.
package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/kernel"
)

// Options tune the demo.
type Options struct {
	Out io.Writer
	// Connections sent through the VIP in the distribution phase.
	Connections int
	// Keep leaves everything running until ctx ends, for kmeshctl dump.
	Keep bool
}

const (
	pinParent = kernel.DefaultBPFFS + "/kmesh-demo"
	vip       = "10.96.0.20"
)

type printer struct {
	w     io.Writer
	start time.Time
}

func (p *printer) step(format string, args ...any) func() {
	t := time.Now()
	fmt.Fprintf(p.w, "  ▸ %s ... ", fmt.Sprintf(format, args...))
	return func() { fmt.Fprintf(p.w, "done (%s)\n", time.Since(t).Round(time.Millisecond)) }
}

// Run runs the demo. Everything it creates is removed before it returns,
// also when ctx is cancelled (Ctrl-C) or a step fails.
func Run(ctx context.Context, opts Options) (err error) {
	if opts.Out == nil {
		opts.Out = os.Stdout
	}
	if opts.Connections == 0 {
		opts.Connections = 3000
	}
	p := &printer{w: opts.Out, start: time.Now()}
	if os.Geteuid() != 0 {
		return errors.New("the demo creates network namespaces, cgroups and BPF programs: run it as root (sudo)")
	}
	if err := kernel.Check(kernel.Probe()); err != nil {
		return fmt.Errorf("%w\n(kmeshctl version --kernel lists every feature)", err)
	}
	fmt.Fprintln(opts.Out, "Kmesh demo: one simulated node, a service of three pods, the real kernel data path")

	var cleanups []func()
	defer func() {
		done := p.step("cleaning up (namespaces, cgroup, programs, pins)")
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
		done()
	}()

	id := podnet.RandomSuffix()
	done := p.step("loading Kmesh's programs into a private cgroup")
	cg, err := podnet.NewCgroup("", "kmesh-demo-"+id)
	if err != nil {
		return err
	}
	cleanups = append(cleanups, func() { _ = cg.Remove() })
	pinRoot := filepath.Join(pinParent, id)
	dp, err := bpf.Load(bpf.Config{PinRoot: pinRoot, CgroupPath: cg.Path})
	if err != nil {
		return err
	}
	cleanups = append(cleanups, func() {
		_ = dp.Uninstall()
		_ = os.Remove(pinRoot)
		_ = os.Remove(pinParent)
	})
	done()

	done = p.step("creating pods: client (ambient), web-0..2 (ambient), legacy (outside the mesh)")
	node, err := podnet.NewNode("demo", netip.MustParsePrefix("10.244.7.0/24"), netip.Prefix{})
	if err != nil {
		return err
	}
	cleanups = append(cleanups, func() { _ = node.Close() })
	mk := func(name string, host int) (*podnet.Pod, error) {
		return node.AddPod(name, netip.MustParseAddr("10.244.7."+strconv.Itoa(host)), netip.Addr{})
	}
	client, err := mk("client", 2)
	if err != nil {
		return err
	}
	legacy, err := mk("legacy", 3)
	if err != nil {
		return err
	}
	plane := dataplane.New(dp.Maps, dataplane.Options{Node: dataplane.Topology{Node: "demo"}})
	if err := plane.SetWorkload(dataplane.Workload{UID: "client", Addrs: []netip.Addr{client.IPv4}, Healthy: true, Capacity: 1, Topology: dataplane.Topology{Node: "demo"}}); err != nil {
		return err
	}
	svc := dataplane.Service{Key: "demo/web.demo.svc.cluster.local", VIPs: []netip.Addr{netip.MustParseAddr(vip)},
		Ports: []dataplane.Port{{ServicePort: 80, TargetPort: 8080}}}
	var web0 *podnet.Pod
	for i := 0; i < 3; i++ {
		name := fmt.Sprintf("web-%d", i)
		pod, err := mk(name, 10+i)
		if err != nil {
			return err
		}
		if i == 0 {
			web0 = pod
		}
		l, err := pod.Listen("tcp", ":8080")
		if err != nil {
			return err
		}
		cleanups = append(cleanups, func() { l.Close() })
		go podnet.ServeTCPName(l, name)
		if err := plane.SetWorkload(dataplane.Workload{UID: name, Addrs: []netip.Addr{pod.IPv4}, Healthy: true, Capacity: 1, Topology: dataplane.Topology{Node: "demo"}}); err != nil {
			return err
		}
		svc.Endpoints = append(svc.Endpoints, dataplane.Endpoint{WorkloadUID: name})
	}
	done()

	done = p.step("enrolling the client and publishing service web (VIP %s:80 → pods :8080)", vip)
	cookie, err := client.NS.Cookie()
	if err != nil {
		return err
	}
	if err := plane.Enroll(cookie, "client"); err != nil {
		return err
	}
	if err := plane.SetService(svc); err != nil {
		return err
	}
	done()
	if err := ctx.Err(); err != nil {
		return err
	}

	// Distribution, in chunks so progress shows.
	fmt.Fprintf(opts.Out, "  ▸ sending %d connections to %s:80 from the client pod\n", opts.Connections, vip)
	names := podnet.Tally{}
	errs := podnet.Tally{}
	const chunk = 250
	for sent := 0; sent < opts.Connections; sent += chunk {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(chunk, opts.Connections-sent)
		var res podnet.ClientResult
		if err := client.Helper(cg, &res, "tcp", "-addr", vip+":80", "-n", strconv.Itoa(n), "-network", "tcp4"); err != nil {
			return err
		}
		for k, v := range res.Names {
			names[k] += v
		}
		for k, v := range res.Errors {
			errs[k] += v
		}
		bar(opts.Out, sent+n, opts.Connections)
	}
	fmt.Fprintln(opts.Out)

	// Latency: the same client, interleaved rounds, VIP vs a pod IP directly.
	fmt.Fprintln(opts.Out, "  ▸ measuring connection latency: through the VIP vs direct to a pod IP (interleaved)")
	var viaVIP, direct []float64
	for round := 0; round < 5; round++ {
		for _, arm := range []struct {
			addr string
			out  *[]float64
		}{{vip + ":80", &viaVIP}, {web0.IPv4.String() + ":8080", &direct}} {
			if err := ctx.Err(); err != nil {
				return err
			}
			var res podnet.ClientResult
			if err := client.Helper(cg, &res, "tcp", "-addr", arm.addr, "-n", "300", "-network", "tcp4", "-latency"); err != nil {
				return err
			}
			*arm.out = append(*arm.out, res.LatencyUS[30:]...) // first 10% of each round is warm-up
		}
		bar(opts.Out, round+1, 5)
	}
	fmt.Fprintln(opts.Out)

	var outside podnet.ClientResult
	if err := legacy.Helper(cg, &outside, "tcp", "-addr", vip+":80", "-n", "3", "-network", "tcp4"); err != nil {
		return err
	}
	stats, err := dp.Maps.Stats()
	if err != nil {
		return err
	}

	out := opts.Out
	fmt.Fprintf(out, "\nWhich backends served the %d connections to %s:80\n", opts.Connections, vip)
	for _, k := range names.Keys() {
		share := float64(names[k]) / float64(opts.Connections)
		fmt.Fprintf(out, "  %-6s %5d  %5.1f%%  %s\n", k, names[k], 100*share, strings.Repeat("█", int(share*60+0.5)))
	}
	if errs.Total() > 0 {
		fmt.Fprintf(out, "  errors: %v\n", errs)
	}
	fmt.Fprintf(out, "\nWhich path the connections took\n")
	fmt.Fprintf(out, "  kernel fast path (rewritten at connect(), no proxy): %d\n", stats["lb_service"])
	fmt.Fprintf(out, "  tunnel (HBONE):                                     0  (not in this release)\n")
	fmt.Fprintf(out, "  plaintext passthrough / direct pod IP:              %d\n", stats["workload_direct"]+stats["lb_passthrough"])
	fmt.Fprintf(out, "  legacy pod outside the mesh → VIP: untouched (%s), as without Kmesh\n", strings.Join(outside.Errors.Keys(), ","))

	p50v, p99v := percentile(viaVIP, 50), percentile(viaVIP, 99)
	p50d, p99d := percentile(direct, 50), percentile(direct, 99)
	fmt.Fprintf(out, "\nNew-connection latency (connect + answer + close), %d samples each\n", len(viaVIP))
	fmt.Fprintf(out, "  %-22s p50 %7.1f µs   p99 %7.1f µs\n", "direct to pod IP", p50d, p99d)
	fmt.Fprintf(out, "  %-22s p50 %7.1f µs   p99 %7.1f µs   (%.2f× / %.2f× direct)\n", "via VIP (Kmesh kernel)", p50v, p99v, p50v/p50d, p99v/p99d)

	fmt.Fprintf(out, "\nWhere to look next\n")
	fmt.Fprintf(out, "  kmeshctl dump --pin-root %s      the kernel maps behind this demo (run with --keep)\n", pinRoot)
	fmt.Fprintf(out, "  kmeshctl version --kernel                 what this kernel supports\n")
	fmt.Fprintf(out, "  make bench                                the full benchmark harness\n")
	if opts.Keep {
		fmt.Fprintln(out, "\n--keep: everything stays up; press Ctrl-C to clean up")
		<-ctx.Done()
	}
	return nil
}

func bar(w io.Writer, done, total int) {
	const width = 40
	n := done * width / total
	fmt.Fprintf(w, "\r    [%s%s] %d/%d", strings.Repeat("#", n), strings.Repeat(".", width-n), done, total)
}

func percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	i := int(float64(len(s)-1) * p / 100)
	return s[i]
}
