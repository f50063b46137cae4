package xds

import (
	"bytes"
	"fmt"
	"slices"
	"strings"
	"testing"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// countingPool hands out nothing; it counts the buffers given back.
type countingPool struct{ returned int }

func (p *countingPool) Get(n int) *[]byte { b := make([]byte, n); return &b }
func (p *countingPool) Put(*[]byte)       { p.returned++ }

// split cuts msg into buffers of size n, as gRPC's receive buffers.
func split(msg []byte, n int, pool mem.BufferPool) mem.BufferSlice {
	var out mem.BufferSlice
	for len(msg) > 0 {
		k := min(n, len(msg))
		b := slices.Clone(msg[:k])
		out = append(out, mem.NewBuffer(&b, pool))
		msg = msg[k:]
	}
	return out
}

func response(t *testing.T, n int) (*discovery.DeltaDiscoveryResponse, []byte) {
	t.Helper()
	resp := &discovery.DeltaDiscoveryResponse{TypeUrl: AddressType, Nonce: "nonce-1", SystemVersionInfo: "sys",
		RemovedResources: []string{"gone-1", "gone-2"}}
	for i := range n {
		body, err := anypb.New(wrapperspb.String(strings.Repeat("x", i*397%3000)))
		if err != nil {
			t.Fatal(err)
		}
		resp.Resources = append(resp.Resources, &discovery.Resource{Name: fmt.Sprintf("res-%d", i), Version: fmt.Sprintf("%x", i*7919+1),
			Aliases: []string{"alias"}, Resource: body})
	}
	b, err := proto.Marshal(resp)
	if err != nil {
		t.Fatal(err)
	}
	return resp, b
}

func TestEnvelopeAndResourcesAcrossBuffers(t *testing.T) {
	want, msg := response(t, 40)
	for _, size := range []int{1, 2, 3, 7, 64, 1000, 5000, len(msg)} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			pool := &countingPool{}
			data := split(msg, size, pool)
			n, pooled := len(data), slices.ContainsFunc(data, func(b mem.Buffer) bool { return b.Len() >= 1<<10 })
			m := newRope(data)
			env, err := readEnvelope(m)
			if err != nil {
				t.Fatal(err)
			}
			if env.typeURL != AddressType || env.nonce != "nonce-1" || !slices.Equal(env.removed, want.RemovedResources) ||
				env.resources != len(want.Resources) || env.size != len(msg) {
				t.Fatalf("envelope %+v", env)
			}
			var versions []string
			rs := &Resources{msg: m, n: env.resources,
				onRes: func(_ string, v []byte) { versions = append(versions, string(v)) },
				onBad: func(r Rejection) { t.Errorf("rejected %v", r) }}
			i := 0
			for r := range rs.All() {
				w := want.Resources[i]
				var got wrapperspb.StringValue
				if r.Name != w.GetName() || r.TypeURL != w.GetResource().GetTypeUrl() || !bytes.Equal(r.Body, w.GetResource().GetValue()) {
					t.Fatalf("resource %d: %s %s %x", i, r.Name, r.TypeURL, r.Body)
				}
				if err := r.UnmarshalTo(&got); err != nil {
					t.Fatal(err)
				}
				if err := r.UnmarshalTo(&discovery.Resource{}); err == nil {
					t.Fatal("a body decoded as another type")
				}
				if versions[i] != w.GetVersion() {
					t.Fatalf("version %s, want %s", versions[i], w.GetVersion())
				}
				// Buffers behind the previous resource are released as the
				// iteration goes, not at the end.
				if i == len(want.Resources)-1 && size < len(msg)/4 && m.freed == 0 {
					t.Fatal("no buffer released before the last resource")
				}
				i++
			}
			if i != len(want.Resources) {
				t.Fatalf("%d resources, want %d", i, len(want.Resources))
			}
			for range rs.All() {
				t.Fatal("a second iteration yielded a resource")
			}
			if m.freed != n || slices.ContainsFunc(m.bufs, func(b []byte) bool { return b != nil }) {
				t.Fatalf("%d of %d buffers released", m.freed, n)
			}
			if pooled && pool.returned == 0 {
				t.Fatal("no buffer went back to its pool")
			}
		})
	}
}

func TestMalformedResponses(t *testing.T) {
	_, msg := response(t, 3)
	for _, cut := range []int{1, 4, len(msg) - 3, len(msg) - 1} {
		m := newRope(split(msg[:cut], 4, mem.NopBufferPool{}))
		if _, err := readEnvelope(m); err == nil {
			t.Errorf("a message cut at %d of %d bytes was read", cut, len(msg))
		}
	}
	// A resource whose own fields are broken is rejected by itself; the
	// others are handled.
	good, _ := proto.Marshal(&discovery.Resource{Name: "good", Version: "1", Resource: &anypb.Any{TypeUrl: "t/x"}})
	var b []byte
	b = protowire.AppendTag(b, 2, protowire.BytesType)
	b = protowire.AppendBytes(b, []byte{0x1a, 0x05, 'a'}) // name says 5 bytes, has 1
	b = protowire.AppendTag(b, 2, protowire.BytesType)
	b = protowire.AppendBytes(b, []byte{0x0a, 0x01, '1'}) // no name
	b = protowire.AppendTag(b, 2, protowire.BytesType)
	b = protowire.AppendBytes(b, good)
	b = protowire.AppendTag(b, 4, protowire.BytesType)
	b = protowire.AppendString(b, AddressType)
	m := newRope(split(b, 3, mem.NopBufferPool{}))
	env, err := readEnvelope(m)
	if err != nil || env.resources != 3 {
		t.Fatalf("envelope %+v, %v", env, err)
	}
	var bad []string
	rs := &Resources{msg: m, n: 3, onRes: func(string, []byte) {}, onBad: func(r Rejection) { bad = append(bad, r.String()) }}
	var names []string
	for r := range rs.All() {
		names = append(names, r.Name)
	}
	if !slices.Equal(names, []string{"good"}) || len(bad) != 2 || !strings.Contains(bad[0], "resource #0: malformed") || !strings.Contains(bad[1], "resource #1: resource without a name") {
		t.Fatalf("handled %v, rejected %v", names, bad)
	}
}

func TestVersionMap(t *testing.T) {
	var m versionMap
	for _, v := range []string{"1f3a9c", "0", "ffffffffffffffff", "v1", "01", "1F", "10000000000000000", ""} {
		m.set("r-"+v, []byte(v))
	}
	got := m.all()
	if len(got) != 8 || len(m.hashed) != 3 {
		t.Fatalf("%d versions, %d as hashes: %v", len(got), len(m.hashed), got)
	}
	for n, v := range got {
		if n != "r-"+v {
			t.Errorf("%s has version %q", n, v)
		}
	}
	prev, ok := m.set("r-v1", []byte("abc"))
	if !ok || prev.other != "v1" {
		t.Fatalf("previous version %+v", prev)
	}
	m.restore("r-v1", prev)
	if m.all()["r-v1"] != "v1" || m.len() != 8 {
		t.Fatalf("restore: %v", m.all())
	}
	m.delete("r-0")
	if _, ok := m.get("r-0"); ok || m.len() != 7 {
		t.Fatal("delete")
	}
}
