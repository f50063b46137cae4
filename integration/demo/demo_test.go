package demo

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"kmesh.dev/kmesh/integration/kerneltest"
	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/kernel"
)

func TestMain(m *testing.M) {
	podnet.MaybeRunHelper()
	os.Exit(m.Run())
}

func TestPrivilegedDemo(t *testing.T) {
	kerneltest.RequireRoot(t)
	var out bytes.Buffer
	if err := Run(context.Background(), Options{Out: &out, Connections: 600}); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	// Every backend served a plausible share (600/3 = 200 ± 6 sd of 11.5).
	re := regexp.MustCompile(`(web-\d)\s+(\d+)`)
	got := map[string]int{}
	for _, m := range re.FindAllStringSubmatch(out.String(), -1) {
		n, _ := strconv.Atoi(m[2])
		got[m[1]] = n
	}
	if len(got) != 3 {
		t.Fatalf("want three backends in the report, got %v\n%s", got, out.String())
	}
	for name, n := range got {
		if n < 130 || n > 270 {
			t.Errorf("%s served %d of 600", name, n)
		}
	}
	if !regexp.MustCompile(`via VIP \(Kmesh kernel\) p50\s+\d+\.\d µs`).Match(out.Bytes()) {
		t.Errorf("no latency line in the report:\n%s", out.String())
	}
	// Nothing left behind.
	root, err := kernel.Cgroup2Root()
	if err != nil {
		t.Fatal(err)
	}
	if left, _ := filepath.Glob(filepath.Join(root, "kmesh-demo-*")); len(left) > 0 {
		t.Errorf("cgroups left behind: %v", left)
	}
	if left, _ := filepath.Glob(pinParent + "/*"); len(left) > 0 {
		t.Errorf("pins left behind: %v", left)
	}
}
