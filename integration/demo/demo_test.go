package demo

import (
	"bytes"
	"context"
	"log"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"kmesh.dev/kmesh/integration/kerneltest"
	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/integration/sim"
	"kmesh.dev/kmesh/kernel"
)

var daemonBin string

func TestMain(m *testing.M) {
	podnet.MaybeRunHelper()
	if os.Geteuid() == 0 {
		dir, err := os.MkdirTemp("", "kmesh-demo-test-")
		if err != nil {
			log.Fatal(err)
		}
		if daemonBin, err = sim.BuildDaemon(dir); err != nil {
			log.Fatal(err)
		}
		code := m.Run()
		os.RemoveAll(dir)
		os.Exit(code)
	}
	os.Exit(m.Run())
}

// The README's main job runs, reports what it promises, and leaves nothing.
func TestPrivilegedDemo(t *testing.T) {
	kerneltest.RequireRoot(t)
	var out bytes.Buffer
	if err := Run(context.Background(), Options{Out: &out, Requests: 300, DaemonBin: daemonBin}); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	re := regexp.MustCompile(`(web-\d)\s+on (node-\d)\s+(\d+)`)
	got := map[string]int{}
	for _, m := range re.FindAllStringSubmatch(out.String(), -1) {
		n, _ := strconv.Atoi(m[3])
		got[m[1]] = n
	}
	if len(got) != 3 {
		t.Fatalf("want three backends in the report, got %v\n%s", got, out.String())
	}
	for name, n := range got {
		if n < 50 || n > 150 { // 300/3 = 100 ± ~6 sd
			t.Errorf("%s served %d of 300", name, n)
		}
	}
	for _, want := range []string{`through the VIP of service web-0\s+p50\s+\d+\.\d µs`, `kernel fast path.*\s\d{3,}  \(backend on node-1\)`, `HBONE tunnel: mutual TLS.*\s\d{2,}  \(backend on node-2\)`, `outside the mesh\) → VIP: untouched by Kmesh \(ENETUNREACH\)`} {
		if !regexp.MustCompile(want).Match(out.Bytes()) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
	// Other packages' clusters may run meanwhile: look for this one's only.
	m := regexp.MustCompile(`kmesh-sim/([0-9a-f]+)/node-1`).FindSubmatch(out.Bytes())
	if m == nil {
		t.Fatalf("no pin root in the report:\n%s", out.String())
	}
	id := string(m[1])
	root, _ := kernel.Cgroup2Root()
	for _, p := range []string{filepath.Join(root, "kmesh-sim-"+id), filepath.Join(sim.PinParent, id), "/run/kmesh-sim/" + id} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("left behind: %s", p)
		}
	}
}
