package holder

import (
	"errors"
	"strings"
	"testing"
)

func TestWireRoundTrip(t *testing.T) {
	k := Key{Pod: "0d3c6a36-1b7e-4d5e-9d8e-7f0a4c1b2e3f", Netns: 4097, Name: "15001/v4"}
	for _, m := range []Msg{
		{Op: OpPut, Key: k},
		{Op: OpDrop, Key: Key{Pod: "p", Netns: 1, Name: "15053/udp"}},
		{Op: OpDropPod, Key: Key{Pod: "p"}},
		{Op: OpList},
		{Op: OpEntry, Key: k},
		{Op: OpOK},
		{Op: OpErr, Text: "holding 65536 sockets already"},
		{Op: OpPut, Key: Key{Pod: strings.Repeat("a", MaxPod), Netns: ^uint64(0), Name: strings.Repeat("n", MaxName)}},
		{Op: OpErr, Text: strings.Repeat("x", MaxText)},
	} {
		b, err := Encode(m)
		if err != nil {
			t.Fatalf("Encode(%+v): %v", m, err)
		}
		if len(b) > MaxMsg {
			t.Fatalf("Encode(%+v): %d bytes > MaxMsg %d", m, len(b), MaxMsg)
		}
		got, err := Decode(b)
		if err != nil {
			t.Fatalf("Decode(Encode(%+v)): %v", m, err)
		}
		if got != m {
			t.Fatalf("round trip: got %+v, want %+v", got, m)
		}
	}
}

func TestWireRefuses(t *testing.T) {
	good, _ := Encode(Msg{Op: OpPut, Key: Key{Pod: "p", Netns: 7, Name: "15008"}})
	mut := func(f func(b []byte) []byte) []byte {
		b := append([]byte(nil), good...)
		return f(b)
	}
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"short header", good[:headerSize-1]},
		{"bad version", mut(func(b []byte) []byte { b[0] = 9; return b })},
		{"unknown op", mut(func(b []byte) []byte { b[1] = 99; return b })},
		{"lengths longer than the message", mut(func(b []byte) []byte { b[10] = 200; return b })},
		{"trailing bytes", append(append([]byte(nil), good...), 'x')},
		{"put without netns", mut(func(b []byte) []byte { copy(b[2:10], make([]byte, 8)); return b })},
		{"non-printable pod", mut(func(b []byte) []byte { b[headerSize] = 0; return b })},
		{"list with a key", func() []byte { b, _ := Encode(Msg{Op: OpList}); b[2] = 1; return b }()},
		{"text on put", mut(func(b []byte) []byte { b[12] = 1; return append(b, 'x') })},
		{"droppod with a name", func() []byte {
			b, _ := Encode(Msg{Op: OpDrop, Key: Key{Pod: "p", Netns: 1, Name: "n"}})
			b[1] = byte(OpDropPod)
			return b
		}()},
	} {
		if _, err := Decode(tc.b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: Decode = %v, want ErrMalformed", tc.name, err)
		}
	}
	for _, m := range []Msg{
		{Op: OpPut, Key: Key{Pod: strings.Repeat("a", MaxPod+1), Netns: 1, Name: "n"}},
		{Op: OpPut, Key: Key{Pod: "p", Netns: 1}},
		{Op: Op(0)},
	} {
		if _, err := Encode(m); !errors.Is(err, ErrMalformed) {
			t.Errorf("Encode(%+v) = %v, want ErrMalformed", m, err)
		}
	}
}

func TestCheckFDs(t *testing.T) {
	for _, tc := range []struct {
		op Op
		n  int
		ok bool
	}{
		{OpPut, 1, true}, {OpPut, 0, false}, {OpPut, 2, false},
		{OpEntry, 1, true}, {OpList, 0, true}, {OpList, 1, false},
		{OpDrop, 0, true}, {OpDropPod, 1, false}, {OpOK, 0, true},
	} {
		err := CheckFDs(Msg{Op: tc.op}, tc.n)
		if (err == nil) != tc.ok {
			t.Errorf("CheckFDs(%s, %d) = %v, want ok=%v", tc.op, tc.n, err, tc.ok)
		}
	}
}
