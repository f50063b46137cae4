package bpf

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
	"time"
)

// TestDecodeConnEvent encodes a record field by field (as the C struct
// lies in memory, native order) and checks every field comes back: the
// decoder copies the bytes onto the struct, so a layout slip shows here.
func TestDecodeConnEvent(t *testing.T) {
	v := sockOpsConnEvent{SockCookie: 0x1122334455667788, NetnsCookie: 42, TsNs: 5e9, BytesAcked: 1000, BytesReceived: 2000,
		LocalPort: 0x901f /* 8080 network order */, RemotePort: 0x409c /* 40000 */, OrigPort: 0x5000, /* 80 */
		Kind: uint8(ConnClose), Direction: uint8(ConnInbound), OldState: TCPFinWait2, BackendId: 7}
	v.LocalAddr = [4]uint32{0, 0, 0xffff0000, 0x0b01f40a}  // ::ffff:10.244.1.11
	v.RemoteAddr = [4]uint32{0, 0, 0xffff0000, 0x0201f40a} // ::ffff:10.244.1.2
	v.OrigAddr = [4]uint32{0, 0, 0xffff0000, 0x1e00600a}   // ::ffff:10.96.0.30
	var buf bytes.Buffer
	if err := binary.Write(&buf, binary.NativeEndian, &v); err != nil {
		t.Fatal(err)
	}
	got, err := DecodeConnEvent(buf.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	want := ConnEvent{Kind: ConnClose, Direction: ConnInbound, SockCookie: 0x1122334455667788, NetnsCookie: 42,
		Time: 5 * time.Second, BytesAcked: 1000, BytesReceived: 2000,
		Local:    netip.MustParseAddrPort("10.244.1.11:8080"),
		Remote:   netip.MustParseAddrPort("10.244.1.2:40000"),
		Dialled:  netip.MustParseAddrPort("10.96.0.30:80"),
		OldState: TCPFinWait2, BackendID: 7}
	if got != want {
		t.Fatalf("decoded\n%+v\nwant\n%+v", got, want)
	}
	if _, err := DecodeConnEvent(buf.Bytes()[:connEventSize-1]); err == nil {
		t.Fatal("a short record decoded")
	}
}
