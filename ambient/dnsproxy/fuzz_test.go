package dnsproxy

import (
	"context"
	"encoding/binary"
	"testing"

	"github.com/miekg/dns"
)

// FuzzHandle feeds arbitrary messages to the server's handling (the mesh's
// names answered, no upstream): it must not panic, must answer only
// questions (never an answer, never a runt), with the question's ID, in a
// message that packs.
func FuzzHandle(f *testing.F) {
	for _, name := range []string{"cart.", "cart.shop.web.svc.cluster.local.", "x.wild.example.com.", "db-0.db.shop.svc.cluster.local.", "www.example.org."} {
		for _, qt := range []uint16{dns.TypeA, dns.TypeAAAA, dns.TypeMX} {
			q := new(dns.Msg)
			q.SetQuestion(name, qt)
			q.SetEdns0(1232, true)
			b, _ := q.Pack()
			f.Add(b)
		}
	}
	f.Add([]byte{0xbe, 0xef, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xff, 0xff})
	f.Add([]byte{1, 2, 3})
	s := New(Config{View: mesh(f)})
	pod := Pod{UID: "p", Namespace: "shop"}
	f.Fuzz(func(t *testing.T, req []byte) {
		r := s.Handle(context.Background(), pod, req, "udp")
		if r == nil {
			if len(req) >= 12 && req[2]&0x80 == 0 {
				t.Fatalf("no answer to a question-shaped message")
			}
			return
		}
		if len(req) < 12 || req[2]&0x80 != 0 {
			t.Fatalf("answered a runt or an answer")
		}
		if r.Id != binary.BigEndian.Uint16(req) || !r.Response {
			t.Fatalf("answer id %d response %v", r.Id, r.Response)
		}
		r.Truncate(udpSize(req))
		if _, err := r.Pack(); err != nil {
			t.Fatalf("answer does not pack: %v", err)
		}
	})
}
