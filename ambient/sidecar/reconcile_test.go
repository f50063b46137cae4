package sidecar

import (
	"errors"
	"net/netip"
	"testing"

	"kmesh.dev/kmesh/bpf"
)

type memMap map[uint64]bpf.SpliceNS

func (m memMap) SetSidecarPod(uint64, netip.Addr) error      { return nil }
func (m memMap) DeleteSidecarPod(uint64) error               { return nil }
func (m memMap) SidecarPods() (map[uint64]netip.Addr, error) { return nil, nil }

func (m memMap) SetSpliceNS(c uint64, f bpf.SpliceNS) error {
	if c == 666 {
		return errors.New("map full")
	}
	if f == 0 {
		delete(m, c)
	} else {
		m[c] = f
	}
	return nil
}

type fakeFinder map[string]uint64 // uid -> cookie; 0: ambiguous

func (f fakeFinder) Find(uids map[string]bool) (map[string]Found, error) {
	out := map[string]Found{}
	for uid := range uids {
		c, ok := f[uid]
		switch {
		case !ok:
			out[uid] = Found{Why: NetnsUnknown}
		case c == 0:
			out[uid] = Found{Why: NetnsAmbiguous}
		default:
			out[uid] = Found{Cookie: c, Why: Spliced}
		}
	}
	return out, nil
}

func pod(uid, ns string, ann map[string]string) Pod {
	a := map[string]string{sidecarStatus: "{}"}
	for k, v := range ann {
		a[k] = v
	}
	return Pod{UID: uid, Namespace: ns, Name: uid, NodeName: "n1", Running: true, Annotations: a}
}

func TestReconciler(t *testing.T) {
	m := memMap{}
	f := fakeFinder{"a": 11, "b": 12, "c": 13, "amb": 0, "full": 666, "dup": 11}
	r := &Reconciler{Node: "n1", Map: m, Finder: f, Max: 3}
	want := func(step string, w memMap) {
		t.Helper()
		if len(m) != len(w) {
			t.Fatalf("%s: map %v, want %v", step, m, w)
		}
		for c, fl := range w {
			if m[c] != fl {
				t.Fatalf("%s: map %v, want %v", step, m, w)
			}
		}
	}
	in := bpf.SpliceInPod
	r.Pod(pod("a", "ns1", map[string]string{Annotation: "true"}))
	want("pod opted in", memMap{11: in})
	r.Pod(pod("b", "ns1", nil))
	want("namespace unknown: closed", memMap{11: in})
	r.Namespace(Namespace{Name: "ns1", Annotations: map[string]string{Annotation: "true"}})
	want("namespace opts in", memMap{11: in, 12: in})
	r.Namespace(Namespace{Name: "ns1"})
	want("namespace opts out; the pod's own annotation stays", memMap{11: in})
	r.Pod(pod("a", "ns1", map[string]string{Annotation: "false"}))
	want("pod opts out", memMap{})
	r.Pod(pod("a", "ns1", map[string]string{Annotation: "true"}))
	r.Pod(pod("late", "ns1", map[string]string{Annotation: "true"}))
	want("netns not found yet", memMap{11: in})
	f["late"] = 14
	r.Retry()
	want("found on retry", memMap{11: in, 14: in})
	r.Pod(pod("amb", "ns1", map[string]string{Annotation: "true"}))
	r.Pod(pod("dup", "ns1", map[string]string{Annotation: "true"}))
	want("ambiguous and duplicate netns refused", memMap{11: in, 14: in})
	r.Pod(pod("full", "ns1", map[string]string{Annotation: "true"}))
	want("map write failure refused", memMap{11: in, 14: in})
	r.Pod(pod("c", "ns1", map[string]string{Annotation: "true"}))
	want("third", memMap{11: in, 14: in, 13: in})
	r.Pod(pod("b", "ns1", map[string]string{Annotation: "true"}))
	want("bounded at Max", memMap{11: in, 14: in, 13: in})
	moved := pod("c", "ns1", map[string]string{Annotation: "true"})
	moved.NodeName = "n2"
	r.Pod(moved)
	want("pod reported on another node", memMap{11: in, 14: in})
	r.PodGone("a")
	want("pod deleted", memMap{14: in})
	f["late"] = 15 // a new pod sandbox: a new network namespace
	r.Retry()
	// Also: b (refused at Max) and dup (its namespace was a's) now fit.
	want("sandbox recreated: moved; room again", memMap{15: in, 12: in, 11: in})
	delete(f, "late")
	r.Retry()
	want("processes gone: unspliced", memMap{12: in, 11: in})
	f["late"] = 14
	r.Retry()
	want("back", memMap{14: in, 12: in, 11: in})
	r.PodGone("b")
	r.PodGone("dup")
	for _, why := range []Reason{NetnsUnknown, NetnsAmbiguous, MapWriteFailure, TooManyPods} {
		if r.Refusals()[why] == 0 {
			t.Errorf("refusal %q not counted: %v", why, r.Refusals())
		}
	}
	// Never touches namespaces it did not opt in.
	m[99] = bpf.SplicePeers
	r.PodGone("late")
	want("only its own cleared", memMap{99: bpf.SplicePeers})
}

