package bpf

import (
	"bufio"
	"crypto/sha256"
	"flag"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf/btf"
)

var updateABI = flag.Bool("update-abi", false, "record the ABI fingerprint of a new pin layout in abi.lock")

// mapFingerprints renders what each pinned map's compatibility depends on
// — type, flags, key and value layout, recursively — by map name.
// max_entries is left out: it is configuration, and a size change is caught
// at load (ErrMapIncompatible) with its own message.
func mapFingerprints(t *testing.T) map[string]string {
	spec, err := loadSockAddr()
	if err != nil {
		t.Fatal(err)
	}
	names, err := MapNames()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, name := range names {
		ms := spec.Maps[name]
		out[name] = fmt.Sprintf("map %s type=%s flags=%#x key=%d value=%d\n  key   %s\n  value %s\n",
			name, ms.Type, ms.Flags, ms.KeySize, ms.ValueSize, renderType(ms.Key), renderType(ms.Value))
	}
	return out
}

func renderType(t btf.Type) string {
	switch t := btf.UnderlyingType(t).(type) {
	case nil:
		return "none"
	case *btf.Struct:
		var ms []string
		for _, m := range t.Members {
			ms = append(ms, fmt.Sprintf("%s@%d:%s", m.Name, m.Offset.Bytes(), renderType(m.Type)))
		}
		return fmt.Sprintf("struct %s(%d){%s}", t.Name, t.Size, strings.Join(ms, " "))
	case *btf.Array:
		return fmt.Sprintf("%s[%d]", renderType(t.Type), t.Nelems)
	case *btf.Int:
		return fmt.Sprintf("int%d%s", t.Size*8, map[bool]string{true: "s", false: "u"}[t.Encoding == btf.Signed])
	default:
		sz, _ := btf.Sizeof(t)
		return fmt.Sprintf("%T(%d)", t, sz)
	}
}

// TestABIFingerprint ties the layout of every pinned map to PinLayout: a
// map's key or value, type or flags changed, or a map removed, without
// bumping PinLayout fails here, because a daemon of the new version would
// reuse the old pins and read them with the new layout. A map ADDED to the
// current layout is compatible — an older daemon of the layout never opens
// its pin, a newer one creates it beside the others — so it is recorded
// without a new layout.
//
// abi.lock holds, per layout, one line per map ("v5 kmesh_frontend
// <sha256>"); layouts before per-map records keep one hash of all maps
// ("v3 <sha256>"). After bumping PinLayout or adding a map, run
//
//	go test ./bpf -run TestABIFingerprint -update-abi
//
// to record it.
func TestABIFingerprint(t *testing.T) {
	maps := mapFingerprints(t)
	const lock = "abi.lock"
	recorded := map[string]string{} // the current layout's maps
	var lines []string
	if f, err := os.Open(lock); err == nil {
		s := bufio.NewScanner(f)
		for s.Scan() {
			f := strings.Fields(s.Text())
			var layout int
			if len(f) < 2 || len(f) > 3 {
				continue
			}
			if _, err := fmt.Sscanf(f[0], "v%d", &layout); err != nil {
				continue
			}
			lines = append(lines, s.Text())
			if layout == PinLayout && len(f) == 3 {
				recorded[f[1]] = f[2]
			}
		}
		f.Close()
	}
	var changed, removed, added []string
	for name, render := range maps {
		sum := fmt.Sprintf("%x", sha256.Sum256([]byte(render)))
		switch h, ok := recorded[name]; {
		case !ok:
			added = append(added, fmt.Sprintf("v%d %s %s", PinLayout, name, sum))
		case h != sum:
			changed = append(changed, render)
		}
	}
	for name := range recorded {
		if maps[name] == "" {
			removed = append(removed, name)
		}
	}
	slices.Sort(changed)
	if len(changed) > 0 || len(removed) > 0 {
		t.Fatalf("the maps' ABI changed but PinLayout is still %d: bump PinLayout in loader.go (a daemon would "+
			"otherwise reuse pins of the old layout), then record it with -update-abi. Removed: %v. Changed, now:\n%s",
			PinLayout, removed, strings.Join(changed, ""))
	}
	if len(added) == 0 {
		return
	}
	if !*updateABI {
		t.Fatalf("%s has no fingerprint for maps of pin layout %d: run go test ./bpf -run TestABIFingerprint -update-abi and commit it:\n%s",
			lock, PinLayout, strings.Join(added, "\n"))
	}
	lines = append(lines, added...)
	slices.Sort(lines)
	if err := os.WriteFile(lock, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestEveryMapDecodes: every map of the object has a decoder for
// kmeshctl dump, and every decoder a map.
func TestEveryMapDecodes(t *testing.T) {
	names, err := MapNames()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if dumpers[n] == nil {
			t.Errorf("map %s has no decoder in dump.go", n)
		}
	}
	for n := range dumpers {
		if !slices.Contains(names, n) {
			t.Errorf("decoder for %s, which the object does not have", n)
		}
	}
}
