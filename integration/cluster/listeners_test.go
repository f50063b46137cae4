package cluster

import (
	"net"
	"os"
	"testing"
)

func TestParseProcAddr(t *testing.T) {
	for in, want := range map[string]string{
		"0100007F:1F90":                         "127.0.0.1:8080",
		"00000000:0035":                         "0.0.0.0:53",
		"00000000000000000000000001000000:01BB": "[::1]:443",
		"0000000000000000FFFF00000100007F:0050": "[::ffff:127.0.0.1]:80",
	} {
		a, p, err := parseProcAddr(in)
		if err != nil {
			t.Fatal(err)
		}
		if got := net.JoinHostPort(a.String(), itoa(p)); got != want {
			t.Errorf("%s: got %s, want %s", in, got, want)
		}
	}
}

func itoa(p uint16) string { return (&net.TCPAddr{Port: int(p)}).String()[1:] }

// A loopback listener is not reported. (No test opens a socket on another
// address: the tier never listens outside loopback, not even to test this
// check; TestParseProcAddr covers telling them apart.)
func TestNonLoopbackListenersIgnoresLoopback(t *testing.T) {
	lo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lo.Close()
	bad, err := NonLoopbackListeners(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range bad {
		if b == "tcp "+lo.Addr().String() {
			t.Fatalf("%s reported as not loopback", b)
		}
	}
}
