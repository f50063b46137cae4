package bpf_test

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/kerneltest"
)

func TestPrivilegedLoadAttachPin(t *testing.T) {
	env := kerneltest.New(t, bpf.Config{})
	dir := bpf.PinDir(env.Config.PinRoot)
	for _, name := range []string{"kmesh_frontend", "kmesh_service", "kmesh_endpoint", "kmesh_backend", "kmesh_managed", "links/connect4", "links/getpeername6", "links/getsockopt"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Errorf("pin %s: %v", name, err)
		}
	}
	if env.DP.Reused {
		t.Error("fresh pin root reported as reused")
	}
	// The programs are reachable from the pins alone (kmesh-bench and
	// kmeshctl read them that way).
	ps, err := bpf.PinnedProgramStats(env.Config.PinRoot)
	if err != nil || len(ps) != 11 {
		t.Fatalf("PinnedProgramStats = %d programs, %v; want 11 (9 sock_addr + sockops + sk_msg)", len(ps), err)
	}
}

// TestPrivilegedDumpEveryMap: what kmeshctl dump prints, from the pins
// alone, for every map of the object.
func TestPrivilegedDumpEveryMap(t *testing.T) {
	env := kerneltest.New(t, bpf.Config{})
	a := netip.MustParseAddr("10.0.2.1")
	if err := env.DP.Maps.PutBackends([]bpf.Backend{{ID: 7, Addr4: a, Capacity: 1, PathSvc: bpf.PathTunnel, PathAddr: bpf.PathWaypoint,
		PathUDP: bpf.PathPlain, PathIn: bpf.PathDirect, HBONE: true, Waypoint: true}}); err != nil {
		t.Fatal(err)
	}
	if err := env.DP.Maps.UpsertFrontends([]bpf.Frontend{{Key: bpf.FrontendKey{Addr: netip.MustParseAddr("10.96.0.1"), Port: 80, Proto: bpf.TCP},
		Kind: bpf.FrontendService, ID: 1, TargetPort: 8080, Path: bpf.PathBalance}}); err != nil {
		t.Fatal(err)
	}
	m, closeMaps, err := bpf.OpenPinned(env.Config.PinRoot)
	if err != nil {
		t.Fatal(err)
	}
	defer closeMaps()
	names, err := bpf.MapNames()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, n := range names {
		tab, err := m.Dump(n)
		if err != nil {
			t.Fatalf("%s: %v", n, err)
		}
		if len(tab.Header) == 0 && tab.Note == "" {
			t.Errorf("%s: neither columns nor a note", n)
		}
		got[n] = fmt.Sprint(tab.Rows)
	}
	if want := "[[7 10.0.2.1 - 1 0 tunnel waypoint plain direct hbone,waypoint]]"; got["kmesh_backend"] != want {
		t.Errorf("backends: %s, want %s", got["kmesh_backend"], want)
	}
	if want := "[[10.96.0.1:80/tcp service 1 8080 balance]]"; got["kmesh_frontend"] != want {
		t.Errorf("frontends: %s, want %s", got["kmesh_frontend"], want)
	}
}

// A data path that cannot attach (here: its cgroup does not exist) leaves
// no pins behind; one that was taken over is left serving.
func TestPrivilegedFailedLoadLeavesNothing(t *testing.T) {
	kerneltest.RequireRoot(t)
	root := filepath.Join(kerneltest.TestPinRoot, "failed-"+fmt.Sprint(os.Getpid()))
	t.Cleanup(func() { os.RemoveAll(root) })
	_, err := bpf.Load(bpf.Config{PinRoot: root, CgroupPath: "/sys/fs/cgroup/unified/kmesh-test-does-not-exist"})
	if err == nil {
		t.Fatal("Load attached to a cgroup that does not exist")
	}
	if left, _ := filepath.Glob(filepath.Join(bpf.PinDir(root), "*")); len(left) > 0 {
		t.Fatalf("a failed load left pins behind: %v", left)
	}

	env := kerneltest.New(t, bpf.Config{})
	cfg := env.Config
	cfg.CgroupPath = "/sys/fs/cgroup/unified/kmesh-test-does-not-exist"
	if _, err := bpf.Load(cfg); err == nil {
		t.Fatal("Load attached to a cgroup that does not exist")
	}
	if _, err := os.Stat(filepath.Join(bpf.PinDir(cfg.PinRoot), "kmesh_frontend")); err != nil {
		t.Fatalf("a failed takeover removed the serving data path: %v", err)
	}
}
