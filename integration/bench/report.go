package bench

import (
	"encoding/json"
	"fmt"
	"image/color"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

// Summary of one workload on one arm over all repetitions.
type Summary struct {
	Workload string `json:"workload"`
	Arm      string `json:"arm"`
	Runs     int    `json:"runs"`
	Failed   int    `json:"failed"`
	// Medians of absolute values.
	P50us, P99us, P999us float64
	Rate                 float64 `json:"rate_per_s"`
	Gbps                 float64 `json:"gbps"`
	CPUPer1k             float64 `json:"cpu_ms_per_1000_requests"`
	BPFPer1k             float64 `json:"bpf_ms_per_1000_requests"`
	// Medians of per-repetition ratios against the direct arm.
	P50Ratio, P99Ratio, RateRatio, GbpsRatio, CPURatio Ratio
}

// Environment records what the numbers were measured on.
type Environment struct {
	Date, Kernel, CPU, Go, Clang, Haproxy, Fortio string
	// Daemon and DaemonB are the kmesh-daemon builds of the kmesh-hbone
	// and kmesh-hbone-b arms (DaemonB empty without an A/B run); Note is
	// the operator's description (which commits they are).
	Daemon, DaemonB, Note string   `json:",omitempty"`
	DaemonEnv, DaemonEnvB []string `json:",omitempty"`
	Quick                 bool
	Reps                  int
	Duration              string
}

// Report is the whole output of a run.
type Report struct {
	Environment Environment `json:"environment"`
	Arms        []*Arm      `json:"arms"`
	Workloads   []Workload  `json:"workloads"`
	Summaries   []Summary   `json:"summaries"`
	// AB compares kmesh-hbone with kmesh-hbone-b (A/B runs only).
	AB []ABRow `json:"ab,omitempty"`
	// Sidecar compares sidecar-pair-spliced (A) with sidecar-pair (B).
	Sidecar []ABRow `json:"sidecar,omitempty"`
	Runs    []Run   `json:"runs"`
}

func firstLine(cmd string, args ...string) string {
	out, err := exec.Command(cmd, args...).CombinedOutput()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "model name") {
			if _, v, ok := strings.Cut(l, ":"); ok {
				return fmt.Sprintf("%s (%d CPUs)", strings.TrimSpace(v), runtime.NumCPU())
			}
		}
	}
	return "unknown"
}

func requests(s Sample, seconds float64) float64 {
	if s.Count > 0 {
		return float64(s.Count)
	}
	return s.Rate * seconds
}

// Summarise folds runs into per (workload, arm) summaries.
func Summarise(runs []Run, ws []Workload, arms []*Arm, dur time.Duration) []Summary {
	type key struct{ w, a string }
	byKey := map[key][]Run{}
	reps := map[int]bool{}
	for _, r := range runs {
		byKey[key{r.Workload, r.Arm}] = append(byKey[key{r.Workload, r.Arm}], r)
		reps[r.Rep] = true
	}
	var out []Summary
	for _, w := range ws {
		direct := map[int]Run{}
		for _, r := range byKey[key{w.Name, "direct"}] {
			if r.Error == "" {
				direct[r.Rep] = r
			}
		}
		for _, a := range arms {
			if !a.Available {
				continue
			}
			rs := byKey[key{w.Name, a.Name}]
			s := Summary{Workload: w.Name, Arm: a.Name, Runs: len(rs)}
			var p50, p99, p999, rate, gbps, cpu, bpf []float64
			var rp50, rp99, rrate, rgbps, rcpu []float64
			for _, r := range rs {
				if r.Error != "" {
					s.Failed++
					continue
				}
				n := requests(r.Sample, dur.Seconds())
				c, b := math.NaN(), math.NaN()
				if n > 0 {
					c, b = r.CPU.Total()/n*1000, r.CPU.BPF/n*1000
				}
				p50, p99, p999 = append(p50, r.Sample.P50), append(p99, r.Sample.P99), append(p999, r.Sample.P999)
				rate, gbps, cpu, bpf = append(rate, r.Sample.Rate), append(gbps, r.Sample.Gbps), append(cpu, c), append(bpf, b)
				if d, ok := direct[r.Rep]; ok {
					dn := requests(d.Sample, dur.Seconds())
					rp50 = append(rp50, r.Sample.P50/d.Sample.P50)
					rp99 = append(rp99, r.Sample.P99/d.Sample.P99)
					rrate = append(rrate, r.Sample.Rate/d.Sample.Rate)
					rgbps = append(rgbps, r.Sample.Gbps/d.Sample.Gbps)
					if dn > 0 {
						rcpu = append(rcpu, c/(d.CPU.Total()/dn*1000))
					}
				}
			}
			s.P50us, s.P99us, s.P999us = Median(p50), Median(p99), Median(p999)
			s.Rate, s.Gbps, s.CPUPer1k, s.BPFPer1k = Median(rate), Median(gbps), Median(cpu), Median(bpf)
			s.P50Ratio, s.P99Ratio, s.RateRatio, s.GbpsRatio, s.CPURatio = Ratios(rp50), Ratios(rp99), Ratios(rrate), Ratios(rgbps), Ratios(rcpu)
			out = append(out, s)
		}
	}
	return out
}

