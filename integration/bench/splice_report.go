package bench

import (
	"fmt"
	"math"
	"strings"
)

// Arm names of the splicing comparisons.
const (
	ArmSockmap        = "kmesh-sockmap"
	ArmSidecar        = "sidecar-pair"
	ArmSidecarSpliced = "sidecar-pair-spliced"
)

// SpliceTotal is what one arm had redirected through sk_msg over a run.
type SpliceTotal struct {
	Arm   string `json:"arm"`
	Runs  int    `json:"runs"`  // successful runs
	Zero  int    `json:"zero"`  // of which moved no byte through sk_msg
	Bytes uint64 `json:"bytes"` // over all runs
}

// SpliceTotals sums each arm's spliced bytes over its successful runs, in
// the order arms are given. A spliced arm with a zero run measured TCP,
// not splicing: the report says so rather than crediting it.
func SpliceTotals(runs []Run, arms []string) []SpliceTotal {
	byArm := map[string]*SpliceTotal{}
	var out []SpliceTotal
	for _, a := range arms {
		byArm[a] = &SpliceTotal{Arm: a}
	}
	for _, r := range runs {
		t := byArm[r.Arm]
		if t == nil || r.Error != "" {
			continue
		}
		t.Runs++
		t.Bytes += r.SplicedBytes
		if r.SplicedBytes == 0 {
			t.Zero++
		}
	}
	for _, a := range arms {
		out = append(out, *byArm[a])
	}
	return out
}

// goal renders whether a ratio's median meets a bound (≤ when max).
func goal(r Ratio, bound float64, max bool) string {
	switch {
	case math.IsNaN(r.Median):
		return "not measured"
	case max && r.Median <= bound, !max && r.Median >= bound:
		return "met"
	default:
		return "**not met**"
	}
}

// spliceSection renders issue 14's goals: the sockmap arm against direct,
// and the spliced sidecar pair against the same pair unspliced (both from
// per-repetition ratios of this run), and the bytes each arm spliced.
func (r *Report) spliceSection(b *strings.Builder) {
	var arms []string
	for _, a := range r.Arms {
		if a.Available {
			arms = append(arms, a.Name)
		}
	}
	totals := SpliceTotals(r.Runs, arms)
	if len(r.Sidecar) > 0 {
		b.WriteString("## Sidecar pair: spliced vs unspliced\n\n")
		b.WriteString("Same pods, same sidecars (haproxy, uid 1337, Istio's capture), measured interleaved; ratios are medians of " +
			"per-repetition ratios spliced/unspliced [bootstrap 95% interval]. Goals: throughput ≥ 1.3×, p50 ≤ 0.85×.\n\n")
		b.WriteString("| workload | p50 (iperf3: Gbit/s) spliced/unspliced | goal | CPU per request spliced/unspliced |\n|---|---|---|---|\n")
		for _, x := range r.Sidecar {
			g := goal(x.AB, 0.85, true)
			if x.Kind == "iperf3" {
				g = goal(x.AB, 1.3, false)
			}
			fmt.Fprintf(b, "| %s | %s | %s | %s |\n", x.Workload, fmtRatio(x.AB), g, fmtRatio(x.CPUAB))
		}
		b.WriteString("\n")
	}
	var rows []string
	for _, s := range r.Summaries {
		if s.Arm != ArmSockmap {
			continue
		}
		for _, w := range r.Workloads {
			if w.Name != s.Workload {
				continue
			}
			switch w.Kind {
			case "sockperf":
				rows = append(rows, fmt.Sprintf("| %s | p50 %s | ≤ 0.9× | %s |", w.Name, fmtRatio(s.P50Ratio), goal(s.P50Ratio, 0.9, true)))
			case "iperf3":
				rows = append(rows, fmt.Sprintf("| %s | throughput %s | ≥ 1.5× | %s |", w.Name, fmtRatio(s.GbpsRatio), goal(s.GbpsRatio, 1.5, false)))
			}
		}
	}
	if len(rows) > 0 {
		b.WriteString("## kmesh-sockmap vs direct\n\n| workload | ratio | goal | |\n|---|---|---|---|\n")
		b.WriteString(strings.Join(rows, "\n") + "\n\n")
	}
	var spliced []SpliceTotal
	for _, t := range totals {
		if t.Bytes > 0 || t.Arm == ArmSockmap || t.Arm == ArmSidecarSpliced {
			spliced = append(spliced, t)
		}
	}
	if len(spliced) == 0 {
		return
	}
	b.WriteString("## Bytes through sk_msg (kmesh_stats_ext `splice_bytes`, read before and after each run)\n\n")
	b.WriteString("Every arm not listed moved none. A spliced arm with runs that moved none measured TCP there.\n\n")
	b.WriteString("| arm | runs | runs with none | bytes |\n|---|---|---|---|\n")
	for _, t := range spliced {
		fmt.Fprintf(b, "| %s | %d | %d | %d |\n", t.Arm, t.Runs, t.Zero, t.Bytes)
	}
	b.WriteString("\n")
}
