package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/kernel"
)

// PinLayout versions the layout of maps and links under the pin root. A
// daemon only reuses pins of its own layout; bump it whenever a map's key,
// value, type or flags change (kmesh_abi.h) or a map is removed. Adding a
// map is compatible and keeps the layout (TestABIFingerprint): daemons of
// the same layout that predate it never open its pin.
//
// Layout 2: tunnel redirect (sock_orig gained flags and peer, kmesh_tunnel,
// the sockops program), waypoint flags instead of waypoint ids.
// Layout 3: path verdicts (frontend_value.path, backend_value.path_*,
// sock_orig.path and tunnel_value.path instead of flags).
// Layout 4: inbound enforcement (backend_value.path_in, kmesh_inproxy,
// links/inbound/<netns cookie>); the values the connect decision reads
// carry their own key's identity (element reuse since Linux 6.1,
// kmesh_maps.h); unconnected UDP state in socket storage (kmesh_udp)
// instead of two LRU maps. Later, within layout 4: kmesh_events (the
// kernel-path connection events' ring buffer), added.
const PinLayout = 4

// DefaultPinRoot is where a node's daemon pins maps and links.
const DefaultPinRoot = "/sys/fs/bpf/kmesh"

// MapSizes sets max_entries of the sized maps. Zero keeps the default
// compiled into the object.
type MapSizes struct {
	Managed  uint32
	Frontend uint32
	Service  uint32
	Endpoint uint32
	Backend  uint32
	// Events is the size in bytes of kmesh_events, the kernel-path
	// connection events' ring buffer: a power of two, at least a page.
	Events uint32
	// Splice is the number of connection ends kmesh_splice holds (two per
	// spliced connection); beyond it connections stay on plain TCP.
	Splice uint32
}

// Config says where the data path lives.
type Config struct {
	// PinRoot holds one directory per pin layout (v1, v2 …). Tests use a
	// private root so they never touch a node's real data path.
	PinRoot string
	// CgroupPath is the cgroup v2 directory the programs attach to: the
	// hierarchy root in production, a test's own subtree in tests.
	CgroupPath string
	Sizes      MapSizes
	// NoPeerVIP stops restoring the service VIP as the peer name of
	// redirected sockets (getpeername), saving a socket-storage allocation
	// per connect. Applications then see the backend's address as peer.
	NoPeerVIP bool
	// NoConnEvents stops reporting kernel-path connections (kmesh_events:
	// Istio metrics and access logs for connections the proxy never sees),
	// saving ~2 µs of sockops time per connection of an enrolled pod.
	NoConnEvents bool
	// Splice splices enrolled pods' connections whose both ends are on this
	// node (the kernel path between pods, and the in-pod legs of the
	// tunnel) with sockmap. Off by default: an application reading such a
	// socket with splice(2) sees the FIN without the bytes (Linux 6.18).
	// Namespaces opted in through Maps.SetSpliceNS are spliced either way.
	Splice bool
	// SpliceBudget is how many bytes one direction of a spliced
	// connection may redirect before it goes to TCP for the rest of the
	// connection: the kernel bounds nothing a spliced reader has not
	// read (kmesh_maps.h, kmesh_splice_sent), TCP's flow control does.
	// 0: 16 MiB.
	SpliceBudget uint64
}

type attachment struct {
	name   string
	prog   *ebpf.Program
	attach ebpf.AttachType
}

// Datapath is the loaded, attached and pinned set of Kmesh programs and maps.
type Datapath struct {
	Maps *Maps

	objs   sockAddrObjects
	ops    sockOpsPrograms
	lookup skLookupPrograms
	msg    skMsgPrograms
	links  []link.Link
	dir    string
	cgroup string
	closed bool
	// Reused is true when the maps were already pinned (a daemon restart or
	// upgrade): their contents are live and must be reconciled, not reset.
	Reused bool
	// noConnEvents: the sockops object is loaded with reporting off.
	noConnEvents bool
	// splice: the sockops object splices enrolled pods' connections.
	splice bool
	// spliceBudget: the sk_msg object's cfg_splice_budget (0: its default).
	spliceBudget uint64
}

// PinDir returns the directory of the current layout under root.
func PinDir(root string) string {
	return filepath.Join(root, fmt.Sprintf("v%d", PinLayout))
}

