package bench

import (
	"fmt"
	"math"
	"strings"
	"time"
)

// ABRow compares two arms (two daemon builds, A and B) on one workload.
// Every ratio is the median of per-repetition ratios, each repetition's
// arms measured next to each other (and to direct) in that repetition, so
// drift of a shared machine cancels out.
type ABRow struct {
	Workload string `json:"workload"`
	Kind     string `json:"kind"`
	// Each build against direct: p50 (or throughput for iperf3) and CPU
	// per request.
	ADirect, BDirect       Ratio
	ACPUDirect, BCPUDirect Ratio
	// A against B: p50 (throughput), what each adds to direct's p50, CPU
	// per request and the CPU each adds.
	AB, AddedAB, CPUAB, AddedCPUAB Ratio
}

// CompareAB folds the runs of arms a and b (and direct) into one row per
// workload that has both.
func CompareAB(runs []Run, ws []Workload, a, b string, dur time.Duration) []ABRow {
	type key struct {
		w, arm string
		rep    int
	}
	ok := map[key]Run{}
	reps := map[int]bool{}
	for _, r := range runs {
		if r.Error == "" {
			ok[key{r.Workload, r.Arm, r.Rep}] = r
			reps[r.Rep] = true
		}
	}
	cpu := func(r Run) float64 {
		n := requests(r.Sample, dur.Seconds())
		if n <= 0 {
			return math.NaN()
		}
		return r.CPU.Total() / n * 1000
	}
	var out []ABRow
	for _, w := range ws {
		var ad, bd, acd, bcd, ab, added, cab, cadded []float64
		for rep := range reps {
			ra, okA := ok[key{w.Name, a, rep}]
			rb, okB := ok[key{w.Name, b, rep}]
			if !okA || !okB {
				continue
			}
			va, vb := ra.Sample.P50, rb.Sample.P50
			if w.Kind == "iperf3" {
				va, vb = ra.Sample.Gbps, rb.Sample.Gbps
			}
			ab = append(ab, va/vb)
			ca, cb := cpu(ra), cpu(rb)
			cab = append(cab, ca/cb)
			d, okD := ok[key{w.Name, "direct", rep}]
			if !okD {
				continue
			}
			vd := d.Sample.P50
			if w.Kind == "iperf3" {
				vd = d.Sample.Gbps
			}
			cd := cpu(d)
			ad, bd = append(ad, va/vd), append(bd, vb/vd)
			acd, bcd = append(acd, ca/cd), append(bcd, cb/cd)
			if w.Kind != "iperf3" {
				added = append(added, (va-vd)/(vb-vd))
			}
			cadded = append(cadded, (ca-cd)/(cb-cd))
		}
		if len(ab) == 0 {
			continue
		}
		out = append(out, ABRow{Workload: w.Name, Kind: w.Kind,
			ADirect: Ratios(ad), BDirect: Ratios(bd), ACPUDirect: Ratios(acd), BCPUDirect: Ratios(bcd),
			AB: Ratios(ab), AddedAB: Ratios(added), CPUAB: Ratios(cab), AddedCPUAB: Ratios(cadded)})
	}
	return out
}

// abSection renders the A/B comparison of the HBONE arms of two builds.
func (r *Report) abSection(b *strings.Builder) {
	if len(r.AB) == 0 {
		return
	}
	env := r.Environment
	fmt.Fprintf(b, "## A/B: %s (A: `%s`) vs %s (B: `%s`)\n\n", "kmesh-hbone", env.Daemon, ArmHBONEB, env.DaemonB)
	if len(env.DaemonEnv) > 0 || len(env.DaemonEnvB) > 0 {
		fmt.Fprintf(b, "Environment: both %q; B also %q.\n\n", env.DaemonEnv, env.DaemonEnvB)
	}
	b.WriteString("Both builds run at once, each on its own simulated node with its own client and server pods, and are measured " +
		"interleaved with direct in every repetition. Ratios are medians of per-repetition ratios [bootstrap 95% interval]; " +
		"\"added\" is (arm − direct) of A over that of B: below 1 means A adds less. For iperf3 the first ratios are throughput.\n\n")
	b.WriteString("| workload | p50 A/direct | p50 B/direct | p50 A/B | added p50 A/B | CPU A/direct | CPU B/direct | CPU A/B | added CPU A/B |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, x := range r.AB {
		fmt.Fprintf(b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", x.Workload, fmtRatio(x.ADirect), fmtRatio(x.BDirect),
			fmtRatio(x.AB), fmtRatio(x.AddedAB), fmtRatio(x.ACPUDirect), fmtRatio(x.BCPUDirect), fmtRatio(x.CPUAB), fmtRatio(x.AddedCPUAB))
	}
	b.WriteString("\n")
}
