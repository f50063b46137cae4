package bench

import (
	"math"
	"strings"
	"testing"
)

// A spliced arm's runs that moved nothing through sk_msg are counted as
// such (the arm measured TCP there); failed runs are not counted at all.
func TestSpliceTotals(t *testing.T) {
	runs := []Run{
		{Arm: ArmSidecarSpliced, SplicedBytes: 100},
		{Arm: ArmSidecarSpliced, SplicedBytes: 0},
		{Arm: ArmSidecarSpliced, SplicedBytes: 50, Error: "failed"},
		{Arm: ArmSidecar},
		{Arm: "direct"},
	}
	got := SpliceTotals(runs, []string{ArmSidecar, ArmSidecarSpliced})
	want := []SpliceTotal{{Arm: ArmSidecar, Runs: 1, Zero: 1}, {Arm: ArmSidecarSpliced, Runs: 2, Zero: 1, Bytes: 100}}
	if len(got) != len(want) {
		t.Fatalf("got %+v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("row %d: got %+v, want %+v", i, got[i], want[i])
		}
	}
}

func TestGoal(t *testing.T) {
	for _, c := range []struct {
		median, bound float64
		max           bool
		want          string
	}{
		{0.8, 0.85, true, "met"},
		{0.9, 0.85, true, "**not met**"},
		{1.4, 1.3, false, "met"},
		{1.2, 1.3, false, "**not met**"},
		{math.NaN(), 1.3, false, "not measured"},
	} {
		if got := goal(Ratio{Median: c.median}, c.bound, c.max); got != c.want {
			t.Errorf("goal(%v, %v, max %v) = %q, want %q", c.median, c.bound, c.max, got, c.want)
		}
	}
}

// The report compares the spliced pair with the unspliced one per
// repetition, and judges iperf3 by throughput, the rest by p50.
func TestSpliceSectionSidecar(t *testing.T) {
	var runs []Run
	for rep := 0; rep < 3; rep++ {
		f := 1 + float64(rep)
		runs = append(runs,
			Run{Rep: rep, Workload: "sockperf", Arm: "direct", Sample: Sample{P50: 100 * f, Count: 1}},
			Run{Rep: rep, Workload: "sockperf", Arm: ArmSidecar, Sample: Sample{P50: 300 * f, Count: 1}},
			Run{Rep: rep, Workload: "sockperf", Arm: ArmSidecarSpliced, Sample: Sample{P50: 150 * f, Count: 1}, SplicedBytes: 10},
			Run{Rep: rep, Workload: "iperf3", Arm: "direct", Sample: Sample{Gbps: 10 / f}},
			Run{Rep: rep, Workload: "iperf3", Arm: ArmSidecar, Sample: Sample{Gbps: 4 / f}},
			Run{Rep: rep, Workload: "iperf3", Arm: ArmSidecarSpliced, Sample: Sample{Gbps: 4.4 / f}, SplicedBytes: 10},
		)
	}
	ws := []Workload{{Name: "sockperf", Kind: "sockperf"}, {Name: "iperf3", Kind: "iperf3"}}
	r := &Report{Arms: []*Arm{{Name: "direct", Available: true}, {Name: ArmSidecar, Available: true}, {Name: ArmSidecarSpliced, Available: true}},
		Workloads: ws, Runs: runs, Sidecar: CompareAB(runs, ws, ArmSidecarSpliced, ArmSidecar, 0)}
	var b strings.Builder
	r.spliceSection(&b)
	out := b.String()
	for _, want := range []string{"| sockperf | 0.50×", "| sockperf | 0.50× [0.50–0.50] | met", "| iperf3 | 1.10× [1.10–1.10] | **not met**",
		"| sidecar-pair-spliced | 6 | 0 | 60 |"} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
}
