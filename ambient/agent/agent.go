// Package agent wires the node daemon together: kernel checks, the data
// path, the control-plane state that drives it, and the node-level servers
// (readiness, admin, metrics). It holds no decision logic of its own.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"kmesh.dev/kmesh/ambient/config"
	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/kernel"
)

// Agent is one running daemon.
type Agent struct {
	cfg   *config.Config
	log   *slog.Logger
	DP    *bpf.Datapath
	Plane *dataplane.Dataplane
	ready atomic.Bool
	// Addrs are the bound addresses of the node servers, by name.
	Addrs map[string]net.Addr
}

// Start checks the kernel, loads (or takes over) the data path and starts
// the node servers. The caller runs Wait and then Close.
func Start(ctx context.Context, cfg *config.Config, log *slog.Logger) (*Agent, error) {
	if err := kernel.Check(kernel.Probe()); err != nil {
		return nil, err
	}
	dp, err := bpf.Load(bpf.Config{PinRoot: cfg.PinRoot, CgroupPath: cfg.CgroupPath, Sizes: cfg.MapSizes(), NoPeerVIP: cfg.NoPeerVIP})
	if err != nil {
		return nil, err
	}
	if dp.Reused {
		log.Info("took over the pinned data path of a previous daemon: connections kept flowing", "pin_root", cfg.PinRoot)
	} else {
		log.Info("data path loaded and attached", "pin_root", cfg.PinRoot, "cgroup", cfg.CgroupPath)
	}
	a := &Agent{cfg: cfg, log: log, DP: dp, Addrs: map[string]net.Addr{}}
	a.Plane = dataplane.New(dp.Maps, dataplane.Options{Node: dataplane.Topology{Node: cfg.NodeName, Cluster: cfg.ClusterID, Network: cfg.Network}, Logger: log})
	if err := a.serve(ctx, "readiness", cfg.ReadinessAddr, a.readinessHandler()); err != nil {
		dp.Close()
		return nil, err
	}
	a.ready.Store(true)
	return a, nil
}

func (a *Agent) readinessHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz/ready", func(w http.ResponseWriter, _ *http.Request) {
		if !a.ready.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	return mux
}

// serve listens on addr (skipped when empty) and serves h until ctx ends.
func (a *Agent) serve(ctx context.Context, name, addr string, h http.Handler) error {
	if addr == "" {
		return nil
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("%s server: listening on %s: %w", name, addr, err)
	}
	a.Addrs[name] = l.Addr()
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("server stopped", "addr", addr, "err", err)
		}
	}()
	return nil
}

// Close releases the daemon's handles. The data path stays attached and
// pinned: connections keep flowing until the next daemon takes over.
func (a *Agent) Close() error {
	a.ready.Store(false)
	return a.DP.Close()
}