func TestPodUIDFromCgroup(t *testing.T) {
	const uid = "6f3c1a2b-0d4e-4f5a-9b8c-7d6e5f4a3b2c"
	for _, c := range []struct {
		name, content, want string
	}{
		{"cgroupfs v2", "0::/kubepods/burstable/pod" + uid + "/0123abcd\n", uid},
		{"cgroupfs guaranteed", "0::/kubepods/pod" + uid + "/0123abcd\n", uid},
		{"systemd v2", "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6f3c1a2b_0d4e_4f5a_9b8c_7d6e5f4a3b2c.slice/cri-containerd-0123.scope\n", uid},
		{"systemd besteffort v1 lines", "12:pids:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod6f3c1a2b_0d4e_4f5a_9b8c_7d6e5f4a3b2c.slice/docker-1.scope\n1:name=systemd:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod6f3c1a2b_0d4e_4f5a_9b8c_7d6e5f4a3b2c.slice/docker-1.scope\n", uid},
		{"not a pod", "0::/system.slice/sshd.service\n", ""},
		{"malformed uid", "0::/kubepods/burstable/pod6f3c1a2b/0123\n", ""},
		{"upper case refused", "0::/kubepods/pod6F3C1A2B-0D4E-4F5A-9B8C-7D6E5F4A3B2C/x\n", ""},
		{"two pods refused", "0::/kubepods/pod" + uid + "/x\n1:cpu:/kubepods/pod11111111-2222-3333-4444-555555555555/x\n", ""},
		{"empty", "", ""},
	} {
		got, ok := PodUIDFromCgroup([]byte(c.content))
		if got != c.want || ok != (c.want != "") {
			t.Errorf("%s: %q %v, want %q", c.name, got, ok, c.want)
		}
	}
}

// captureMap records both opt-ins as the kernel's maps hold them.
type captureMap struct {
	ns   map[uint64]bpf.SpliceNS
	pods map[uint64]netip.Addr
	fail bool
}

func (m *captureMap) SetSpliceNS(c uint64, f bpf.SpliceNS) error {
	if f == 0 {
		delete(m.ns, c)
	} else {
		m.ns[c] = f
	}
	return nil
}

func (m *captureMap) SetSidecarPod(c uint64, a netip.Addr) error {
	if m.fail {
		return errors.New("map full")
	}
	m.pods[c] = a
	return nil
}

func (m *captureMap) SidecarPods() (map[uint64]netip.Addr, error) {
	out := map[uint64]netip.Addr{}
	for c, a := range m.pods {
		out[c] = a
	}
	return out, nil
}

func (m *captureMap) DeleteSidecarPod(c uint64) error {
	delete(m.pods, c)
	return nil
}