func applySizes(spec *ebpf.CollectionSpec, s MapSizes) error {
	var missing []string
	set := func(name string, n uint32) {
		ms, ok := spec.Maps[name]
		if !ok {
			missing = append(missing, name)
		} else if n > 0 {
			ms.MaxEntries = n
		}
	}
	set("kmesh_managed", s.Managed)
	set("kmesh_frontend", s.Frontend)
	set("kmesh_service", s.Service)
	set("kmesh_endpoint", s.Endpoint)
	set("kmesh_backend", s.Backend)
	set("kmesh_events", s.Events)
	set("kmesh_splice", s.Splice)
	set("kmesh_splice_rx", s.Splice)
	set("kmesh_sidecar_orig", s.Splice)
	if len(missing) > 0 {
		return fmt.Errorf("map sizes name maps the object does not have: %v", missing)
	}
	return nil
}

// Load loads the programs, reusing pinned maps of the same layout, and
// attaches them to the cgroup through pinned bpf_links. When links are
// already pinned (restart, upgrade), the new programs replace the old ones
// atomically: the hooks never go unattached, so no connect is missed.
func Load(cfg Config) (*Datapath, error) {
	if cfg.PinRoot == "" {
		cfg.PinRoot = DefaultPinRoot
	}
	if cfg.CgroupPath == "" {
		root, err := kernel.Cgroup2Root()
		if err != nil {
			return nil, err
		}
		cfg.CgroupPath = root
	}
	dir := PinDir(cfg.PinRoot)
	if err := kernel.EnsureBPFFS(filepath.Join(dir, "links")); err != nil {
		return nil, err
	}

	spec, err := loadSockAddr()
	if err != nil {
		return nil, fmt.Errorf("parsing the embedded BPF object: %w", err)
	}
	if err := applySizes(spec, cfg.Sizes); err != nil {
		return nil, err
	}
	if cfg.NoPeerVIP {
		if err := spec.Variables["cfg_peer_vip"].Set(uint32(0)); err != nil {
			return nil, err
		}
	}
	reused := false
	for name, ms := range spec.Maps {
		if strings.HasPrefix(name, ".") {
			continue // .rodata and friends belong to one load, never pinned
		}
		ms.Pinning = ebpf.PinByName
		if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
			reused = true
		}
	}

	dp := &Datapath{dir: dir, cgroup: cfg.CgroupPath, Reused: reused, noConnEvents: cfg.NoConnEvents, splice: cfg.Splice,
		spliceBudget: cfg.SpliceBudget}
	err = spec.LoadAndAssign(&dp.objs, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}})
	if err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("the kernel's verifier rejected a Kmesh program: %+v", verr)
		}
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, fmt.Errorf("%w: a map pinned under %s has another size or type than configured; "+
				"keep the previous map sizes or remove the pins with 'kmesh-daemon uninstall' (drops kernel state)", err, dir)
		}
		return nil, fmt.Errorf("loading BPF programs: %w", err)
	}
	dp.Maps = newMaps(dp.MapReplacements())
	// A fresh data path that fails half-way leaves nothing behind: no
	// pinned maps, no program attached through a pinned link. One taken
	// over from a previous daemon is left as it was: it still serves.
	failed := func(err error) (*Datapath, error) {
		dp.Close()
		if !reused {
			err = errors.Join(err, os.RemoveAll(dir))
		}
		return nil, err
	}
	if err := dp.loadSockOps(); err != nil {
		return failed(err)
	}
	// Splicing first: a socket sockops puts into kmesh_splice takes the
	// map's sk_msg program at that moment, so the program must be on the
	// map before sockops runs.
	l, err := attachMapPinned(filepath.Join(dir, "links", "sk_msg"), dp.msg.KmeshSkMsg,
		dp.objs.KmeshSplice, ebpf.AttachSkMsgVerdict)
	if err != nil {
		return failed(err)
	}
	dp.links = append(dp.links, l)

	for _, a := range dp.attachments() {
		l, err := attachPinned(cfg.CgroupPath, filepath.Join(dir, "links", a.name), a)
		if err != nil {
			return failed(err)
		}
		dp.links = append(dp.links, l)
	}
	// The new programs are attached: an older layout's links and maps
	// (left by the daemon version we replace) go now. Sockets they
	// redirected keep their connections; only their peer-name rewrite,
	// which lived in the old socket storage, is lost.
	if err := removeOlderLayouts(cfg.PinRoot); err != nil {
		dp.Close()
		return nil, err
	}
	return dp, nil
}

