package freeport

import (
	"net"
	"strconv"
	"testing"
)

// TestPort: ports come from below the ephemeral range, are free, and a
// held one is not handed out again while it is held.
func TestPort(t *testing.T) {
	hi := ephemeralLow()
	held := map[int]net.Listener{}
	defer func() {
		for _, l := range held {
			l.Close()
		}
	}()
	for range 50 {
		p, err := Port()
		if err != nil {
			t.Fatal(err)
		}
		if hi-lowest >= 1000 && (p < lowest || p >= hi) {
			t.Fatalf("port %d outside [%d, %d)", p, lowest, hi)
		}
		if _, dup := held[p]; dup {
			t.Fatalf("port %d handed out while held", p)
		}
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
		if err != nil {
			t.Fatalf("port %d not free: %v", p, err)
		}
		held[p] = l
	}
}