// NewReport assembles a report.
func NewReport(opts Options, arms []*Arm, ws []Workload, runs []Run) *Report {
	return &Report{
		Environment: Environment{
			Date: time.Now().UTC().Format(time.RFC3339), Kernel: firstLine("uname", "-r"), CPU: cpuModel(),
			Go: runtime.Version(), Clang: firstLine("clang", "--version"), Haproxy: firstLine("haproxy", "-v"),
			Fortio: firstLine(opts.Fortio, "version"), Quick: opts.Quick, Reps: opts.Reps, Duration: opts.Duration.String(),
			Daemon: opts.DaemonBin, DaemonB: opts.DaemonBinB, Note: opts.Note, DaemonEnv: opts.DaemonEnv, DaemonEnvB: opts.DaemonEnvB,
		},
		Arms: arms, Workloads: ws, Summaries: Summarise(runs, ws, arms, opts.Duration), Runs: runs,
		AB:      CompareAB(runs, ws, "kmesh-hbone", ArmHBONEB, opts.Duration),
		Sidecar: CompareAB(runs, ws, ArmSidecarSpliced, ArmSidecar, opts.Duration),
	}
}

// MarshalJSON keeps unexported arm fields out and NaN out of JSON.
func (r Ratio) MarshalJSON() ([]byte, error) {
	f := func(x float64) any {
		if math.IsNaN(x) || math.IsInf(x, 0) {
			return nil
		}
		return math.Round(x*1e4) / 1e4
	}
	return json.Marshal(map[string]any{"median": f(r.Median), "ci95_low": f(r.Low), "ci95_high": f(r.High)})
}

// Write writes results.json, results.md and the plots into dir.
func (r *Report) Write(dir, prefix string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	clean := *r
	clean.Summaries = nil
	for _, s := range r.Summaries {
		for _, p := range []*float64{&s.P50us, &s.P99us, &s.P999us, &s.Rate, &s.Gbps, &s.CPUPer1k, &s.BPFPer1k} {
			if math.IsNaN(*p) {
				*p = 0
			}
		}
		clean.Summaries = append(clean.Summaries, s)
	}
	b, err := json.MarshalIndent(clean, "", " ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, prefix+".json"), append(b, '\n'), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, prefix+".md"), []byte(r.markdown(prefix)), 0o644); err != nil {
		return err
	}
	return r.plots(dir, prefix)
}

func fmtRatio(r Ratio) string {
	if math.IsNaN(r.Median) {
		return "–"
	}
	return fmt.Sprintf("%.2f× [%.2f–%.2f]", r.Median, r.Low, r.High)
}

