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
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"kmesh.dev/kmesh/ambient/config"
	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/ambient/dnsproxy"
	"kmesh.dev/kmesh/ambient/holder"
	"kmesh.dev/kmesh/ambient/identity"
	"kmesh.dev/kmesh/ambient/istiod"
	"kmesh.dev/kmesh/ambient/otelexport"
	"kmesh.dev/kmesh/ambient/reconcile"
	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/ambient/telemetry"
	"kmesh.dev/kmesh/ambient/tunnel"
	"kmesh.dev/kmesh/ambient/xds"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/cni/zds"
	"kmesh.dev/kmesh/kernel"
)

// Agent is one running daemon.
type Agent struct {
	cfg   *config.Config
	log   *slog.Logger
	DP    *bpf.Datapath
	Plane *dataplane.Dataplane
	Store *state.Store
	rec   *reconcile.Reconciler
	enr   *enroller
	Reg   *prometheus.Registry
	// Proxy is the tunnel (HBONE) side of the data path; IDs the workload
	// certificates (nil without a CA).
	Proxy *tunnel.Proxy
	// DNS is the DNS proxy on 15053 in every pod; nil when it is off.
	DNS *dnsproxy.Server
	IDs *identity.Manager
	// Telemetry: Istio's TCP metrics of both paths; AccessLog their
	// access log (AccessLog.Enabled switches it at runtime).
	Telemetry *telemetry.Metrics
	AccessLog *telemetry.AccessLog
	// OTel exports Reg and the tunnel's spans over OTLP when the OTEL_*
	// environment asks for it (otherwise nothing runs).
	OTel *otelexport.Exporter

	// holder keeps the pods' listeners beyond this process (nil: no
	// listener holder configured).
	holder *holder.Keeper

	caClient *identity.CAClient
	// xds follows istiod (set once started; readiness reads it meanwhile).
	xds atomic.Pointer[xds.Client]

	// enrolled and certs are the enroller and IDs once they exist (the
	// admin server, started before them, reads them).
	enrolled atomic.Pointer[enroller]
	certs    atomic.Pointer[identity.Manager]
	// proxy and kernelTel list open connections for the config dump.
	proxy     atomic.Pointer[tunnel.Proxy]
	kernelTel atomic.Pointer[telemetry.KernelReader]
	// quit is closed by the admin port's /quitquitquit (see Quit).
	quit     chan struct{}
	quitOnce sync.Once

	ready  atomic.Bool
	synced chan struct{}
	wg     sync.WaitGroup
	cancel context.CancelFunc
	// Addrs are the bound addresses of the node servers, by name.
	Addrs map[string]net.Addr
}

