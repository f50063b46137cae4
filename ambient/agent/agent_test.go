package agent_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"kmesh.dev/kmesh/ambient/agent"
	"kmesh.dev/kmesh/ambient/config"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/kerneltest"
)

// daemonConfig is the defaults, with the cgroup and pin root of a loaded
// data path the test owns (and uninstalls at the end); the agent takes it
// over as a restarted daemon would.
func daemonConfig(t *testing.T) *config.Config {
	t.Helper()
	env := kerneltest.New(t, bpf.Config{})
	env.DP.Close()
	cfg, err := config.Load(nil, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	cfg.CgroupPath, cfg.PinRoot = env.Config.CgroupPath, env.Config.PinRoot
	return cfg
}

func TestPrivilegedAgentLifecycle(t *testing.T) {
	cfg := daemonConfig(t)
	cfg.ReadinessAddr, cfg.AdminAddr, cfg.StatsAddr = "127.0.0.1:0", "", ""
	cfg.XDSAddress = "" // no control plane: ready once the data path is in place
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a, err := agent.Start(ctx, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if !a.DP.Reused {
		t.Error("agent did not take over the pinned data path")
	}
	resp, err := http.Get("http://" + a.Addrs["readiness"].String() + "/healthz/ready")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("readiness %d, want 200", resp.StatusCode)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	// Closing the daemon leaves the data path pinned for the next one.
	if _, err := os.Stat(bpf.PinDir(cfg.PinRoot) + "/links/connect4"); err != nil {
		t.Fatalf("daemon exit removed the data path: %v", err)
	}
}

// A daemon that cannot reach istiod says so on its readiness endpoint, with
// what to check, not only "not ready".
func TestPrivilegedAgentReadinessSaysWhy(t *testing.T) {
	cfg := daemonConfig(t)
	cfg.ReadinessAddr, cfg.AdminAddr, cfg.StatsAddr = "127.0.0.1:0", "", ""
	// A loopback port nothing listens on.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.XDSAddress = l.Addr().String()
	l.Close()
	cfg.XDSPlaintext, cfg.CAAddress, cfg.ZDSSocket = true, "", ""
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a, err := agent.Start(ctx, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	want := "waiting for the first control-plane state from istiod at " + cfg.XDSAddress
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := http.Get("http://" + a.Addrs["readiness"].String() + "/healthz/ready")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable {
			t.Fatalf("readiness %d without istiod, want 503", resp.StatusCode)
		}
		if strings.Contains(string(body), want) && strings.Contains(string(body), "is istiod running, XDS_ADDRESS right") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("readiness says %q, want the address and what to check", body)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// The admin port of a running daemon: ztunnel's /config_dump, /logging
// changing the logger the daemon was given, /quitquitquit closing Quit
// (which cmd/kmesh-daemon treats as SIGTERM).
func TestPrivilegedAgentAdmin(t *testing.T) {
	cfg := daemonConfig(t)
	cfg.ReadinessAddr, cfg.AdminAddr, cfg.StatsAddr = "", "127.0.0.1:0", ""
	cfg.XDSAddress, cfg.CAAddress, cfg.ZDSSocket = "", "", ""
	cfg.Level = new(slog.LevelVar)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a, err := agent.Start(ctx, cfg, slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: cfg.Level})))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	base := "http://" + a.Addrs["admin"].String()

	resp, err := http.Get(base + "/config_dump")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, key := range []string{`"workloads": []`, `"certificates": []`, `"workloadState": {}`} {
		if !strings.Contains(string(body), key) {
			t.Errorf("/config_dump of an empty daemon lacks %s:\n%s", key, body)
		}
	}

	resp, err = http.Post(base+"/logging?level=debug", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if cfg.Level.Level() != slog.LevelDebug {
		t.Errorf("POST /logging?level=debug left the level at %v", cfg.Level.Level())
	}

	select {
	case <-a.Quit():
		t.Fatal("Quit closed before anyone asked")
	default:
	}
	resp, err = http.Post(base+"/quitquitquit", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	select {
	case <-a.Quit():
	case <-time.After(5 * time.Second):
		t.Fatal("POST /quitquitquit did not ask the daemon to stop")
	}
}

// TestPrivilegedAgentRemoveWhenIdle: with KMESH_REMOVE_WHEN_IDLE a graceful
// stop removes the data path only when it is an uninstall — no pod enrolled
// in the kernel and no newer daemon holding the links — and keeps it for an
// upgrade or while pods are enrolled.
func TestPrivilegedAgentRemoveWhenIdle(t *testing.T) {
	start := func(t *testing.T) (*agent.Agent, *config.Config) {
		t.Helper()
		cfg := daemonConfig(t)
		cfg.ReadinessAddr, cfg.AdminAddr, cfg.StatsAddr = "", "", ""
		cfg.XDSAddress = ""
		cfg.RemoveWhenIdle = true
		a, err := agent.Start(context.Background(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
		if err != nil {
			t.Fatal(err)
		}
		return a, cfg
	}
	pinned := func(cfg *config.Config) bool {
		_, err := os.Stat(bpf.PinDir(cfg.PinRoot) + "/links/connect4")
		return err == nil
	}

	t.Run("no pod, no successor: removed", func(t *testing.T) {
		a, cfg := start(t)
		if err := a.Close(); err != nil {
			t.Fatal(err)
		}
		if pinned(cfg) {
			t.Error("the data path is still pinned after an idle stop")
		}
		if _, err := os.Stat(bpf.PinDir(cfg.PinRoot)); err == nil {
			t.Errorf("%s left behind", bpf.PinDir(cfg.PinRoot))
		}
	})
	t.Run("a pod enrolled: kept", func(t *testing.T) {
		a, cfg := start(t)
		if err := a.DP.Maps.SetManaged(12345, 1); err != nil {
			t.Fatal(err)
		}
		if err := a.Close(); err != nil {
			t.Fatal(err)
		}
		if !pinned(cfg) {
			t.Error("the data path was removed while a pod was enrolled")
		}
	})
	t.Run("a sidecar pod opted into splicing: kept", func(t *testing.T) {
		a, cfg := start(t)
		if err := a.DP.Maps.SetSpliceNS(12345, bpf.SpliceInPod); err != nil {
			t.Fatal(err)
		}
		if err := a.Close(); err != nil {
			t.Fatal(err)
		}
		if !pinned(cfg) {
			t.Error("the data path was removed while a namespace was spliced")
		}
	})
	t.Run("a newer daemon took over: kept", func(t *testing.T) {
		a, cfg := start(t)
		next, err := bpf.Load(bpf.Config{PinRoot: cfg.PinRoot, CgroupPath: cfg.CgroupPath})
		if err != nil {
			t.Fatal(err)
		}
		defer next.Close()
		if err := a.Close(); err != nil {
			t.Fatal(err)
		}
		if !pinned(cfg) {
			t.Error("the old daemon removed the data path its successor runs")
		}
		if sup, err := next.Superseded(); err != nil || sup {
			t.Errorf("the successor reports itself superseded (%v, %v)", sup, err)
		}
	})
}
