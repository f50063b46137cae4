// Command layercheck fails when a package imports across a boundary the
// design forbids (run by make lint):
//
//   - the product (cmd/, ambient/, bpf/, kernel/, cni/, waypoint/) never
//     imports the harness (integration/): not from its code, and from its
//     tests only the fixtures listed in testFixtures;
//   - only bpf/ touches the kernel objects through github.com/cilium/ebpf,
//     with the exceptions listed in ebpfExceptions, each with its reason.
//
// An exception that no longer matches any import is reported too, so the
// lists stay true.
//
//	go run ./integration/cmd/layercheck
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sort"
	"strings"
)

const module = "kmesh.dev/kmesh"

// product holds the module's folders that ship in the binaries under cmd/.
var product = []string{"cmd", "ambient", "bpf", "kernel", "cni", "waypoint"}

// harness is the test harness: the node simulator, end-to-end tests,
// benchmarks, the demo.
const harness = "integration"

// testFixtures are the harness packages a product package's _test.go files
// may import, and why.
var testFixtures = map[string]string{
	"integration/kerneltest": "the kernel tier's setup (programs loaded into a cgroup and pin root the test made); its name says test",
	"integration/podnet": "pods made of network namespaces and cgroups, for the kernel tiers of ambient/dataplane and ambient/tunnel; " +
		"shared with the simulator, so it keeps its name for now",
	"integration/istioapps": "Istio's own HBONE client and server, for ambient/tunnel's interoperability test",
}

// ebpf is the library whose objects are the kernel's maps and programs.
const ebpf = "github.com/cilium/ebpf"

// ebpfOwners may import any package of ebpf.
var ebpfOwners = map[string]string{
	"bpf":    "owns the programs and maps: loader, typed map API, pins, links",
	"kernel": "feature probes (features.Have*, asm helper ids, one throwaway map to probe batch operations); no Kmesh object",
}

// exception lets one package import one ebpf package.
type exception struct {
	pkg, imp string // relative to the module / full import path
	tests    bool   // from _test.go files only
	why      string
}

var ebpfExceptions = []exception{
	{"integration/bench", ebpf, false, "ebpf.EnableStats: the benchmark counts the programs' run time (kernel.bpf_stats_enabled)"},
	{"ambient/dataplane", ebpf, true, "ebpf.EnableStats: the connect-program benchmark counts the program's run time"},
}

// Package is what go list says about one package.
type Package struct {
	ImportPath                         string
	Imports, TestImports, XTestImports []string
}

func main() {
	pkgs, err := list()
	if err != nil {
		fmt.Fprintln(os.Stderr, "layercheck:", err)
		os.Exit(2)
	}
	if problems := check(pkgs); len(problems) > 0 {
		for _, p := range problems {
			fmt.Fprintln(os.Stderr, "layercheck:", p)
		}
		os.Exit(1)
	}
}

func list() ([]Package, error) {
	var out, stderr bytes.Buffer
	cmd := exec.Command("go", "list", "-json=ImportPath,Imports,TestImports,XTestImports", module+"/...")
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("go list: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	var pkgs []Package
	dec := json.NewDecoder(&out)
	for {
		var p Package
		if err := dec.Decode(&p); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, fmt.Errorf("go list output: %w", err)
		}
		pkgs = append(pkgs, p)
	}
	if len(pkgs) == 0 {
		return nil, errors.New("go list found no packages")
	}
	return pkgs, nil
}

// check returns every violation and every unused exception, one sentence each.
func check(pkgs []Package) []string {
	var problems []string
	usedFixture := map[string]bool{}
	usedException := make([]bool, len(ebpfExceptions))
	for _, p := range pkgs {
		rel, ok := relative(p.ImportPath)
		if !ok {
			continue
		}
		for _, imp := range p.Imports {
			problems = append(problems, checkImport(rel, imp, false, usedFixture, usedException)...)
		}
		for _, imp := range append(append([]string{}, p.TestImports...), p.XTestImports...) {
			problems = append(problems, checkImport(rel, imp, true, usedFixture, usedException)...)
		}
	}
	for _, f := range sortedKeys(testFixtures) {
		if !usedFixture[f] {
			problems = append(problems, fmt.Sprintf("no product test imports %s/%s any more: remove it from testFixtures", module, f))
		}
	}
	for i, e := range ebpfExceptions {
		if !usedException[i] {
			problems = append(problems, fmt.Sprintf("%s/%s no longer imports %s: remove its exception from ebpfExceptions", module, e.pkg, e.imp))
		}
	}
	return dedup(problems)
}

func checkImport(rel, imp string, test bool, usedFixture map[string]bool, usedException []bool) []string {
	from := module + "/" + rel
	what := "imports"
	if test {
		what = "imports in its tests"
	}
	var problems []string
	if under(rel, product...) {
		if irel, ok := relative(imp); ok && under(irel, harness) {
			switch {
			case !test:
				problems = append(problems, fmt.Sprintf("%s imports %s: the product (%s/) must not import the test harness (%s/); "+
					"move what it needs into the product, or the caller into %s/", from, imp, strings.Join(product, "/, "), harness, harness))
			case testFixtures[irel] != "":
				usedFixture[irel] = true
			default:
				problems = append(problems, fmt.Sprintf("%s imports in its tests %s: product tests may import only the harness's test fixtures (%s); "+
					"add it there with a reason if it is one", from, imp, strings.Join(sortedKeys(testFixtures), ", ")))
			}
		}
	}
	if imp == ebpf || strings.HasPrefix(imp, ebpf+"/") {
		for owner := range ebpfOwners {
			if under(rel, owner) {
				return problems
			}
		}
		for i, e := range ebpfExceptions {
			if e.pkg == rel && e.imp == imp && (test || !e.tests) {
				usedException[i] = true
				return problems
			}
		}
		problems = append(problems, fmt.Sprintf("%s %s %s: only bpf/ uses cilium/ebpf (kernel/ for feature probes); "+
			"go through kmesh.dev/kmesh/bpf, or add an exception with its reason to ebpfExceptions", from, what, imp))
	}
	return problems
}

// relative is path inside the module, if it is one of the module's.
func relative(path string) (string, bool) {
	if path == module {
		return "", true
	}
	return strings.CutPrefix(path, module+"/")
}

// under reports whether rel is one of dirs or inside one.
func under(rel string, dirs ...string) bool {
	for _, d := range dirs {
		if rel == d || strings.HasPrefix(rel, d+"/") {
			return true
		}
	}
	return false
}

func sortedKeys(m map[string]string) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// dedup drops repeats (an import in both a package's tests and its
// external tests) and keeps the order.
func dedup(xs []string) []string {
	seen := map[string]bool{}
	out := xs[:0]
	for _, x := range xs {
		if !seen[x] {
			seen[x] = true
			out = append(out, x)
		}
	}
	return out
}
