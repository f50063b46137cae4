package holder

import (
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

func TestCheck(t *testing.T) {
	v4 := SockInfo{Family: unix.AF_INET, Type: unix.SOCK_STREAM, Proto: unix.IPPROTO_TCP, Listening: true,
		Local: netip.MustParseAddrPort("127.0.0.1:15001"), Netns: 7}
	any6 := v4
	any6.Family, any6.Local = unix.AF_INET6, netip.MustParseAddrPort("[::]:15008")
	any4 := v4
	any4.Local = netip.MustParseAddrPort("0.0.0.0:15008")
	with := func(si SockInfo, f func(*SockInfo)) SockInfo { f(&si); return si }
	hbone := []string{"[::]:15008", "0.0.0.0:15008"}
	for _, tc := range []struct {
		name  string
		si    SockInfo
		addrs []string
		ok    bool
	}{
		{"the pod's 15001", v4, []string{"127.0.0.1:15001"}, true},
		{"15008 on ::", any6, hbone, true},
		{"15008 on 0.0.0.0 (a pod without IPv6)", any4, hbone, true},
		{"another namespace (the sandbox was recreated)", with(v4, func(s *SockInfo) { s.Netns = 8 }), []string{"127.0.0.1:15001"}, false},
		{"another port", v4, []string{"127.0.0.1:15006"}, false},
		{"not listening", with(v4, func(s *SockInfo) { s.Listening = false }), []string{"127.0.0.1:15001"}, false},
		{"UDP", with(v4, func(s *SockInfo) { s.Type, s.Proto = unix.SOCK_DGRAM, unix.IPPROTO_UDP }), []string{"127.0.0.1:15001"}, false},
		{"MPTCP", with(v4, func(s *SockInfo) { s.Proto = unix.IPPROTO_MPTCP }), []string{"127.0.0.1:15001"}, false},
		{"family does not match the address", with(any4, func(s *SockInfo) { s.Family = unix.AF_INET6 }), hbone, false},
	} {
		err := Check(tc.si, unix.SOCK_STREAM, tc.addrs, 7)
		if (err == nil) != tc.ok {
			t.Errorf("%s: Check = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

func TestCheckUDP(t *testing.T) {
	u := SockInfo{Family: unix.AF_INET, Type: unix.SOCK_DGRAM, Proto: unix.IPPROTO_UDP, Local: netip.MustParseAddrPort("127.0.0.1:15053"), Netns: 7}
	dns := []string{"127.0.0.1:15053"}
	if err := Check(u, unix.SOCK_DGRAM, dns, 7); err != nil {
		t.Errorf("the pod's DNS socket: %v", err)
	}
	tcp := u
	tcp.Type, tcp.Proto, tcp.Listening = unix.SOCK_STREAM, unix.IPPROTO_TCP, true
	if Check(tcp, unix.SOCK_DGRAM, dns, 7) == nil {
		t.Error("a TCP listener taken for the UDP socket")
	}
	if Check(u, unix.SOCK_STREAM, dns, 7) == nil {
		t.Error("a UDP socket taken for the TCP listener")
	}
	if Check(u, unix.SOCK_DGRAM, dns, 8) == nil {
		t.Error("another namespace's socket taken")
	}
	if Check(u, unix.SOCK_RAW, dns, 7) == nil {
		t.Error("a raw socket type accepted")
	}
}