// loadSockOps loads the sockops and sk_lookup objects onto the maps the
// sock_addr load created: every map exists once, shared by construction,
// not by pin name.
func (dp *Datapath) loadSockOps() error {
	for _, o := range []struct {
		name string
		load func() (*ebpf.CollectionSpec, error)
		objs any
	}{{"sockops", loadSockOps, &dp.ops}, {"sk_lookup", loadSkLookup, &dp.lookup}, {"sk_msg", loadSkMsg, &dp.msg}} {
		spec, err := o.load()
		if err != nil {
			return fmt.Errorf("parsing the embedded %s object: %w", o.name, err)
		}
		if o.name == "sockops" && dp.noConnEvents {
			if err := spec.Variables["cfg_conn_events"].Set(uint32(0)); err != nil {
				return err
			}
		}
		if o.name == "sk_msg" && dp.spliceBudget > 0 {
			if err := spec.Variables["cfg_splice_budget"].Set(dp.spliceBudget); err != nil {
				return err
			}
		}
		if o.name == "sockops" && dp.splice {
			if err := spec.Variables["cfg_splice"].Set(uint32(1)); err != nil {
				return err
			}
		}
		repl := dp.MapReplacements()
		for name, ms := range spec.Maps {
			if strings.HasPrefix(name, ".") {
				continue
			}
			if repl[name] == nil {
				return fmt.Errorf("%s object uses map %s that sock_addr does not define", o.name, name)
			}
			// The configured size (MapSizes) is the created map's: a
			// replacement must match the spec it replaces.
			ms.MaxEntries = repl[name].MaxEntries()
		}
		if err := spec.LoadAndAssign(o.objs, &ebpf.CollectionOptions{MapReplacements: repl}); err != nil {
			var verr *ebpf.VerifierError
			if errors.As(err, &verr) {
				return fmt.Errorf("the kernel's verifier rejected the %s program: %+v", o.name, verr)
			}
			return fmt.Errorf("loading the %s program: %w", o.name, err)
		}
	}
	return nil
}

// inboundPin is where the inbound enforcement link of the pod namespace
// with the given cookie is pinned: it stays attached while no daemon runs.
func (dp *Datapath) inboundPin(netnsCookie uint64) string {
	return filepath.Join(dp.dir, "links", "inbound", fmt.Sprint(netnsCookie))
}

// AttachInbound attaches inbound enforcement (kmesh_inbound, sk_lookup) to
// an enrolled pod's network namespace, through a link pinned under the
// namespace's cookie. A link pinned by a previous daemon is taken over and
// its program replaced, so the namespace is never without it.
func (dp *Datapath) AttachInbound(netnsFd int, netnsCookie uint64) error {
	pin := dp.inboundPin(netnsCookie)
	if old, err := link.LoadPinnedLink(pin, nil); err == nil {
		err := old.Update(dp.lookup.KmeshInbound)
		old.Close()
		if err == nil {
			return nil
		}
		// A link whose namespace died is defunct: replace it.
		_ = os.Remove(pin)
	}
	if err := os.MkdirAll(filepath.Dir(pin), 0o700); err != nil {
		return err
	}
	l, err := link.AttachNetNs(netnsFd, dp.lookup.KmeshInbound)
	if err != nil {
		return fmt.Errorf("attaching inbound enforcement (sk_lookup) to a pod's network namespace: %w", err)
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pinning the inbound enforcement link %s: %w", pin, err)
	}
	return nil
}

// DetachInbound removes a pod namespace's inbound enforcement; absent is
// fine.
func (dp *Datapath) DetachInbound(netnsCookie uint64) error {
	if err := os.Remove(dp.inboundPin(netnsCookie)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("detaching inbound enforcement: %w", err)
	}
	return nil
}

