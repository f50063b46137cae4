// Package kerneltest sets up the kernel tier of tests: Kmesh's real programs
// loaded into this kernel, attached to a cgroup the test made, pinned under a
// bpffs directory the test made, with pods built by podnet. Everything is
// torn down by t.Cleanup, and the teardown is checked.
package kerneltest

import (
	"os"
	"path/filepath"
	"testing"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/kernel"
)

// RequireEnv names the variable CI sets so that privileged tests fail
// instead of skipping when they cannot run.
const RequireEnv = "KMESH_REQUIRE_PRIVILEGED"

// RequireRoot skips (or, under CI, fails) a test that needs root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv(RequireEnv) != "" {
		t.Fatalf("%s is set but the test runs without root: privileged tests must run", RequireEnv)
	}
	t.Skip("needs root (set " + RequireEnv + "=1 to make this a failure)")
}

// TestPinRoot is the parent of every test's pin root.
const TestPinRoot = kernel.DefaultBPFFS + "/kmesh-test"

// Env is a private Kmesh data path for one test.
type Env struct {
	Cgroup *podnet.Cgroup
	// Config is what Load uses: PinRoot and CgroupPath point at the test's
	// own, the rest may be changed between loads (a reconfigured restart).
	Config bpf.Config
	DP     *bpf.Datapath
}

// New creates a cgroup and pin root for the test and loads the data path
// there with cfg (whose PinRoot and CgroupPath it sets). Cleanup uninstalls
// it and fails the test if anything remains.
func New(t testing.TB, cfg bpf.Config) *Env {
	t.Helper()
	RequireRoot(t)
	reapOnce.Do(reapStale)
	id := newID()
	cg, err := podnet.NewCgroup("", "kmesh-test-"+id)
	if err != nil {
		t.Fatal(err)
	}
	cfg.PinRoot, cfg.CgroupPath = filepath.Join(TestPinRoot, id), cg.Path
	e := &Env{Cgroup: cg, Config: cfg}
	t.Cleanup(func() {
		if e.DP != nil {
			if err := e.DP.Uninstall(); err != nil {
				t.Errorf("uninstall: %v", err)
			}
		} else if err := bpf.RemovePins(e.Config.PinRoot); err != nil {
			t.Errorf("removing pins: %v", err)
		}
		if err := cg.Remove(); err != nil {
			t.Errorf("removing cgroup: %v", err)
		}
		if left, _ := filepath.Glob(filepath.Join(e.Config.PinRoot, "*")); len(left) > 0 {
			t.Errorf("pins left behind: %v", left)
		}
		_ = os.Remove(e.Config.PinRoot)
		_ = os.Remove(TestPinRoot) // only succeeds when no other test runs
	})
	e.DP = e.Load(t)
	return e
}

// Load loads (or reloads, as a restarted daemon does) the data path.
func (e *Env) Load(t testing.TB) *bpf.Datapath {
	t.Helper()
	dp, err := bpf.Load(e.Config)
	if err != nil {
		t.Fatalf("loading the data path: %v", err)
	}
	return dp
}
