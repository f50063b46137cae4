package tunnel

import (
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

func TestCheckHeld(t *testing.T) {
	v4 := sockInfo{family: unix.AF_INET, typ: unix.SOCK_STREAM, proto: unix.IPPROTO_TCP, listening: true,
		local: netip.MustParseAddrPort("127.0.0.1:15001"), netns: 7}
	any6 := v4
	any6.family, any6.local = unix.AF_INET6, netip.MustParseAddrPort("[::]:15008")
	any4 := v4
	any4.local = netip.MustParseAddrPort("0.0.0.0:15008")
	with := func(si sockInfo, f func(*sockInfo)) sockInfo { f(&si); return si }
	hbone := []string{"[::]:15008", "0.0.0.0:15008"}
	for _, tc := range []struct {
		name  string
		si    sockInfo
		addrs []string
		ok    bool
	}{
		{"the pod's 15001", v4, []string{"127.0.0.1:15001"}, true},
		{"15008 on ::", any6, hbone, true},
		{"15008 on 0.0.0.0 (a pod without IPv6)", any4, hbone, true},
		{"another namespace (the sandbox was recreated)", with(v4, func(s *sockInfo) { s.netns = 8 }), []string{"127.0.0.1:15001"}, false},
		{"another port", v4, []string{"127.0.0.1:15006"}, false},
		{"not listening", with(v4, func(s *sockInfo) { s.listening = false }), []string{"127.0.0.1:15001"}, false},
		{"UDP", with(v4, func(s *sockInfo) { s.typ, s.proto = unix.SOCK_DGRAM, unix.IPPROTO_UDP }), []string{"127.0.0.1:15001"}, false},
		{"MPTCP", with(v4, func(s *sockInfo) { s.proto = unix.IPPROTO_MPTCP }), []string{"127.0.0.1:15001"}, false},
		{"family does not match the address", with(any4, func(s *sockInfo) { s.family = unix.AF_INET6 }), hbone, false},
	} {
		err := checkHeld(tc.si, tc.addrs, 7)
		if (err == nil) != tc.ok {
			t.Errorf("%s: checkHeld = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}