// InboundAttached lists the namespace cookies with inbound enforcement
// pinned (for sweeping pods that went away while no daemon ran).
func (dp *Datapath) InboundAttached() ([]uint64, error) {
	entries, err := os.ReadDir(filepath.Join(dp.dir, "links", "inbound"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []uint64
	for _, e := range entries {
		var c uint64
		if _, err := fmt.Sscan(e.Name(), &c); err == nil {
			out = append(out, c)
		}
	}
	return out, nil
}

// MapReplacements returns every map of the data path by name, for loading
// another object onto the same maps (the sockops object; test programs in
// bpf/decidetest). Only code under bpf/ may touch *ebpf.Map (make lint).
func (dp *Datapath) MapReplacements() map[string]*ebpf.Map {
	return mapsOf(&dp.objs.sockAddrMaps)
}

// removeOlderLayouts removes pin directories of layouts before this one.
func removeOlderLayouts(root string) error {
	entries, err := os.ReadDir(root)
	if err != nil {
		return err
	}
	for _, e := range entries {
		var n int
		if _, err := fmt.Sscanf(e.Name(), "v%d", &n); err != nil || n >= PinLayout || !e.IsDir() {
			continue
		}
		if err := os.RemoveAll(filepath.Join(root, e.Name())); err != nil {
			return fmt.Errorf("removing the pins of layout %d: %w", n, err)
		}
	}
	return nil
}

func (dp *Datapath) attachments() []attachment {
	o := &dp.objs
	return []attachment{
		{"connect4", o.KmeshConnect4, ebpf.AttachCGroupInet4Connect},
		{"connect6", o.KmeshConnect6, ebpf.AttachCGroupInet6Connect},
		{"sendmsg4", o.KmeshSendmsg4, ebpf.AttachCGroupUDP4Sendmsg},
		{"sendmsg6", o.KmeshSendmsg6, ebpf.AttachCGroupUDP6Sendmsg},
		{"recvmsg4", o.KmeshRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg},
		{"recvmsg6", o.KmeshRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg},
		{"getpeername4", o.KmeshGetpeer4, ebpf.AttachCgroupInet4GetPeername},
		{"getpeername6", o.KmeshGetpeer6, ebpf.AttachCgroupInet6GetPeername},
		{"getsockopt", o.KmeshGetsockopt, ebpf.AttachCGroupGetsockopt},
		{"sockops", dp.ops.KmeshSockops, ebpf.AttachCGroupSockOps},
	}
}

// attachMapPinned attaches prog to a sockmap or sockhash through a link
// pinned at pin. A link pinned by a previous daemon is taken over and its
// program replaced atomically (BPF_LINK_UPDATE): the map never goes without
// a program, and sockets already in it keep the program they were inserted
// with until they close.
func attachMapPinned(pin string, prog *ebpf.Program, m *ebpf.Map, typ ebpf.AttachType) (link.Link, error) {
	if old, err := link.LoadPinnedLink(pin, nil); err == nil {
		if err := old.Update(prog); err == nil {
			return old, nil
		}
		// Its map is gone (pins removed by hand): attach anew.
		_ = old.Unpin()
		old.Close()
	}
	l, err := link.AttachRawLink(link.RawLinkOptions{Target: m.FD(), Program: prog, Attach: typ})
	if err != nil {
		return nil, fmt.Errorf("attaching %s to map %s (needs bpf_link for sockmap programs, Linux 6.10): %w",
			prog, m, err)
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return nil, fmt.Errorf("pinning link %s: %w", pin, err)
	}
	return l, nil
}

// cgroupID is the id the kernel reports for a cgroup v2 directory: its inode.
func cgroupID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// attachPinned reuses the link pinned at pin when it is attached to the same
// cgroup, swapping in the new program; otherwise it attaches and pins anew.
func attachPinned(cgroup, pin string, a attachment) (link.Link, error) {
	want, err := cgroupID(cgroup)
	if err != nil {
		return nil, fmt.Errorf("cgroup %s: %w", cgroup, err)
	}
	if old, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, ierr := old.Info()
		if ierr == nil && info.Cgroup() != nil && info.Cgroup().CgroupId == want {
			if err := old.Update(a.prog); err != nil {
				old.Close()
				return nil, fmt.Errorf("replacing the program of pinned link %s: %w", pin, err)
			}
			return old, nil
		}
		// Pinned for another cgroup (the configuration changed): let it go.
		_ = old.Unpin()
		old.Close()
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: a.attach, Program: a.prog})
	if err != nil {
		return nil, fmt.Errorf("attaching %s to cgroup %s: %w", a.name, cgroup, err)
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return nil, fmt.Errorf("pinning link %s (needs bpf_link support for cgroups): %w", pin, err)
	}
	return l, nil
}

// ProgramStats is the kernel's accounting of one program, available when
// kernel.bpf_stats_enabled=1.
type ProgramStats struct {
	Name      string
	RunCount  uint64
	RunTimeNs uint64
}

