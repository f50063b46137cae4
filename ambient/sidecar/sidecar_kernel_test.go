package sidecar_test

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"kmesh.dev/kmesh/ambient/sidecar"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/kerneltest"
	"kmesh.dev/kmesh/integration/podnet"
)

func init() {
	podnet.RegisterHelper("idle", func([]string) (any, error) { time.Sleep(time.Minute); return nil, nil })
	podnet.RegisterHelper("loopback", loopback)
}

func TestMain(m *testing.M) {
	podnet.MaybeRunHelper()
	os.Exit(m.Run())
}

// loopback moves args[0] bytes over a loopback connection inside the
// caller's namespace (an application and its sidecar), read with read(2).
func loopback(args []string) (any, error) {
	n, _ := strconv.Atoi(args[0])
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	defer l.Close()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		return nil, err
	}
	s, err := l.Accept()
	if err != nil {
		return nil, err
	}
	go func() { _, _ = c.Write(make([]byte, n)); c.Close() }()
	got, err := io.Copy(io.Discard, s)
	s.Close()
	return got, err
}

const uid = "6f3c1a2b-0d4e-4f5a-9b8c-7d6e5f4a3b2c"

// TestPrivilegedSidecarOptIn: a pod found the way istio-cni finds pods (a
// process whose cgroup names the pod UID, here with the kubelet's systemd
// naming) is opted into splicing by its annotation, and its loopback
// connections then go through sk_msg; when the pod goes, they no longer
// do. A pod on the host network is refused.
func TestPrivilegedSidecarOptIn(t *testing.T) {
	env := kerneltest.New(t, bpf.Config{})
	node, err := podnet.NewNode("n1", netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("fd00:10:244:1::/64"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { node.Close() })
	pod, err := node.AddPod("app", netip.MustParseAddr("10.244.1.2"), netip.MustParseAddr("fd00:10:244:1::2"))
	if err != nil {
		t.Fatal(err)
	}
	podCg, err := env.Cgroup.Child("kubepods-burstable-pod" + strings.ReplaceAll(uid, "-", "_") + ".slice")
	if err != nil {
		t.Fatal(err)
	}
	idle := exec.Command("/proc/self/exe")
	idle.Env = append(os.Environ(), podnet.HelperEnv("idle"))
	if err := pod.Start(idle, podCg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = idle.Process.Kill(); _ = idle.Wait() })

	// The test runs in the node's namespace (this sandbox hides /proc/1's).
	finder := sidecar.Finder{Proc: "/proc", HostNetns: "/proc/self/ns/net", MaxProcs: 1 << 20}
	want, err := pod.NS.Cookie()
	if err != nil {
		t.Fatal(err)
	}
	got, why, err := finder.Netns(uid)
	if err != nil || why != sidecar.Spliced || got != want {
		t.Fatalf("Netns: %d %q %v, want cookie %d", got, why, err, want)
	}
	if _, why, _ := finder.Netns("11111111-2222-3333-4444-555555555555"); why != sidecar.NetnsUnknown {
		t.Errorf("a pod without processes: %q", why)
	}

	stats := func() uint64 {
		st, err := env.DP.Maps.Stats()
		if err != nil {
			t.Fatal(err)
		}
		return st["splice_bytes"]
	}
	move := func() uint64 {
		t.Helper()
		before := stats()
		var n int64
		if err := pod.Helper(podCg, &n, "loopback", fmt.Sprint(4<<20)); err != nil || n != 4<<20 {
			t.Fatalf("loopback: %d bytes, %v", n, err)
		}
		return stats() - before
	}
	if moved := move(); moved != 0 {
		t.Fatalf("not opted in, yet %d bytes through sk_msg", moved)
	}
	r := &sidecar.Reconciler{Node: "n1", Map: env.DP.Maps, Finder: finder, Max: 16}
	// What the injector writes with Istio's defaults: the kernel takes the
	// capture over too.
	r.Pod(sidecar.Pod{UID: uid, Namespace: "demo", Name: "app", NodeName: "n1", Running: true,
		IPv4: pod.IPv4, ProxyUID: 1337, ProxyGID: 1337,
		Annotations: map[string]string{"sidecar.istio.io/status": "{}", sidecar.Annotation: "true",
			"sidecar.istio.io/interceptionMode": "REDIRECT", "traffic.sidecar.istio.io/includeOutboundIPRanges": "*",
			"traffic.sidecar.istio.io/includeInboundPorts": "*", "traffic.sidecar.istio.io/excludeInboundPorts": "15020"}})
	ns, err := env.DP.Maps.SpliceNamespaces()
	if err != nil || ns[want] != bpf.SpliceInPod|bpf.SpliceSidecar {
		t.Fatalf("kmesh_splice_ns: %v %v, want %d in-pod and sidecar capture", ns, err, want)
	}
	if pods, err := env.DP.Maps.SidecarPods(); err != nil || pods[want] != pod.IPv4 {
		t.Fatalf("kmesh_sidecar_ns: %v %v, want %d at %s", pods, err, want, pod.IPv4)
	}
	if moved := move(); moved < 4<<20 {
		t.Errorf("opted in: %d bytes through sk_msg, want the 4 MiB", moved)
	}
	r.PodGone(uid)
	if ns, _ := env.DP.Maps.SpliceNamespaces(); len(ns) != 0 {
		t.Errorf("after the pod went: %v", ns)
	}
	if pods, _ := env.DP.Maps.SidecarPods(); len(pods) != 0 {
		t.Errorf("after the pod went, still captured: %v", pods)
	}
	if moved := move(); moved != 0 {
		t.Errorf("after the pod went: %d bytes through sk_msg", moved)
	}

	// A process of a pod on the host network (the test's own namespace).
	hostUID := "11111111-2222-3333-4444-555555555555"
	hostCg, err := env.Cgroup.Child("pod" + hostUID)
	if err != nil {
		t.Fatal(err)
	}
	host := exec.Command("/proc/self/exe")
	host.Env = append(os.Environ(), podnet.HelperEnv("idle"))
	if err := startIn(host, hostCg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = host.Process.Kill(); _ = host.Wait() })
	if _, why, err := finder.Netns(hostUID); why != sidecar.HostNetwork {
		t.Errorf("a pod on the host network: %q %v", why, err)
	}
}

// startIn starts cmd in our own network namespace, inside cgroup cg.
func startIn(cmd *exec.Cmd, cg *podnet.Cgroup) error {
	f, err := cg.Open()
	if err != nil {
		return err
	}
	defer f.Close()
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd()), Pdeathsig: syscall.SIGKILL}
	return cmd.Start()
}