// Start checks the kernel, loads (or takes over) the data path, starts the
// node servers and, when configured, follows istiod. Call Close to stop.
func Start(ctx context.Context, cfg *config.Config, log *slog.Logger) (*Agent, error) {
	if err := kernel.Check(kernel.Probe()); err != nil {
		return nil, err
	}
	dp, err := bpf.Load(bpf.Config{PinRoot: cfg.PinRoot, CgroupPath: cfg.CgroupPath, Sizes: cfg.MapSizes(), NoPeerVIP: cfg.NoPeerVIP, NoConnEvents: !cfg.ConnEvents, Splice: cfg.Splice,
		SpliceBudget: cfg.SpliceBudget})
	if err != nil {
		return nil, err
	}
	if dp.Reused {
		log.Info("took over the pinned data path of a previous daemon: connections kept flowing", "pin_root", cfg.PinRoot)
	} else {
		log.Info("data path loaded and attached", "pin_root", cfg.PinRoot, "cgroup", cfg.CgroupPath)
	}
	ctx, cancel := context.WithCancel(ctx)
	a := &Agent{cfg: cfg, log: log, DP: dp, Store: state.NewStore(), Reg: prometheus.NewRegistry(),
		synced: make(chan struct{}), cancel: cancel, Addrs: map[string]net.Addr{}, quit: make(chan struct{})}
	node := reconcile.Node{Name: cfg.NodeName, Cluster: cfg.ClusterID, Network: cfg.Network, ClusterDomain: cfg.ClusterDomain}
	a.Plane = dataplane.New(dp.Maps, dataplane.Options{Node: dataplane.Topology{Node: node.Name, Cluster: node.Cluster, Network: node.Network}, Logger: log})
	if dp.Reused {
		// Adopt what the previous daemon left so that the first sync rewrites
		// only what changed; what nobody claims is swept after that sync.
		if err := a.Plane.Adopt(); err != nil {
			cancel()
			dp.Close()
			return nil, err
		}
	}
	a.rec = reconcile.New(a.Store, a.Plane, node, log)
	a.Reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), a.dataplaneCollector())
	a.Telemetry = telemetry.NewMetrics(a.Reg)
	a.AccessLog = telemetry.NewAccessLog(os.Stdout, telemetry.LogConfig{JSON: cfg.LogFormat == "json",
		Rate: float64(cfg.AccessLogRate), Enabled: cfg.AccessLog}, a.Telemetry.LogsDropped.Inc)

	fail := func(err error) (*Agent, error) {
		cancel()
		a.wg.Wait()
		// Keep what the holder has: the next attempt takes it.
		a.holder.Close(false)
		a.closeTunnel(context.Background(), 0)
		if a.DNS != nil {
			a.DNS.Close()
		}
		_ = a.OTel.Shutdown(context.Background())
		dp.Close()
		return nil, err
	}
	// Before the tunnel: its connections' spans need the tracer. A wrong
	// OTEL_* setting stops the daemon, as any other bad setting does.
	if a.OTel, err = otelexport.Start(ctx, otelexport.Config{Gatherer: a.Reg, Node: cfg.NodeName, Pod: cfg.PodName,
		Namespace: cfg.PodNamespace, Log: log}); err != nil {
		return fail(fmt.Errorf("OpenTelemetry export: %w", err))
	}
	for _, s := range []struct {
		name, addr string
		h          http.Handler
	}{
		{"readiness", cfg.ReadinessAddr, a.readinessHandler()},
		{"admin", cfg.AdminAddr, a.adminHandler()},
		{"stats", cfg.StatsAddr, a.statsHandler()},
	} {
		if err := a.serve(ctx, s.name, s.addr, s.h); err != nil {
			return fail(err)
		}
	}
	if cfg.XDSAddress == "" {
		close(a.synced)
	} else if err := a.startXDS(ctx); err != nil {
		return fail(err)
	}
	if cfg.ListenerHolder != "" {
		// Before the tunnel: it takes the listeners a crashed daemon left.
		a.holder = holder.Open(ctx, cfg.ListenerHolder, log)
	}
	a.Reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kmesh_listener_holder_connected",
		Help: "1 while the listener holder keeps the pods' listeners (they then outlive a crash of the daemon); 0 when it is not configured or not reachable."},
		func() float64 {
			if a.holder.Connected() {
				return 1
			}
			return 0
		}))
	if err := a.startTunnel(); err != nil {
		return fail(err)
	}
	if err := a.startDNS(); err != nil {
		return fail(err)
	}
	a.enr = newEnroller(a.Plane, cfg.ClusterID, &meshPods{proxy: a.Proxy, dns: a.DNS, ids: a.IDs, trustDomain: cfg.TrustDomain, pods: map[string]identity.Identity{}}, a.DP, log)
	if a.holder != nil {
		// Sockets of pods that left while no daemon ran are known only
		// after the node agent's first snapshot.
		a.enr.afterSnapshot = func() { a.holder.ReleaseInherited() }
	}
	a.enrolled.Store(a.enr)
	a.Reg.MustRegister(a.ztunnelCompatMetrics()...)
	if cfg.ZDSSocket != "" {
		zc := &zds.Client{Path: cfg.ZDSSocket, Handler: a.enr, Log: log}
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			_ = zc.Run(ctx)
		}()
	}
	if err := a.startKernelTelemetry(ctx); err != nil {
		return fail(err)
	}
	if err := a.startSidecarSplice(ctx); err != nil {
		return fail(err)
	}
	a.wg.Add(1)
	go a.retryLoop(ctx)
	a.ready.Store(true)
	return a, nil
}

