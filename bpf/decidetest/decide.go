package decidetest

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"syscall"
	"unsafe"

	"github.com/cilium/ebpf"

	"kmesh.dev/kmesh/bpf"
)

// Decider runs kmesh_decide.h's decide() on a data path's maps.
type Decider struct {
	objs decideObjects
}

// Load loads the test program onto the maps of dp (every map substituted:
// the program reads exactly what the attached programs read).
func Load(dp *bpf.Datapath) (*Decider, error) {
	spec, err := loadDecide()
	if err != nil {
		return nil, err
	}
	repl := dp.MapReplacements()
	for name := range spec.Maps {
		if name[0] != '.' && repl[name] == nil {
			return nil, fmt.Errorf("the test program uses map %s that the data path does not have", name)
		}
	}
	d := &Decider{}
	if err := spec.LoadAndAssign(&d.objs, &ebpf.CollectionOptions{MapReplacements: repl}); err != nil {
		return nil, fmt.Errorf("loading the decide test program: %w", err)
	}
	return d, nil
}

// Close unloads the program.
func (d *Decider) Close() error { return d.objs.Close() }

// Decision is what decide() answered.
type Decision struct {
	// Err is the errno the connect would fail with (0: it proceeds).
	Err syscall.Errno
	// To is where the connection goes: the chosen backend when Rewritten,
	// else the destination.
	To        netip.AddrPort
	Path      bpf.Path
	Rewritten bool
	Backend   uint32
}

// Decide runs the decision for a connection to dst over proto with the
// load balancer's random numbers slot and coin.
func (d *Decider) Decide(dst netip.AddrPort, proto bpf.Proto, slot, coin uint32) (Decision, error) {
	return d.DecideFrom(0, dst, proto, slot, coin)
}

// DecideFrom is Decide for a connection from a pod whose workload has
// backend id src: a PATH_AUTHZ verdict is then finished by authz_decide, as
// the connect programs do (src 0: left as decide() answered).
func (d *Decider) DecideFrom(src uint32, dst netip.AddrPort, proto bpf.Proto, slot, coin uint32) (Decision, error) {
	var args decideDecideArgs
	args.SrcId = src
	args.Key.Addr = words(dst.Addr())
	args.Key.Port = netOrder(dst.Port())
	args.Key.Proto = uint8(proto)
	args.Rnd.Slot, args.Rnd.Coin = slot, coin
	buf := unsafe.Slice((*byte)(unsafe.Pointer(&args)), unsafe.Sizeof(args))
	out := make([]byte, len(buf))
	if _, err := d.objs.KmeshTdecide.Run(&ebpf.RunOptions{Context: buf, ContextOut: out}); err != nil {
		return Decision{}, fmt.Errorf("BPF_PROG_RUN: %w", err)
	}
	res := *(*decideDecideArgs)(unsafe.Pointer(&out[0]))
	var dec Decision
	if res.Ret < 0 {
		dec.Err = syscall.Errno(-res.Ret)
	}
	dec.To = netip.AddrPortFrom(addr(res.Out.Addr), hostOrder(res.Out.Port))
	dec.Path = bpf.Path(res.Out.Path)
	dec.Rewritten = res.Out.Rewritten != 0
	dec.Backend = res.Out.BackendId
	return dec, nil
}

// HammerResult counts what Hammer's decisions came to.
type HammerResult struct {
	OK, Refused, Foreign uint32
	// LastForeign is the last foreign decision's destination.
	LastForeign netip.AddrPort
}

// Hammer runs the decision for dst (TCP) runs times inside the kernel with
// random numbers, waiting window bpf_loop iterations between every lookup
// and the copy of what it found (so that a writer on another CPU reuses
// elements meanwhile). A decision is OK when it rewrote dst to an IPv4
// address in [lo, hi] and port; refused when decide() failed; foreign
// otherwise — a destination the service never had.
func (d *Decider) Hammer(dst netip.AddrPort, lo, hi netip.Addr, port uint16, runs, window uint32) (HammerResult, error) {
	var args decideHammerArgs
	args.Key.Addr = words(dst.Addr())
	args.Key.Port = netOrder(dst.Port())
	args.Key.Proto = uint8(bpf.TCP)
	args.Lo, args.Hi = hostWord(lo), hostWord(hi)
	args.Port, args.Runs, args.Window = port, runs, window
	buf := unsafe.Slice((*byte)(unsafe.Pointer(&args)), unsafe.Sizeof(args))
	out := make([]byte, len(buf))
	if _, err := d.objs.KmeshThammer.Run(&ebpf.RunOptions{Context: buf, ContextOut: out}); err != nil {
		return HammerResult{}, fmt.Errorf("BPF_PROG_RUN: %w", err)
	}
	res := *(*decideHammerArgs)(unsafe.Pointer(&out[0]))
	var a [4]byte
	binary.NativeEndian.PutUint32(a[:], res.ForeignAddr)
	return HammerResult{OK: res.Ok, Refused: res.Refused, Foreign: res.Foreign,
		LastForeign: netip.AddrPortFrom(netip.AddrFrom4(a), hostOrder(res.ForeignPort))}, nil
}

// hostWord is an IPv4 address as a host-order number.
func hostWord(a netip.Addr) uint32 {
	b := a.Unmap().As4()
	return binary.BigEndian.Uint32(b[:])
}

// words lays an address out as the C struct holds it: 16 network-order
// bytes (IPv4 v4-mapped) read as native-endian words.
func words(a netip.Addr) [4]uint32 {
	b := a.As16()
	var w [4]uint32
	for i := range w {
		w[i] = binary.NativeEndian.Uint32(b[i*4:])
	}
	return w
}

func addr(w [4]uint32) netip.Addr {
	var b [16]byte
	for i := range w {
		binary.NativeEndian.PutUint32(b[i*4:], w[i])
	}
	return netip.AddrFrom16(b).Unmap()
}

func netOrder(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

func hostOrder(p uint16) uint16 { return netOrder(p) }
