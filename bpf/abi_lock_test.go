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

// abiFingerprint renders what a pinned map's compatibility depends on —
// type, flags, key and value layout, recursively — for every map of the
// object. max_entries is left out: it is configuration, and a size change
// is caught at load (ErrMapIncompatible) with its own message.
func abiFingerprint(t *testing.T) string {
	spec, err := loadSockAddr()
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	names, err := MapNames()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		ms := spec.Maps[name]
		fmt.Fprintf(&b, "map %s type=%s flags=%#x key=%d value=%d\n", name, ms.Type, ms.Flags, ms.KeySize, ms.ValueSize)
		fmt.Fprintf(&b, "  key   %s\n  value %s\n", renderType(ms.Key), renderType(ms.Value))
	}
	return b.String()
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
// map's key or value, type or flags changed without bumping PinLayout
// fails here, because a daemon of the new version would reuse the old
// pins and read them with the new layout. abi.lock holds one fingerprint
// per layout; after bumping PinLayout, run
//
//	go test ./bpf -run TestABIFingerprint -update-abi
//
// to record the new layout's.
func TestABIFingerprint(t *testing.T) {
	render := abiFingerprint(t)
	sum := fmt.Sprintf("%x", sha256.Sum256([]byte(render)))
	const lock = "abi.lock"
	recorded := map[int]string{}
	var lines []string
	if f, err := os.Open(lock); err == nil {
		s := bufio.NewScanner(f)
		for s.Scan() {
			var layout int
			var h string
			if _, err := fmt.Sscanf(s.Text(), "v%d %s", &layout, &h); err == nil {
				recorded[layout] = h
				lines = append(lines, s.Text())
			}
		}
		f.Close()
	}
	got, ok := recorded[PinLayout]
	switch {
	case ok && got == sum:
	case ok:
		t.Fatalf("the maps' ABI changed but PinLayout is still %d: bump PinLayout in loader.go (a daemon would "+
			"otherwise reuse pins of the old layout), then record it with -update-abi. The ABI now:\n%s", PinLayout, render)
	case *updateABI:
		for layout, h := range recorded {
			if h == sum {
				t.Fatalf("layout %d already has this ABI: no need for a new layout", layout)
			}
		}
		lines = append(lines, fmt.Sprintf("v%d %s", PinLayout, sum))
		slices.Sort(lines)
		if err := os.WriteFile(lock, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	default:
		t.Fatalf("%s has no fingerprint for pin layout %d: run go test ./bpf -run TestABIFingerprint -update-abi and commit it", lock, PinLayout)
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