// startTunnel starts the workload certificate manager (when a CA is
// configured) and the node proxy.
func (a *Agent) startTunnel() error {
	var certs tunnel.Certs = noCA{}
	if a.cfg.CAAddress != "" && !a.cfg.XDSPlaintext {
		ca, err := identity.NewCAClient(identity.CAConfig{Istiod: a.istiodConfig(a.cfg.CAAddress), TTL: a.cfg.SecretTTL})
		if err != nil {
			return err
		}
		a.IDs, err = identity.NewManager(identity.ManagerConfig{Fetcher: ca, RootFile: a.cfg.RootCertFile, Registerer: a.Reg, Log: a.log})
		if err != nil {
			ca.Close()
			return err
		}
		a.caClient = ca
		a.certs.Store(a.IDs)
		certs = a.IDs
	} else {
		a.log.Warn("no CA configured: connections that need HBONE (other nodes, waypoints) will be refused")
	}
	var held tunnel.ListenerStore
	if a.holder != nil {
		held = a.holder
	}
	p, err := tunnel.New(tunnel.Config{TrustDomain: a.cfg.TrustDomain, Network: a.cfg.Network, Dir: a.Store, Certs: certs, Listeners: held,
		Tunnels: a.DP.Maps, Picker: a.Plane, Inbound: a.DP.Maps, OwnSockets: a.DP.Maps, Ready: a.synced, Registerer: a.Reg, Log: a.log,
		Telemetry: a.Telemetry, AccessLog: a.AccessLog, Tracer: a.OTel.Tracer, Splice: a.cfg.Splice})
	if err != nil {
		return err
	}
	a.Proxy = p
	a.proxy.Store(p)
	return nil
}

// startDNS starts the DNS proxy (ztunnel's, on unless
// ISTIO_META_DNS_CAPTURE says otherwise) and sets the kernel's DNS capture:
// on with the proxy unless KMESH_DNS_KERNEL_CAPTURE is false, and off
// whenever the proxy is (the switch is pinned: a previous daemon's setting
// must not send queries to listeners that no longer exist).
func (a *Agent) startDNS() error {
	port, err := a.cfg.DNSPort()
	if err != nil {
		return err
	}
	if a.cfg.DNSEnabled() {
		up, err := dnsproxy.NewUpstream(dnsproxy.UpstreamConfig{ResolvConf: a.cfg.DNSResolvConf})
		if err != nil {
			// Mesh names still resolve; what would be forwarded gets
			// SERVFAIL (and is counted as an upstream failure).
			a.log.Error("DNS proxy without upstream: names the mesh does not know will fail", "err", err)
			up = nil
		}
		a.DNS = dnsproxy.New(dnsproxy.Config{View: a.Store, Upstream: up, Domain: a.cfg.ClusterDomain, Network: a.cfg.Network,
			Port: int(port), Metrics: dnsproxy.NewMetrics(a.Reg), Log: a.log, Source: a.canonicalOf,
			UpstreamFromPod: true, OwnSockets: a.DP.Maps, Ready: a.synced})
		if a.holder != nil {
			a.DNS.SetListeners(a.holder)
		}
		var servers []string
		if up != nil {
			servers = up.Servers()
		}
		a.log.Info("DNS proxy on", "port", port, "upstream", servers, "kernel_capture", a.cfg.DNSKernelCapture)
	}
	capture := a.cfg.DNSEnabled() && a.cfg.DNSKernelCapture
	if err := a.DP.Maps.SetDNSCapture(capture, port); err != nil {
		return fmt.Errorf("DNS capture switch: %w", err)
	}
	return nil
}

// canonicalOf names a pod's workload for the DNS metrics.
func (a *Agent) canonicalOf(workloadUID string) (string, string) {
	if w := a.Store.Workload(workloadUID); w != nil {
		m := w.Meta()
		return m.CanonicalName, m.CanonicalRevision
	}
	return "", ""
}

// startKernelTelemetry reads the kernel path's connection events into
// Istio's metrics and the access log, until ctx ends.
func (a *Agent) startKernelTelemetry(ctx context.Context) error {
	ev, err := a.DP.Maps.OpenConnEvents()
	if err != nil {
		return err
	}
	r := telemetry.NewKernelReader(telemetry.KernelConfig{Events: ev, Pods: a.enr, Dir: a.Store, Network: a.cfg.Network,
		SpliceReceived: a.DP.Maps.SpliceReceived,
		Metrics:        a.Telemetry, Log: a.AccessLog, Logger: a.log})
	a.kernelTel.Store(r)
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		r.Run(ctx)
	}()
	return nil
}

