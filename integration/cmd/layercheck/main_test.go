package main

import (
	"strings"
	"testing"
)

// baseline imports every listed fixture and exception once, so only the
// case under test can produce a problem.
func baseline() []Package {
	return []Package{
		{ImportPath: module + "/ambient/tunnel", XTestImports: []string{module + "/integration/kerneltest", module + "/integration/podnet", module + "/integration/istioapps"}},
		{ImportPath: module + "/integration/bench", Imports: []string{ebpf}},
		{ImportPath: module + "/ambient/dataplane", XTestImports: []string{ebpf}},
	}
}

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		name string
		pkg  Package
		want string // a substring of the one problem; "" for none
	}{
		{"kmeshctl links the demo",
			Package{ImportPath: module + "/cmd/kmeshctl", Imports: []string{module + "/integration/demo"}},
			"kmesh.dev/kmesh/cmd/kmeshctl imports kmesh.dev/kmesh/integration/demo: the product"},
		{"product code may not use even a test fixture",
			Package{ImportPath: module + "/ambient/agent", Imports: []string{module + "/integration/kerneltest"}},
			"ambient/agent imports kmesh.dev/kmesh/integration/kerneltest: the product"},
		{"a product test may use a listed fixture",
			Package{ImportPath: module + "/bpf", XTestImports: []string{module + "/integration/kerneltest"}}, ""},
		{"a product test may not use the simulator",
			Package{ImportPath: module + "/ambient/xds", TestImports: []string{module + "/integration/sim"}},
			"ambient/xds imports in its tests kmesh.dev/kmesh/integration/sim: product tests may import only"},
		{"the harness may import the harness",
			Package{ImportPath: module + "/integration/demo", Imports: []string{module + "/integration/sim"}}, ""},
		{"the harness may import the product",
			Package{ImportPath: module + "/integration/sim", Imports: []string{module + "/ambient/agent"}}, ""},
		{"bpf owns cilium/ebpf",
			Package{ImportPath: module + "/bpf", Imports: []string{ebpf, ebpf + "/link"}, TestImports: []string{ebpf + "/btf"}}, ""},
		{"kernel probes features",
			Package{ImportPath: module + "/kernel", Imports: []string{ebpf + "/features", ebpf + "/asm"}}, ""},
		{"maps outside bpf",
			Package{ImportPath: module + "/ambient/reconcile", Imports: []string{ebpf}},
			"ambient/reconcile imports github.com/cilium/ebpf: only bpf/ uses cilium/ebpf"},
		{"a subpackage of ebpf outside bpf",
			Package{ImportPath: module + "/ambient/tunnel", Imports: []string{ebpf + "/link"}},
			"ambient/tunnel imports github.com/cilium/ebpf/link"},
		{"an exception covers one import only",
			Package{ImportPath: module + "/integration/bench", Imports: []string{ebpf + "/link"}},
			"integration/bench imports github.com/cilium/ebpf/link"},
		{"a test-only exception does not cover the code",
			Package{ImportPath: module + "/ambient/dataplane", Imports: []string{ebpf}},
			"ambient/dataplane imports github.com/cilium/ebpf: only bpf/"},
		{"other modules are not checked",
			Package{ImportPath: "example.com/x", Imports: []string{module + "/integration/demo", ebpf}}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := check(append(baseline(), tc.pkg))
			switch {
			case tc.want == "" && len(got) != 0:
				t.Fatalf("want no problem, got %q", got)
			case tc.want != "" && (len(got) != 1 || !strings.Contains(got[0], tc.want)):
				t.Fatalf("want one problem containing %q, got %q", tc.want, got)
			}
		})
	}
}

// Exceptions that nothing needs any more are reported, so the lists do not
// outlive their reasons.
func TestCheckReportsUnusedExceptions(t *testing.T) {
	got := check([]Package{{ImportPath: module + "/ambient/tunnel", XTestImports: []string{module + "/integration/kerneltest"}}})
	want := []string{"integration/istioapps any more: remove it from testFixtures", "integration/podnet any more: remove it from testFixtures",
		"integration/bench no longer imports github.com/cilium/ebpf", "ambient/dataplane no longer imports github.com/cilium/ebpf"}
	if len(got) != len(want) {
		t.Fatalf("got %q", got)
	}
	for i, w := range want {
		if !strings.Contains(got[i], w) {
			t.Errorf("problem %d: %q, want %q", i, got[i], w)
		}
	}
}