// TestReconcilerCapture: a spliced pod with the default capture is handed
// to the kernel's capture (kmesh_sidecar and SpliceSidecar) once its
// address is known; one with a narrowed capture, or whose address another
// spliced pod holds, keeps iptables' (in-pod leg only); withdrawal clears
// the capture with the opt-in.
func TestReconcilerCapture(t *testing.T) {
	m := &captureMap{ns: map[uint64]bpf.SpliceNS{}, pods: map[uint64]netip.Addr{}}
	r := &Reconciler{Node: "n1", Map: m, Finder: fakeFinder{"a": 11, "b": 12, "c": 13, "d": 14}, Max: 10}
	def := func(uid, ip string, extra map[string]string) Pod {
		a := map[string]string{Annotation: "true", annInterception: "REDIRECT", annIncludeOutbound: "*",
			annIncludeInbound: "*", annExcludeInbound: "15020"}
		for k, v := range extra {
			a[k] = v
		}
		p := pod(uid, "ns1", a)
		p.ProxyUID, p.ProxyGID = 1337, 1337
		if ip != "" {
			p.IPv4 = netip.MustParseAddr(ip)
		}
		return p
	}
	both := bpf.SpliceInPod | bpf.SpliceSidecar
	check := func(step string, ns map[uint64]bpf.SpliceNS, pods map[uint64]string) {
		t.Helper()
		if len(m.ns) != len(ns) || len(m.pods) != len(pods) {
			t.Fatalf("%s: namespaces %v pods %v, want %v %v", step, m.ns, m.pods, ns, pods)
		}
		for c, f := range ns {
			if m.ns[c] != f {
				t.Fatalf("%s: namespaces %v, want %v", step, m.ns, ns)
			}
		}
		for c, a := range pods {
			if m.pods[c].String() != a {
				t.Fatalf("%s: pods %v, want %v", step, m.pods, pods)
			}
		}
	}
	r.Pod(def("a", "", nil))
	check("address not known yet: in-pod only", map[uint64]bpf.SpliceNS{11: bpf.SpliceInPod}, nil)
	r.Pod(def("a", "10.244.1.5", nil))
	check("address known: the kernel captures", map[uint64]bpf.SpliceNS{11: both}, map[uint64]string{11: "10.244.1.5"})
	r.Pod(def("b", "10.244.1.6", map[string]string{annExcludeOutPorts: "3306"}))
	check("narrowed capture stays with iptables", map[uint64]bpf.SpliceNS{11: both, 12: bpf.SpliceInPod}, map[uint64]string{11: "10.244.1.5"})
	r.Pod(def("c", "10.244.1.5", nil))
	check("an address another pod holds", map[uint64]bpf.SpliceNS{11: both, 12: bpf.SpliceInPod, 13: bpf.SpliceInPod}, map[uint64]string{11: "10.244.1.5"})
	m.fail = true
	r.Pod(def("d", "10.244.1.8", nil))
	check("map write failure: in-pod only", map[uint64]bpf.SpliceNS{11: both, 12: bpf.SpliceInPod, 13: bpf.SpliceInPod, 14: bpf.SpliceInPod},
		map[uint64]string{11: "10.244.1.5"})
	m.fail = false
	r.Pod(def("a", "10.244.1.5", map[string]string{Annotation: "false"}))
	check("opt-out clears both", map[uint64]bpf.SpliceNS{12: bpf.SpliceInPod, 13: bpf.SpliceInPod, 14: bpf.SpliceInPod}, nil)
	for _, why := range []CaptureReason{NoIPv4, PartialCapture, AddrInUse, MapWriteCapture} {
		if r.Uncaptured()[why] == 0 {
			t.Errorf("reason %q not counted: %v", why, r.Uncaptured())
		}
	}
	if len(r.Captured()) != 0 {
		t.Errorf("captured after opt-out: %v", r.Captured())
	}

	// A restarted daemon: captures a previous one left (pod 77 went while
	// no daemon watched) are withdrawn after the first list; the ones it
	// holds stay.
	r.Pod(def("a", "10.244.1.5", nil))
	m.pods[77] = netip.MustParseAddr("10.244.1.77")
	r.Sweep()
	check("leftover swept, own kept", map[uint64]bpf.SpliceNS{11: both, 12: bpf.SpliceInPod, 13: bpf.SpliceInPod, 14: bpf.SpliceInPod},
		map[uint64]string{11: "10.244.1.5"})
}