// closeTunnel hands the node proxy's listeners over for handover, drains
// its connections until ctx ends, then stops renewing certificates.
func (a *Agent) closeTunnel(ctx context.Context, handover time.Duration) {
	if a.Proxy != nil {
		a.Proxy.Close(ctx, handover)
	}
	if a.IDs != nil {
		a.IDs.Close()
	}
	if a.caClient != nil {
		a.caClient.Close()
	}
}

// istiodConfig is how the daemon reaches istiod's xDS or CA service at addr.
func (a *Agent) istiodConfig(addr string) istiod.Config {
	return istiod.Config{Addr: addr, RootFile: a.cfg.RootCertFile, ServerName: a.cfg.XDSServerName,
		TokenFile: a.cfg.TokenFile, ClusterID: a.cfg.ClusterID, Plaintext: a.cfg.XDSPlaintext}
}

func (a *Agent) startXDS(ctx context.Context) error {
	node, err := xdsNode(a.cfg, environ())
	if err != nil {
		return err
	}
	xc := xds.Config{
		Istiod: a.istiodConfig(a.cfg.XDSAddress), Node: node,
		Types: []string{xds.AddressType, xds.AuthorizationType}, Handler: a.handleXDS,
		OnSynced: func() {
			w, s, p := a.Store.Counts()
			a.log.Info("first xDS state applied to the kernel", "workloads", w, "services", s, "policies", p)
			if err := a.Plane.Sweep(); err != nil {
				a.log.Error("sweeping state left by the previous daemon", "err", err)
			}
			// The first sync decodes the whole mesh at once; hand the
			// garbage back to the node instead of keeping it as headroom.
			debug.FreeOSMemory()
			close(a.synced)
		},
		Metrics: xds.NewMetrics(a.Reg), Log: a.log,
	}
	// Fail fast on a missing root; later handshakes read it again.
	if err := xc.Istiod.Check(); err != nil {
		return err
	}
	client := xds.New(xc)
	a.xds.Store(client)
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		_ = client.Run(ctx)
	}()
	return nil
}

// retryLoop re-applies objects the kernel refused (a full map frees up when
// other services go away).
func (a *Agent) retryLoop(ctx context.Context) {
	defer a.wg.Done()
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if a.rec.Failed() > 0 {
				if errs := a.rec.Retry(); len(errs) == 0 {
					a.log.Info("objects the kernel refused earlier are applied now")
				}
			}
		}
	}
}

// Failed returns how many objects the kernel refused and wait for a retry.
func (a *Agent) Failed() int { return a.rec.Failed() }

// Synced is closed once the first full control-plane state is in the maps.
func (a *Agent) Synced() <-chan struct{} { return a.synced }

// waitingFor says why the daemon is not ready yet: the first state has
// not come from istiod, and the last attempt's error says what to check
// (xds.Client.LastError: a missing token, an untrusted certificate, an
// unreachable address, refused credentials).
func (a *Agent) waitingFor() string {
	msg := "waiting for the first control-plane state from istiod at " + a.cfg.XDSAddress
	if c := a.xds.Load(); c != nil {
		if err := c.LastError(); err != nil {
			msg += ": " + err.Error()
		}
	}
	return msg
}

func (a *Agent) readinessHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz/ready", func(w http.ResponseWriter, _ *http.Request) {
		select {
		case <-a.synced:
		default:
			http.Error(w, a.waitingFor(), http.StatusServiceUnavailable)
			return
		}
		if !a.ready.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	return mux
}

func (a *Agent) adminHandler() http.Handler {
	def, err := ParseLevel(a.cfg.LogLevel)
	if err != nil {
		def = slog.LevelInfo
	}
	ad := &admin{dump: a.dumpInput, kmesh: func() any { return a.Store.Snapshot() }, level: a.cfg.Level, def: def, log: a.log,
		quit: func() { a.quitOnce.Do(func() { close(a.quit) }) }}
	return ad.handler()
}

// Quit is closed when the admin port asks the daemon to stop
// (/quitquitquit): the caller then stops it as it would on SIGTERM.
func (a *Agent) Quit() <-chan struct{} { return a.quit }

