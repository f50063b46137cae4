package bench

import (
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// abRuns: per repetition, direct, A and B measured side by side. The
// machine's speed drifts between repetitions (factor f); the in-run
// ratios must not.
func abRuns(reps int, failB int) []Run {
	var runs []Run
	for rep := 0; rep < reps; rep++ {
		f := 1 + float64(rep) // a slower machine in every repetition
		add := func(w, arm string, p50, gbps, cpuMs float64) {
			r := Run{Rep: rep, Workload: w, Arm: arm, Sample: Sample{P50: p50 * f, Gbps: gbps / f, Count: 1000}, CPU: CPU{Daemon: cpuMs * f}}
			if arm == ArmHBONEB && rep == failB {
				r.Error = "failed"
			}
			runs = append(runs, r)
		}
		// direct 100 µs; A adds 50, B adds 100; CPU per 1k: 10, 20, 30.
		add("tcp", "direct", 100, 0, 10)
		add("tcp", "kmesh-hbone", 150, 0, 20)
		add("tcp", ArmHBONEB, 200, 0, 30)
		add("iperf3 1 stream", "direct", 0, 40, 10)
		add("iperf3 1 stream", "kmesh-hbone", 0, 20, 20)
		add("iperf3 1 stream", ArmHBONEB, 0, 10, 40)
		// haproxy only: no A/B row.
		add("other", "direct", 100, 0, 10)
		add("other", "haproxy-mtls", 300, 0, 10)
	}
	return runs
}

func near(t *testing.T, what string, r Ratio, want float64) {
	t.Helper()
	if math.Abs(r.Median-want) > 1e-9 || r.Low > r.Median || r.High < r.Median {
		t.Errorf("%s: %+v, want median %v", what, r, want)
	}
}

func TestCompareAB(t *testing.T) {
	ws := []Workload{{Name: "tcp", Kind: "tcp"}, {Name: "iperf3 1 stream", Kind: "iperf3"}, {Name: "other", Kind: "tcp"}}
	rows := CompareAB(abRuns(7, 3), ws, "kmesh-hbone", ArmHBONEB, time.Second)
	if len(rows) != 2 {
		t.Fatalf("want rows for the two workloads both builds ran, got %+v", rows)
	}
	tcp, ip := rows[0], rows[1]
	near(t, "p50 A/direct", tcp.ADirect, 1.5)
	near(t, "p50 B/direct", tcp.BDirect, 2)
	near(t, "p50 A/B", tcp.AB, 0.75)
	near(t, "added p50 A/B", tcp.AddedAB, 0.5)
	near(t, "CPU A/direct", tcp.ACPUDirect, 2)
	near(t, "CPU B/direct", tcp.BCPUDirect, 3)
	near(t, "CPU A/B", tcp.CPUAB, 2.0/3)
	near(t, "added CPU A/B", tcp.AddedCPUAB, 0.5)
	// iperf3: throughput ratios, no added-latency ratio.
	near(t, "Gbps A/direct", ip.ADirect, 0.5)
	near(t, "Gbps A/B", ip.AB, 2)
	near(t, "added CPU A/B (iperf3)", ip.AddedCPUAB, 1.0/3)
	if !math.IsNaN(ip.AddedAB.Median) {
		t.Errorf("iperf3 has no added latency: %+v", ip.AddedAB)
	}
	// A repetition where B failed is left out, not counted as zero.
	if rows := CompareAB(abRuns(2, 0), ws[:1], "kmesh-hbone", ArmHBONEB, time.Second); len(rows) != 1 || rows[0].AB.Median != 0.75 {
		t.Errorf("failed B run: %+v", rows)
	}
	if rows := CompareAB(abRuns(1, 0), ws[:1], "kmesh-hbone", ArmHBONEB, time.Second); len(rows) != 0 {
		t.Errorf("no repetition with both: want no row, got %+v", rows)
	}
}

// TestReportAB: an A/B report renders the comparison and each build's
// table against haproxy, and survives a JSON round trip.
func TestReportAB(t *testing.T) {
	ws := []Workload{{Name: "tcp", Kind: "tcp", Conns: 1}, {Name: "iperf3 1 stream", Kind: "iperf3"}}
	runs := abRuns(3, -1)
	for rep := 0; rep < 3; rep++ {
		runs = append(runs, Run{Rep: rep, Workload: "tcp", Arm: "haproxy-mtls", Sample: Sample{P50: 300, Count: 1000}, CPU: CPU{Daemon: 50}},
			Run{Rep: rep, Workload: "iperf3 1 stream", Arm: "haproxy-mtls", Sample: Sample{Gbps: 5}, CPU: CPU{Daemon: 50}})
	}
	arms := []*Arm{{Name: "direct", Available: true}, {Name: "haproxy-mtls", Available: true}, {Name: "kmesh-hbone", Available: true}, {Name: ArmHBONEB, Available: true}}
	opts := Options{Reps: 3, Duration: time.Second, DaemonBin: "bin/kmesh-daemon", DaemonBinB: "/tmp/main/kmesh-daemon", Note: "A: this branch; B: main"}
	r := NewReport(opts, arms, ws, runs)
	dir := t.TempDir()
	if err := r.Write(dir, "ab"); err != nil {
		t.Fatal(err)
	}
	md, err := os.ReadFile(filepath.Join(dir, "ab.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"## A/B: kmesh-hbone (A: `bin/kmesh-daemon`) vs kmesh-hbone-b (B: `/tmp/main/kmesh-daemon`)",
		"| tcp | 1.50× [1.50–1.50] | 2.00× [2.00–2.00] | 0.75× [0.75–0.75] | 0.50× [0.50–0.50] |",
		"## HBONE tunnel (kmesh-hbone) vs the haproxy mTLS pair",
		"## HBONE tunnel (kmesh-hbone-b) vs the haproxy mTLS pair",
		"A: this branch; B: main",
	} {
		if !strings.Contains(string(md), want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
	for _, png := range []string{"ab-latency.png", "ab-cpu.png", "ab-throughput.png"} {
		if _, err := os.Stat(filepath.Join(dir, png)); err != nil {
			t.Error(err)
		}
	}
}

func TestSelect(t *testing.T) {
	ws := Matrix(true)
	names := func(ws []Workload) (out []string) {
		for _, w := range ws {
			out = append(out, w.Name)
		}
		return out
	}
	// A whole name selects that workload only, not c=16 too.
	if got := names(Select(ws, []string{"tcp qps=1000 c=1"})); len(got) != 1 || got[0] != "tcp qps=1000 c=1" {
		t.Errorf("exact: %q", got)
	}
	if got := names(Select(ws, []string{"iperf3", "sockperf"})); len(got) != 3 {
		t.Errorf("parts: %q", got)
	}
	if got := Select(ws, []string{"nothing like it"}); len(got) != 0 {
		t.Errorf("no match: %v", got)
	}
}