func (r *Report) markdown(prefix string) string {
	var b strings.Builder
	env := r.Environment
	mode := "full"
	if env.Quick {
		mode = "quick"
	}
	fmt.Fprintf(&b, "# Data path benchmark (%s run)\n\n", mode)
	fmt.Fprintf(&b, "Produced by `make bench` (`integration/cmd/kmesh-bench`) on %s.\n\n", env.Date)
	fmt.Fprintf(&b, "- kernel %s; %s\n- %s; %s; %s; %s\n", env.Kernel, env.CPU, env.Go, env.Clang, env.Haproxy, env.Fortio)
	fmt.Fprintf(&b, "- %d interleaved repetitions of %s per run after a discarded warm-up; client on CPU 0, server on CPU 1\n", env.Reps, env.Duration)
	b.WriteString("- ratios: median of per-repetition ratios against the direct arm measured in the same repetition, with a bootstrap 95% interval\n")
	b.WriteString("- CPU: every thread of client, server, proxies and daemon from schedstat, plus softirq; BPF program time (kernel.bpf_stats) is part of it\n")
	b.WriteString("- the machine may be shared: compare arms only through these in-run ratios, never absolute figures across runs\n")
	if env.Note != "" {
		fmt.Fprintf(&b, "- %s\n", env.Note)
	}
	b.WriteString("\n")
	b.WriteString("Arms: ")
	for i, a := range r.Arms {
		if i > 0 {
			b.WriteString(", ")
		}
		if a.Available {
			fmt.Fprintf(&b, "**%s**", a.Name)
		} else {
			fmt.Fprintf(&b, "%s (not available: %s)", a.Name, a.Why)
		}
	}
	b.WriteString("\n\n")
	fmt.Fprintf(&b, "![latency vs connections](%s-latency.png) ![CPU per 1000 requests](%s-cpu.png) ![throughput](%s-throughput.png)\n\n", prefix, prefix, prefix)
	r.abSection(&b)
	r.spliceSection(&b)
	r.tunnelOverhead(&b, "kmesh-hbone")
	r.tunnelOverhead(&b, ArmHBONEB)
	for _, w := range r.Workloads {
		fmt.Fprintf(&b, "## %s\n\n", w.Name)
		switch w.Kind {
		case "iperf3":
			b.WriteString("| arm | Gbit/s | ratio | CPU ms per GB |\n|---|---|---|---|\n")
		default:
			b.WriteString("| arm | p50 µs | p99 µs | p99.9 µs | rate/s | p50 ratio | p99 ratio | rate ratio | CPU ms / 1k req | CPU ratio | BPF ms / 1k |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
		}
		for _, s := range r.Summaries {
			if s.Workload != w.Name {
				continue
			}
			fail := ""
			if s.Failed > 0 {
				fail = fmt.Sprintf(" (%d/%d runs failed)", s.Failed, s.Runs)
			}
			if w.Kind == "iperf3" {
				// For iperf3 a "request" is a byte: per 1000 bytes → per GB.
				fmt.Fprintf(&b, "| %s%s | %.2f | %s | %.0f |\n", s.Arm, fail, s.Gbps, fmtRatio(s.GbpsRatio), s.CPUPer1k*1e6)
				continue
			}
			fmt.Fprintf(&b, "| %s%s | %.1f | %.1f | %.1f | %.0f | %s | %s | %s | %.2f | %s | %.3f |\n", s.Arm, fail,
				s.P50us, s.P99us, s.P999us, s.Rate, fmtRatio(s.P50Ratio), fmtRatio(s.P99Ratio), fmtRatio(s.RateRatio),
				s.CPUPer1k, fmtRatio(s.CPURatio), s.BPFPer1k)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// tunnelOverhead compares what the two mutual-TLS user-space paths add on
// top of the direct path: Kmesh's HBONE tunnel and the haproxy TLS pair.
// Targets (issue 6): added p50 latency <= 0.7x, added CPU <= 0.5x haproxy's.
func (r *Report) tunnelOverhead(b *strings.Builder, arm string) {
	find := func(w, a string) *Summary {
		for i := range r.Summaries {
			if r.Summaries[i].Workload == w && r.Summaries[i].Arm == a {
				return &r.Summaries[i]
			}
		}
		return nil
	}
	if len(r.Workloads) == 0 || find(r.Workloads[0].Name, arm) == nil || find(r.Workloads[0].Name, "haproxy-mtls") == nil {
		return
	}
	fmt.Fprintf(b, "## HBONE tunnel (%s) vs the haproxy mTLS pair: what each adds to the direct path\n\n", arm)
	b.WriteString("Added = arm median − direct median (same run). Targets: added p50 ≤ 0.7× and added CPU ≤ 0.5× haproxy's.\n\n")
	b.WriteString("| workload | +p50 µs HBONE | +p50 µs haproxy-mtls | ratio | +CPU ms/1k HBONE | +CPU ms/1k haproxy-mtls | ratio |\n|---|---|---|---|---|---|---|\n")
	for _, w := range r.Workloads {
		d, h, x := find(w.Name, "direct"), find(w.Name, arm), find(w.Name, "haproxy-mtls")
		if d == nil || h == nil || x == nil {
			continue
		}
		if w.Kind == "iperf3" {
			fmt.Fprintf(b, "| %s | Gbit/s %.2f | Gbit/s %.2f | %.2f× throughput | CPU/GB %.0f | CPU/GB %.0f | %.2f× |\n", w.Name, h.Gbps, x.Gbps,
				h.Gbps/x.Gbps, (h.CPUPer1k-d.CPUPer1k)*1e6, (x.CPUPer1k-d.CPUPer1k)*1e6, (h.CPUPer1k-d.CPUPer1k)/(x.CPUPer1k-d.CPUPer1k))
			continue
		}
		hl, xl := h.P50us-d.P50us, x.P50us-d.P50us
		hc, xc := h.CPUPer1k-d.CPUPer1k, x.CPUPer1k-d.CPUPer1k
		fmt.Fprintf(b, "| %s | %.1f | %.1f | %.2f× | %.2f | %.2f | %.2f× |\n", w.Name, hl, xl, hl/xl, hc, xc, hc/xc)
	}
	b.WriteString("\n")
}

var palette = []color.Color{
	color.RGBA{0, 0, 0, 255}, color.RGBA{128, 128, 128, 255}, color.RGBA{0, 114, 178, 255}, color.RGBA{86, 180, 233, 255},
	color.RGBA{213, 94, 0, 255}, color.RGBA{230, 159, 0, 255}, color.RGBA{0, 158, 115, 255}, color.RGBA{204, 121, 167, 255},
}

func (r *Report) armColor(name string) color.Color {
	for i, a := range r.Arms {
		if a.Name == name {
			return palette[i%len(palette)]
		}
	}
	return palette[0]
}

func (r *Report) summary(w, a string) (Summary, bool) {
	for _, s := range r.Summaries {
		if s.Workload == w && s.Arm == a {
			return s, true
		}
	}
	return Summary{}, false
}

func (r *Report) plots(dir, prefix string) error {
	// Latency against connections: HTTP keep-alive at 1000 qps, p50 solid, p99 dashed.
	p := plot.New()
	p.Title.Text = "HTTP keep-alive, 1000 qps: latency vs connections"
	p.X.Label.Text = "connections"
	p.Y.Label.Text = "µs"
	for _, a := range r.Arms {
		if !a.Available {
			continue
		}
		var p50, p99 plotter.XYs
		for _, w := range r.Workloads {
			if w.Kind != "http" || !w.KeepAlive || w.QPS != 1000 {
				continue
			}
			if s, ok := r.summary(w.Name, a.Name); ok && s.P50us > 0 {
				p50 = append(p50, plotter.XY{X: float64(w.Conns), Y: s.P50us})
				p99 = append(p99, plotter.XY{X: float64(w.Conns), Y: s.P99us})
			}
		}
		sort.Slice(p50, func(i, j int) bool { return p50[i].X < p50[j].X })
		sort.Slice(p99, func(i, j int) bool { return p99[i].X < p99[j].X })
		if len(p50) == 0 {
			continue
		}
		l50, pt50, err := plotter.NewLinePoints(p50)
		if err != nil {
			return err
		}
		l99, pt99, err := plotter.NewLinePoints(p99)
		if err != nil {
			return err
		}
		l50.Color, l99.Color, pt50.Color, pt99.Color = r.armColor(a.Name), r.armColor(a.Name), r.armColor(a.Name), r.armColor(a.Name)
		l50.Width, l99.Width = vg.Points(2), vg.Points(1)
		l99.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
		p.Add(l50, pt50, l99, pt99)
		p.Legend.Add(a.Name+" p50", l50)
		p.Legend.Add(a.Name+" p99", l99)
	}
	p.Legend.Top, p.Legend.Left = true, true
	p.Y.Min = 0
	// A log axis needs a range: gonum panics on a run that measured one
	// connection count only (-workloads).
	if p.X.Min > 0 && p.X.Max > p.X.Min {
		p.X.Scale = plot.LogScale{}
		p.X.Tick.Marker = plot.LogTicks{Prec: -1}
	}
	if err := p.Save(10*vg.Inch, 6*vg.Inch, filepath.Join(dir, prefix+"-latency.png")); err != nil {
		return err
	}
	if err := r.bars(filepath.Join(dir, prefix+"-cpu.png"), "CPU per 1000 requests: client, server, proxies, daemon, softirq", "ms",
		func(w Workload) bool {
			return w.Kind == "http" && w.KeepAlive && w.QPS == 1000 && w.Conns == 16 || w.Kind == "crr"
		},
		func(s Summary) float64 { return s.CPUPer1k }); err != nil {
		return err
	}
	return r.bars(filepath.Join(dir, prefix+"-throughput.png"), "iperf3 throughput", "Gbit/s",
		func(w Workload) bool { return w.Kind == "iperf3" }, func(s Summary) float64 { return s.Gbps })
}

// bars draws one group of bars per selected workload, one bar per arm.
func (r *Report) bars(file, title, unit string, sel func(Workload) bool, val func(Summary) float64) error {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = unit
	var names []string
	for _, w := range r.Workloads {
		if sel(w) {
			names = append(names, w.Name)
		}
	}
	if len(names) == 0 { // a run that measured none of these (-workloads)
		return p.Save(10*vg.Inch, 6*vg.Inch, file)
	}
	var arms []*Arm
	for _, a := range r.Arms {
		if a.Available {
			arms = append(arms, a)
		}
	}
	width := vg.Points(float64(300 / max(1, len(arms)*max(1, len(names)))))
	for i, a := range arms {
		var vals plotter.Values
		for _, w := range names {
			s, _ := r.summary(w, a.Name)
			v := val(s)
			if math.IsNaN(v) {
				v = 0
			}
			vals = append(vals, v)
		}
		bc, err := plotter.NewBarChart(vals, width)
		if err != nil {
			return err
		}
		bc.Color = r.armColor(a.Name)
		bc.LineStyle.Width = 0
		bc.Offset = vg.Length(float64(i)-float64(len(arms)-1)/2) * width
		p.Add(bc)
		p.Legend.Add(a.Name, bc)
	}
	p.Legend.Top, p.Legend.Left = true, true
	p.NominalX(names...)
	return p.Save(10*vg.Inch, 6*vg.Inch, file)
}
