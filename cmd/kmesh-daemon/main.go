// Command kmesh-daemon is Kmesh's node agent: it replaces ztunnel on a node.
// It also accepts ztunnel's invocation ("proxy ztunnel") so that it can run
// in ztunnel's DaemonSet slot unchanged.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"

	"github.com/spf13/pflag"

	"kmesh.dev/kmesh/ambient/agent"
	"kmesh.dev/kmesh/ambient/config"
	"kmesh.dev/kmesh/ambient/holder"
	"kmesh.dev/kmesh/bpf"
)

const usage = `kmesh-daemon [run | proxy ztunnel | uninstall] [flags]

  run            (default) load the data path and follow the control plane
  proxy ztunnel  the same, as invoked in ztunnel's DaemonSet
  uninstall      detach the programs and remove all pinned state from this node
  hold           run the listener holder on --listener-holder: keep the pods'
                 listening sockets while the daemon restarts (a container of its
                 own beside the daemon's, sharing the socket's directory)
`

func main() {
	// First: the runtime's monitor thread must not park (sysmon.go).
	sysmonErr := reexecForSysmon()
	fs := pflag.NewFlagSet("kmesh-daemon", pflag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(os.Stderr, usage, fs.FlagUsages()) }
	config.Flags(fs)
	if err := fs.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	cfg, err := config.Load(fs, os.Getenv)
	if err != nil {
		fatal(err)
	}
	// The level lives in a LevelVar the admin port's /logging changes.
	cfg.Level = new(slog.LevelVar)
	cfg.Level.Set(level(cfg.LogLevel))
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: cfg.Level}))
	slog.SetDefault(log)
	if sysmonErr != nil {
		log.Warn("running with the Go runtime's default sysmon: re-executing with GODEBUG="+sysmonSchedtrace+" failed", "err", sysmonErr)
	}

	switch cmd := strings.Join(fs.Args(), " "); cmd {
	case "", "run", "proxy ztunnel":
		err = run(cfg, log)
	case "uninstall":
		err = uninstall(cfg)
	case "hold":
		err = hold(cfg, log)
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n\n", cmd)
		fs.Usage()
		os.Exit(2)
	}
	if err != nil {
		fatal(err)
	}
}

func run(cfg *config.Config, log *slog.Logger) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// ztunnel's worker threads: a node proxy shares the node with its pods.
	// An explicit GOMAXPROCS in the environment wins.
	if cfg.WorkerThreads > 0 && os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(int(min(cfg.WorkerThreads, uint32(runtime.NumCPU()))))
	}
	// The daemon holds the whole mesh: collect sooner than Go's default.
	// GOGC and GOMEMLIMIT in the environment win.
	agent.SetMemoryPolicy(os.Getenv, log)
	a, err := agent.Start(ctx, cfg, log)
	if err != nil {
		return err
	}
	log.Info("kmesh-daemon running")
	// The admin port's /quitquitquit stops the daemon the way SIGTERM does.
	select {
	case <-ctx.Done():
	case <-a.Quit():
	}
	log.Info("shutting down; the kernel data path stays in place")
	return a.Close()
}

// hold runs the listener holder until SIGTERM or SIGINT. It has no mesh
// logic: it keeps the sockets the daemon gives it, gives them back to the
// next daemon, and drops them when told (holder.Server). Exiting closes
// its copies; the daemon's own stay open.
func hold(cfg *config.Config, log *slog.Logger) error {
	if cfg.ListenerHolder == "" {
		return fmt.Errorf("hold needs the socket path: --listener-holder or KMESH_LISTENER_HOLDER")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	runtime.GOMAXPROCS(1)
	l, err := holder.Listen(cfg.ListenerHolder)
	if err != nil {
		return fmt.Errorf("listener holder: %w", err)
	}
	s := &holder.Server{Log: log.With("component", "holder")}
	defer s.Close()
	log.Info("listener holder running", "socket", cfg.ListenerHolder)
	return s.Serve(ctx, l)
}

func uninstall(cfg *config.Config) error {
	dp, err := bpf.Load(bpf.Config{PinRoot: cfg.PinRoot, CgroupPath: cfg.CgroupPath, Sizes: cfg.MapSizes()})
	if err != nil {
		return err
	}
	if err := dp.Uninstall(); err != nil {
		return err
	}
	fmt.Println("kmesh data path detached and unpinned")
	return nil
}

// level reads LOG_LEVEL in ztunnel's words (agent.ParseLevel: trace and
// off too); an unknown one is info.
func level(s string) slog.Level {
	l, err := agent.ParseLevel(s)
	if err != nil {
		return slog.LevelInfo
	}
	return l
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "kmesh-daemon:", err)
	os.Exit(1)
}