func (a *Agent) statsHandler() http.Handler {
	mux := http.NewServeMux()
	h := promhttp.HandlerFor(a.Reg, promhttp.HandlerOpts{})
	mux.Handle("/metrics", h)
	mux.Handle("/stats/prometheus", h)
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
	a.wg.Add(2)
	go func() {
		defer a.wg.Done()
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	go func() {
		defer a.wg.Done()
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("server stopped", "server", name, "addr", addr, "err", err)
		}
	}()
	return nil
}

// handoverTime is how long a stopping daemon keeps accepting new tunnel
// connections: long enough for its successor to start and listen beside it
// (an upgrade), a part of the drain time.
func handoverTime(drain time.Duration) time.Duration {
	return min(drain/2, 3*time.Second)
}

// Close stops the daemon's work and releases its handles. The data path
// stays attached and pinned (connections keep flowing until the next
// daemon takes over), unless RemoveWhenIdle finds the node uninstalled
// (removeIfUninstalled).
//
// Connections the node proxy carries are drained for DrainDuration (an
// upgraded daemon already listens beside this one), then closed.
func (a *Agent) Close() error {
	a.ready.Store(false)
	a.cancel()
	a.wg.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), a.cfg.DrainDuration)
	defer cancel()
	// Stopping on purpose: the successor of an upgrade listens beside us
	// (SO_REUSEPORT) and takes the connections queued on our listeners
	// when we close them (tcp_migrate_req) — unless the holder still had
	// them open, queueing connections nobody accepts. Release them first.
	a.holder.Close(true)
	var dnsDone sync.WaitGroup
	if a.DNS != nil {
		dnsDone.Add(1)
		go func() {
			defer dnsDone.Done()
			a.DNS.Shutdown(handoverTime(a.cfg.DrainDuration))
		}()
	}
	a.closeTunnel(ctx, handoverTime(a.cfg.DrainDuration))
	dnsDone.Wait()
	a.flushOTel(ctx)
	a.enr.close()
	if a.cfg.RemoveWhenIdle {
		removed, err := a.removeIfUninstalled()
		switch {
		case err != nil:
			a.log.Error("removing the data path at stop failed; kmesh-daemon uninstall removes it", "err", err)
		case removed:
			a.log.Info("no pod enrolled and no newer daemon: data path detached and unpinned (uninstall)")
		}
	}
	return a.DP.Close()
}

// removeIfUninstalled removes the data path from the node when this daemon
// stops for good: no newer daemon took the pinned links over (an upgrade
// would have, before this one was stopped) and no pod is enrolled in the
// kernel (kmesh_managed is empty: uninstalling Istio takes the pods out of
// the mesh first, and istio-cni hands each removal to us over ZDS) and no
// network namespace is opted into splicing (kmesh_splice_ns: pods that keep
// a sidecar, whose spliced connections live in kmesh_splice and would lose
// the bytes queued in it). With neither, the programs act on nothing, so
// removing them changes no connection; anything else keeps the data path
// for the next daemon, as after a crash.
func (a *Agent) removeIfUninstalled() (bool, error) {
	superseded, err := a.DP.Superseded()
	if err != nil || superseded {
		return false, err
	}
	managed, err := a.DP.Maps.Managed()
	if err != nil || len(managed) > 0 {
		return false, err
	}
	spliced, err := a.DP.Maps.SpliceNamespaces()
	if err != nil || len(spliced) > 0 {
		return false, err
	}
	return true, a.DP.Uninstall()
}

// flushOTel exports the last metric values and the spans of the
// connections the drain just ended, within what is left of the drain
// deadline; at least flushFloor, taken from the margin between the drain
// and the kubelet's kill (ztunnel's: the grace period less 5 s).
func (a *Agent) flushOTel(drain context.Context) {
	if a.OTel == nil {
		return
	}
	ctx := drain
	if d, ok := drain.Deadline(); !ok || time.Until(d) < flushFloor {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(context.Background(), flushFloor)
		defer cancel()
	}
	if err := a.OTel.Shutdown(ctx); err != nil {
		a.log.Warn("OpenTelemetry export: the last export failed", "err", err)
	}
}

// flushFloor is the least time the last OpenTelemetry export gets.
const flushFloor = 2 * time.Second
