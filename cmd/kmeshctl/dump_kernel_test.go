package main

import (
	"encoding/json"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/kerneltest"
)

// kmeshctl dump on a real data path's pins, in each format: every map the
// object has comes out, decoded.
func TestPrivilegedKmeshctlDump(t *testing.T) {
	env := kerneltest.New(t, bpf.Config{})
	names, err := bpf.MapNames()
	if err != nil {
		t.Fatal(err)
	}
	root := env.Config.PinRoot

	out, err := run(t, "dump", "--pin-root", root)
	if err != nil {
		t.Fatalf("dump: %v\n%s", err, out)
	}
	for _, n := range names {
		if !strings.Contains(out, "# "+n+" (") {
			t.Errorf("dump (table) lacks %s:\n%s", n, out)
		}
	}

	out, err = run(t, "dump", "--pin-root", root, "-o", "json")
	var maps []mapDump
	if err != nil || json.Unmarshal([]byte(out), &maps) != nil || len(maps) != len(names) {
		t.Fatalf("dump -o json: %v, %d maps for %d names\n%s", err, len(maps), len(names), out)
	}
	for i, m := range maps {
		if m.Map != names[i] || (m.Entries == nil && m.Note == "") {
			t.Errorf("map %d: %q with %d entries, note %q; want %s", i, m.Map, len(m.Entries), m.Note, names[i])
		}
	}

	out, err = run(t, "dump", "frontend", "--pin-root", root, "-o", "yaml")
	if err != nil {
		t.Fatalf("dump frontend -o yaml: %v\n%s", err, out)
	}
	raw, err := yaml.YAMLToJSON([]byte(out))
	if err != nil || json.Unmarshal(raw, &maps) != nil || len(maps) != 1 || maps[0].Map != "kmesh_frontend" {
		t.Errorf("dump frontend -o yaml: %v\n%s", err, out)
	}
}
