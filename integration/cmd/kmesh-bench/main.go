// Command kmesh-bench runs the data path benchmark harness (see
// integration/bench) and writes JSON, Markdown and PNG plots.
//
//	sudo kmesh-bench -quick -out docs/benchmarks
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"kmesh.dev/kmesh/integration/bench"
	"kmesh.dev/kmesh/integration/podnet"
)

func main() {
	podnet.MaybeRunHelper() // pods' built-in apps re-execute this binary
	quick := flag.Bool("quick", false, "a few minutes: fewer workloads and repetitions")
	reps := flag.Int("reps", 0, "repetitions (default 5, quick 3)")
	dur := flag.Duration("duration", 0, "length of one run (default 3s, quick 2s)")
	out := flag.String("out", "docs/benchmarks", "output directory")
	daemon := flag.String("daemon", "bin/kmesh-daemon", "kmesh-daemon binary")
	daemonB := flag.String("daemon-b", "", "a second kmesh-daemon build, measured as arm kmesh-hbone-b next to kmesh-hbone (A/B)")
	daemonEnvB := flag.String("daemon-b-env", "", "comma-separated VAR=value added to the -daemon-b daemon's environment only (A/B of a setting)")
	note := flag.String("note", "", "a line for the report (e.g. which commits -daemon and -daemon-b were built from)")
	prefixFlag := flag.String("prefix", "", "output file prefix (default datapath or datapath-quick)")
	fortio := flag.String("fortio", "bin/tools/fortio", "fortio v1.68.2 binary")
	from := flag.String("from", "", "re-render the report (Markdown, plots) of an earlier run's JSON instead of measuring")
	arms := flag.String("arms", "", "comma-separated arms to measure (default: all; direct is always measured, it is the baseline)")
	only := flag.String("workloads", "", "comma-separated substrings: measure only the workloads whose name contains one (profiling)")
	daemonEnv := flag.String("daemon-env", "", "comma-separated VAR=value added to the daemons' environment (experiments: GOMAXPROCS=1, …)")
	flag.Parse()
	if *from != "" {
		if err := rerender(*from, *out); err != nil {
			fatal(err)
		}
		return
	}
	if os.Geteuid() != 0 {
		fatal("kmesh-bench builds a simulated cluster: run it as root")
	}
	opts := bench.Options{Quick: *quick, Reps: *reps, Duration: *dur, DaemonBin: *daemon, DaemonBinB: *daemonB, Note: *note, Fortio: *fortio,
		Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})), Progress: os.Stderr}
	if *arms != "" {
		opts.Arms = strings.Split(*arms, ",")
	}
	if *daemonEnvB != "" {
		opts.DaemonEnvB = strings.Split(*daemonEnvB, ",")
	}
	if *daemonEnv != "" {
		opts.DaemonEnv = strings.Split(*daemonEnv, ",")
	}
	if opts.Reps == 0 {
		opts.Reps = 5
		if *quick {
			opts.Reps = 3
		}
	}
	if opts.Duration == 0 {
		opts.Duration = 3 * time.Second
		if *quick {
			opts.Duration = 2 * time.Second
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	env, err := bench.Setup(ctx, opts)
	if err != nil {
		fatal(err)
	}
	ws := bench.Matrix(*quick)
	if *only != "" {
		ws = bench.Select(ws, strings.Split(*only, ","))
		if len(ws) == 0 {
			fatal("no workload matches -workloads " + *only)
		}
	}
	start := time.Now()
	runs, err := env.Measure(ctx, ws)
	env.Close()
	if err != nil {
		fatal(err)
	}
	prefix := "datapath"
	if *quick {
		prefix = "datapath-quick"
	}
	if *prefixFlag != "" {
		prefix = *prefixFlag
	}
	r := bench.NewReport(opts, env.Arms, ws, runs)
	if err := r.Write(*out, prefix); err != nil {
		fatal(err)
	}
	fmt.Fprintf(os.Stderr, "measured in %s; results in %s/%s.{md,json,*.png}\n", time.Since(start).Round(time.Second), *out, prefix)
}

// fatal reports and exits. Not the log package: Istio's logging (linked in
// with the control plane) takes over the standard logger.
func fatal(v any) {
	fmt.Fprintln(os.Stderr, "kmesh-bench:", v)
	os.Exit(1)
}

func rerender(file, out string) error {
	b, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	var r bench.Report
	if err := json.Unmarshal(b, &r); err != nil {
		return err
	}
	d, err := time.ParseDuration(r.Environment.Duration)
	if err != nil {
		return err
	}
	r.Summaries = bench.Summarise(r.Runs, r.Workloads, r.Arms, d)
	r.AB = bench.CompareAB(r.Runs, r.Workloads, "kmesh-hbone", bench.ArmHBONEB, d)
	r.Sidecar = bench.CompareAB(r.Runs, r.Workloads, bench.ArmSidecarSpliced, bench.ArmSidecar, d)
	prefix := strings.TrimSuffix(filepath.Base(file), ".json")
	return r.Write(out, prefix)
}
