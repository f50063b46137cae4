package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"time"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/sim"
)

// Workload is one measurement configuration.
type Workload struct {
	Name string `json:"name"`
	// Kind: "http", "tcp" (fortio), "crr" (connection rate), "sockperf", "iperf3".
	Kind      string  `json:"kind"`
	QPS       float64 `json:"qps,omitempty"`
	Conns     int     `json:"connections,omitempty"`
	KeepAlive bool    `json:"keepalive,omitempty"`
	Streams   int     `json:"streams,omitempty"`
}

// Matrix returns the workloads of a full or quick run.
func Matrix(quick bool) []Workload {
	var ws []Workload
	qpss, conns := []float64{500, 1000, 2000}, []int{1, 4, 16, 64}
	if quick {
		qpss, conns = []float64{1000}, []int{1, 16}
	}
	for _, q := range qpss {
		for _, c := range conns {
			for _, ka := range []bool{true, false} {
				if !ka && quick && c != 1 {
					continue
				}
				ws = append(ws, Workload{Name: fmt.Sprintf("http qps=%g c=%d keepalive=%v", q, c, ka), Kind: "http", QPS: q, Conns: c, KeepAlive: ka})
			}
			ws = append(ws, Workload{Name: fmt.Sprintf("tcp qps=%g c=%d", q, c), Kind: "tcp", QPS: q, Conns: c})
		}
	}
	ws = append(ws,
		Workload{Name: "connection rate (keep-alive off, max qps, c=1)", Kind: "crr", Conns: 1},
		Workload{Name: "sockperf ping-pong 64 B", Kind: "sockperf"},
		Workload{Name: "iperf3 1 stream", Kind: "iperf3", Streams: 1},
		Workload{Name: "iperf3 4 streams", Kind: "iperf3", Streams: 4},
	)
	return ws
}

// Select keeps the workloads named by one of subs: exactly, or, for an
// entry that is no workload's whole name, by a part of the name.
func Select(ws []Workload, subs []string) []Workload {
	exact := map[string]bool{}
	for _, w := range ws {
		exact[w.Name] = true
	}
	var out []Workload
	for _, w := range ws {
		for _, sub := range subs {
			if sub == w.Name || sub != "" && !exact[sub] && strings.Contains(w.Name, sub) {
				out = append(out, w)
				break
			}
		}
	}
	return out
}

// Run is one measured run.
type Run struct {
	Rep      int     `json:"rep"`
	Workload string  `json:"workload"`
	Arm      string  `json:"arm"`
	Sample   Sample  `json:"sample"`
	CPU      CPU     `json:"cpu"`
	Error    string  `json:"error,omitempty"`
	Seconds  float64 `json:"seconds"`
	// SplicedBytes is what the arm's node redirected through sk_msg
	// during the run (kmesh_stats_ext splice_bytes): proof that a spliced
	// arm was spliced, and that an unspliced one was not.
	SplicedBytes uint64 `json:"spliced_bytes"`
}

func (e *Env) measure(a *Arm, w Workload) (Sample, CPU, error) {
	d := fmt.Sprintf("%gs", e.opts.Duration.Seconds())
	before := e.snapshot(a)
	var s Sample
	var clientCPU time.Duration
	var out []byte
	var err error
	switch w.Kind {
	case "http", "tcp", "crr":
		args := []string{e.opts.Fortio, "load", "-loglevel", "error", "-json", "-", "-t", d, "-r", "0.00001",
			"-c", fmt.Sprint(w.Conns)}
		url := fmt.Sprintf("http://%s:%d/echo", a.addr, portHTTP)
		switch w.Kind {
		case "http":
			args = append(args, "-uniform", "-nocatchup", "-qps", fmt.Sprint(w.QPS), fmt.Sprintf("-keepalive=%v", w.KeepAlive))
		case "tcp":
			args = append(args, "-uniform", "-nocatchup", "-qps", fmt.Sprint(w.QPS))
			url = fmt.Sprintf("tcp://%s:%d", a.addr, portTCP)
		case "crr":
			args = append(args, "-qps", "0", "-keepalive=false")
		}
		out, clientCPU, err = e.run(a, append(args, url)...)
		if err == nil {
			s, err = ParseFortio(bytes.NewReader(out))
		}
		if err == nil && s.Errors > 0 {
			err = fmt.Errorf("%d of %d requests failed", s.Errors, s.Count+s.Errors)
		}
	case "sockperf":
		out, clientCPU, err = e.run(a, "sockperf", "pp", "--tcp", "-i", a.addr, "-p", fmt.Sprint(portSockperf),
			"-t", fmt.Sprint(int(math.Max(1, e.opts.Duration.Seconds()))), "-m", "64", "--full-rtt")
		if err == nil {
			s, err = ParseSockperf(bytes.NewReader(out))
		}
	case "iperf3":
		out, clientCPU, err = e.run(a, "iperf3", "-c", a.addr, "-p", fmt.Sprint(portIperf), "-J",
			"-t", fmt.Sprint(int(math.Max(1, e.opts.Duration.Seconds()))), "-P", fmt.Sprint(w.Streams))
		if err == nil {
			s, err = ParseIperf3(bytes.NewReader(out))
		}
	}
	return s, diffCPU(before, e.snapshot(a), clientCPU), err
}

// Measure runs the matrix: a discarded warm-up per arm, then repetitions
// in which every workload runs on every available arm in a shuffled order,
// so drift of the machine hits all arms alike.
func (e *Env) Measure(ctx context.Context, ws []Workload) ([]Run, error) {
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	var arms []*Arm
	for _, a := range e.Arms {
		if a.Available {
			arms = append(arms, a)
		}
	}
	progress := func(format string, args ...any) {
		if e.opts.Progress != nil {
			fmt.Fprintf(e.opts.Progress, format, args...)
		}
	}
	warm := Workload{Kind: "http", QPS: 1000, Conns: 4, KeepAlive: true}
	for _, a := range arms {
		if _, _, err := e.measure(a, warm); err != nil {
			return nil, fmt.Errorf("warm-up of %s: %w", a.Name, err)
		}
	}
	total := e.opts.Reps * len(ws) * len(arms)
	done := 0
	var runs []Run
	for rep := 0; rep < e.opts.Reps; rep++ {
		for _, w := range ws {
			for _, a := range shuffle(arms, rng) {
				if err := ctx.Err(); err != nil {
					return runs, err
				}
				start := time.Now()
				sb, serr := e.spliceBytes(a)
				s, cpu, err := e.measure(a, w)
				sa, aerr := e.spliceBytes(a)
				r := Run{Rep: rep, Workload: w.Name, Arm: a.Name, Sample: s, CPU: cpu, Seconds: time.Since(start).Seconds(), SplicedBytes: sa - sb}
				if err == nil {
					err = errors.Join(serr, aerr)
				}
				if err != nil {
					r.Error = err.Error()
				}
				runs = append(runs, r)
				done++
				progress("\r  [%3d/%d] rep %d %-48s %-14s", done, total, rep+1, w.Name, a.Name)
			}
		}
	}
	progress("\n")
	return runs, nil
}

// spliceBytes reads the arm's node's splice_bytes counter.
func (e *Env) spliceBytes(a *Arm) (uint64, error) {
	maps, closeMaps, err := bpf.OpenPinned(filepath.Join(sim.PinParent, e.cluster.ID, e.cluster.Nodes[a.node].Name))
	if err != nil {
		return 0, err
	}
	defer closeMaps()
	st, err := maps.Stats()
	if err != nil {
		return 0, err
	}
	return st["splice_bytes"], nil
}
