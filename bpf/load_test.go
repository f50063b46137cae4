package bpf_test

import (
	"os"
	"path/filepath"
	"testing"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/kerneltest"
)

func TestPrivilegedLoadAttachPin(t *testing.T) {
	env := kerneltest.New(t, bpf.Config{})
	dir := bpf.PinDir(env.Config.PinRoot)
	for _, name := range []string{"kmesh_frontend", "kmesh_service", "kmesh_endpoint", "kmesh_backend", "kmesh_managed", "links/connect4", "links/getpeername6"} {
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
	if err != nil || len(ps) != 9 {
		t.Fatalf("PinnedProgramStats = %d programs, %v; want 9 (8 sock_addr + sockops)", len(ps), err)
	}
}