// Programs reports run counts and run time of every attached program.
func (dp *Datapath) Programs() ([]ProgramStats, error) {
	var out []ProgramStats
	for _, a := range dp.attachments() {
		st, err := a.prog.Stats()
		if err != nil {
			return nil, fmt.Errorf("program %s: %w", a.name, err)
		}
		out = append(out, ProgramStats{Name: a.name, RunCount: st.RunCount, RunTimeNs: uint64(st.Runtime.Nanoseconds())})
	}
	for _, p := range []struct {
		name string
		prog *ebpf.Program
	}{{"inbound", dp.lookup.KmeshInbound}, {"sk_msg", dp.msg.KmeshSkMsg}} {
		st, err := p.prog.Stats()
		if err != nil {
			return nil, fmt.Errorf("program %s: %w", p.name, err)
		}
		out = append(out, ProgramStats{Name: p.name, RunCount: st.RunCount, RunTimeNs: uint64(st.Runtime.Nanoseconds())})
	}
	return out, nil
}

// Close releases this process's handles. Pinned maps and links stay: the
// kernel keeps serving connections while no daemon runs.
func (dp *Datapath) Close() error {
	for _, l := range dp.links {
		l.Close()
	}
	dp.links = nil
	if dp.closed {
		return nil
	}
	dp.closed = true
	return errors.Join(dp.ops.Close(), dp.lookup.Close(), dp.msg.Close(), dp.objs.Close())
}

// Superseded reports whether another daemon took the data path over: the
// pinned connect4 link no longer runs this process's program (an upgrade
// replaced it with BPF_LINK_UPDATE), or the pin is gone. Call it before
// Close.
func (dp *Datapath) Superseded() (bool, error) {
	mine, err := dp.objs.KmeshConnect4.Info()
	if err != nil {
		return false, err
	}
	id, ok := mine.ID()
	if !ok {
		return false, errors.New("this kernel does not report program ids")
	}
	l, err := link.LoadPinnedLink(filepath.Join(dp.dir, "links", "connect4"), nil)
	if errors.Is(err, os.ErrNotExist) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return false, err
	}
	return info.Program != id, nil
}

// Uninstall detaches the programs and removes every pin of this layout,
// dropping all kernel state. For `kmesh-daemon uninstall` and tests. It
// works on a closed Datapath too: removing the pin files drops the last
// references, which detaches the links and frees the maps.
func (dp *Datapath) Uninstall() error {
	return errors.Join(dp.Close(), RemovePins(filepath.Dir(dp.dir)))
}

// RemovePins removes the pins of this layout under root.
func RemovePins(root string) error {
	dir := PinDir(root)
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("removing pins under %s: %w", dir, err)
	}
	return nil
}

// OpenPinned opens the maps a running (or stopped) daemon pinned under
// root, for inspection by kmeshctl. It loads no program and attaches nothing.
func OpenPinned(root string) (*Maps, func(), error) {
	dir := PinDir(root)
	names, err := MapNames()
	if err != nil {
		return nil, nil, err
	}
	ms := map[string]*ebpf.Map{}
	closeAll := func() {
		for _, m := range ms {
			m.Close()
		}
	}
	for _, name := range names {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			closeAll()
			return nil, nil, fmt.Errorf("opening %s (is kmesh-daemon installed on this node, and are you root?): %w",
				filepath.Join(dir, name), err)
		}
		ms[name] = m
	}
	return newMaps(ms), closeAll, nil
}

// PinnedProgramStats reports the run count and run time of the programs
// attached through the links pinned under root (a daemon's data path).
func PinnedProgramStats(root string) ([]ProgramStats, error) {
	dir := filepath.Join(PinDir(root), "links")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []ProgramStats
	for _, e := range entries {
		if e.IsDir() {
			continue // links/inbound: one per pod namespace, the same program
		}
		l, err := link.LoadPinnedLink(filepath.Join(dir, e.Name()), nil)
		if err != nil {
			return nil, err
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			return nil, err
		}
		prog, err := ebpf.NewProgramFromID(info.Program)
		if err != nil {
			return nil, err
		}
		st, err := prog.Stats()
		prog.Close()
		if err != nil {
			return nil, err
		}
		out = append(out, ProgramStats{Name: e.Name(), RunCount: st.RunCount, RunTimeNs: uint64(st.Runtime.Nanoseconds())})
	}
	return out, nil
}
