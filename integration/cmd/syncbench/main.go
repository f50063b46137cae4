// Command syncbench measures how fast a Kmesh daemon follows istiod: the
// full sync of N services × E endpoints from Istio's real discovery server
// into the kernel maps, the daemon's memory once synced, and the latency of
// single updates from xDS receipt to map write. The daemon runs as its own
// process (bin/kmesh-daemon) so its RSS is its own. No traffic is sent.
//
//	go run ./integration/cmd/syncbench -services 1000,10000 -repeat 3 -out docs/benchmarks
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/protobuf/types/known/anypb"
	"istio.io/istio/pkg/workloadapi"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"

	"kmesh.dev/kmesh/ambient/xds"
	"kmesh.dev/kmesh/ambient/xds/xdstest"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/controlplane"
	"kmesh.dev/kmesh/integration/freeport"
	"kmesh.dev/kmesh/integration/podnet"
)

type result struct {
	Source            string  `json:"source"`
	Runs              int     `json:"runs"`
	Services          int     `json:"services"`
	EndpointsPerSvc   int     `json:"endpoints_per_service"`
	IstiodReadySec    float64 `json:"istiod_ready_seconds"`
	SyncSec           float64 `json:"sync_seconds"`
	ReadyWallSec      float64 `json:"ready_wall_seconds"`
	RSSMiB            float64 `json:"rss_mib"`
	PeakRSSMiB        float64 `json:"peak_rss_mib"`
	RSSUpdatesMiB     float64 `json:"rss_after_updates_mib"`
	Frontends         int     `json:"frontends"`
	Slots             int     `json:"endpoint_slots"`
	Updates           int     `json:"updates"`
	UpdateP50Ms       float64 `json:"update_apply_p50_ms"`
	UpdateP99Ms       float64 `json:"update_apply_p99_ms"`
	UpdateE2EP50Ms    float64 `json:"update_istiod_to_kernel_p50_ms"`
	UpdateE2EP99Ms    float64 `json:"update_istiod_to_kernel_p99_ms"`
	DaemonCPUSec      float64 `json:"daemon_cpu_seconds_sync"`
	KernelVersion     string  `json:"kernel"`
	GoVersion         string  `json:"go"`
	TargetSyncSec     float64 `json:"target_sync_seconds,omitempty"`
	TargetUpdateP99Ms float64 `json:"target_update_p99_ms"`
	TargetRSSMiB      float64 `json:"target_rss_mib"`
	TargetPeakRSSMiB  float64 `json:"target_peak_rss_mib"`
}

var (
	profileDir = flag.String("profile", "", "directory to save the daemon's CPU profile of the sync and its heap and allocation profiles after sync")
	daemonEnv  envList
)

// envList is a repeatable NAME=value flag.
type envList []string

func (l *envList) String() string { return strings.Join(*l, " ") }

func (l *envList) Set(v string) error {
	if !strings.Contains(v, "=") {
		return fmt.Errorf("%q is not NAME=value", v)
	}
	*l = append(*l, v)
	return nil
}

func main() {
	services := flag.String("services", "1000,10000", "service counts to measure")
	istiodMax := flag.Int("istiod-max", 1000, "largest size also measured against Istio's discovery server (the in-memory istiod takes minutes per thousand services)")
	eps := flag.Int("endpoints", 10, "endpoints per service")
	updates := flag.Int("updates", 200, "single updates to time")
	daemon := flag.String("daemon", "bin/kmesh-daemon", "kmesh-daemon binary")
	out := flag.String("out", "docs/benchmarks", "directory for sync.json and sync.md")
	repeat := flag.Int("repeat", 1, "runs per size and control plane; each figure reported is the median of the runs (this machine may be shared)")
	flag.Var(&daemonEnv, "daemon-env", "NAME=value added to the daemon's environment only (repeatable), e.g. GOGC=50, GOMEMLIMIT=100MiB, GODEBUG=gctrace=1")
	flag.Parse()
	if os.Geteuid() != 0 {
		fatalf("%v", "syncbench loads BPF programs: run it as root")
	}
	var results []result
	for _, s := range strings.Split(*services, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil {
			fatalf("%v", err)
		}
		kinds := []string{"synthetic"}
		if n <= *istiodMax {
			kinds = append([]string{"istiod"}, kinds...)
		}
		for _, kind := range kinds {
			var runs []result
			for range max(*repeat, 1) {
				r, err := run(n, *eps, *updates, *daemon, kind)
				if err != nil {
					fatalf("%d services (%s): %v", n, kind, err)
				}
				logf("%s %d services × %d: sync %.2fs, RSS %.1f MiB (peak %.1f, after updates %.1f), update p50 %.2f ms p99 %.2f ms",
					kind, n, *eps, r.SyncSec, r.RSSMiB, r.PeakRSSMiB, r.RSSUpdatesMiB, r.UpdateP50Ms, r.UpdateP99Ms)
				runs = append(runs, r)
			}
			results = append(results, medians(runs))
		}
	}
	if err := write(*out, results); err != nil {
		fatalf("%v", err)
	}
}

// medians returns the first run with every float64 figure replaced by the
// median of the runs' (each figure on its own: the median sync time and the
// median peak may come from different runs).
func medians(runs []result) result {
	out := runs[0]
	out.Runs = len(runs)
	v := reflect.ValueOf(&out).Elem()
	for i := range v.NumField() {
		if v.Field(i).Kind() != reflect.Float64 {
			continue
		}
		xs := make([]float64, len(runs))
		for j, r := range runs {
			xs[j] = reflect.ValueOf(r).Field(i).Float()
		}
		sort.Float64s(xs)
		m := xs[len(xs)/2]
		if len(xs)%2 == 0 {
			m = (xs[len(xs)/2-1] + xs[len(xs)/2]) / 2
		}
		v.Field(i).SetFloat(m)
	}
	return out
}

func ipOf(base [4]byte, i int) string {
	v := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	v += uint32(i)
	return fmt.Sprintf("%d.%d.%d.%d", v>>24, v>>16&255, v>>8&255, v&255)
}

const benchNS = "bench"

func pod(i, svc int) *corev1.Pod {
	ip := ipOf([4]byte{10, 128, 0, 1}, i)
	app := fmt.Sprintf("app-%d", svc)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("pod-%d", i), Namespace: benchNS, Labels: map[string]string{"app": app},
			Annotations: map[string]string{"ambient.istio.io/redirection": "enabled"}},
		Spec: corev1.PodSpec{NodeName: fmt.Sprintf("node-%d", i%4), ServiceAccountName: app},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}},
	}
}

func objects(n, e int) []k8sruntime.Object {
	objs := []k8sruntime.Object{&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: benchNS, Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}}}
	for s := 0; s < n; s++ {
		objs = append(objs, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("svc-%d", s), Namespace: benchNS},
			Spec: corev1.ServiceSpec{ClusterIP: ipOf([4]byte{10, 96, 0, 1}, s), Selector: map[string]string{"app": fmt.Sprintf("app-%d", s)},
				Ports: []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromInt(8080)}}},
		})
		for k := 0; k < e; k++ {
			objs = append(objs, pod(s*e+k, s))
		}
	}
	return objs
}

func freePort() string {
	a, err := freeport.Addr()
	if err != nil {
		fatalf("%v", err)
	}
	return a
}

func scrape(addr string) (map[string]*dto.MetricFamily, error) {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	return p.TextToMetricFamilies(resp.Body)
}

// histogram returns the cumulative bucket counts of a histogram (all label sets).
func histogram(mfs map[string]*dto.MetricFamily, name string) (bounds []float64, counts []uint64) {
	mf := mfs[name]
	if mf == nil {
		return nil, nil
	}
	for _, m := range mf.GetMetric() {
		for i, b := range m.GetHistogram().GetBucket() {
			if len(bounds) <= i {
				bounds = append(bounds, b.GetUpperBound())
				counts = append(counts, 0)
			}
			counts[i] += b.GetCumulativeCount()
		}
	}
	return bounds, counts
}

// quantile interpolates a quantile from the difference of two cumulative
// bucket snapshots.
func quantile(bounds []float64, before, after []uint64, q float64) float64 {
	if len(after) == 0 {
		return math.NaN()
	}
	diff := make([]float64, len(after))
	for i := range after {
		var b uint64
		if i < len(before) {
			b = before[i]
		}
		diff[i] = float64(after[i] - b)
	}
	total := diff[len(diff)-1]
	if total == 0 {
		return math.NaN()
	}
	rank := q * total
	lower, prevCount := 0.0, 0.0
	for i, c := range diff {
		if c >= rank {
			if c == prevCount {
				return bounds[i]
			}
			return lower + (bounds[i]-lower)*(rank-prevCount)/(c-prevCount)
		}
		lower, prevCount = bounds[i], c
	}
	return bounds[len(bounds)-1]
}

func gauge(mfs map[string]*dto.MetricFamily, name string) float64 {
	if mf := mfs[name]; mf != nil && len(mf.GetMetric()) > 0 {
		return mf.GetMetric()[0].GetGauge().GetValue()
	}
	return math.NaN()
}

func procStatus(pid int, field string) float64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return math.NaN()
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if strings.HasPrefix(s.Text(), field+":") {
			kb, _ := strconv.ParseFloat(strings.Fields(s.Text())[1], 64)
			return kb / 1024
		}
	}
	return math.NaN()
}

func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return math.NaN()
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ
}

func percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[int(float64(len(s)-1)*p/100)]
}

// source is a control plane for the daemon: Istio's discovery server, or a
// synthetic one for sizes the in-memory istiod cannot build in reasonable
// time on this machine.
type source struct {
	addr     string
	rootFile string // empty: plaintext
	readySec float64
	update   func(i int, healthy bool) (svc int, err error)
	close    func()
}

func istiodSource(n, e int, dir string) (*source, error) {
	tlsCfg, rootFile, err := controlplane.ServingTLS(dir)
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	cp, err := controlplane.Start(controlplane.Options{KubeObjects: objects(n, e), TLS: tlsCfg})
	if err != nil {
		return nil, err
	}
	pods := cp.Kube().Kube().CoreV1().Pods(benchNS)
	return &source{addr: cp.Addr, rootFile: rootFile, readySec: time.Since(t0).Seconds(), close: cp.Stop,
		update: func(idx int, healthy bool) (int, error) {
			p := pod(idx, idx/e)
			if !healthy {
				p.Status.Conditions[0].Status = corev1.ConditionFalse
			}
			_, err := pods.UpdateStatus(context.Background(), p, metav1.UpdateOptions{})
			return idx / e, err
		}}, nil
}

func svcKey(s int) string { return fmt.Sprintf("%s/svc-%d.%s.svc.cluster.local", benchNS, s, benchNS) }

// contentVersion is a resource version as istiod writes one: a 64-bit hash
// of the content, in hex (istiod uses xxhash).
func contentVersion(body *anypb.Any) string {
	h := fnv.New64a()
	h.Write(body.GetValue())
	return strconv.FormatUint(h.Sum64(), 16)
}

func syntheticWorkload(idx, e int, healthy bool) *discovery.Resource {
	status := workloadapi.WorkloadStatus_HEALTHY
	if !healthy {
		status = workloadapi.WorkloadStatus_UNHEALTHY
	}
	ip := netip.MustParseAddr(ipOf([4]byte{10, 128, 0, 1}, idx))
	uid := fmt.Sprintf("Kubernetes//Pod/%s/pod-%d", benchNS, idx)
	w := &workloadapi.Workload{Uid: uid, Name: fmt.Sprintf("pod-%d", idx), Namespace: benchNS, Addresses: [][]byte{ip.AsSlice()},
		Node: fmt.Sprintf("node-%d", idx%4), ClusterId: "Kubernetes", TunnelProtocol: workloadapi.TunnelProtocol_HBONE, Status: status,
		ServiceAccount: fmt.Sprintf("app-%d", idx/e), TrustDomain: "cluster.local", CanonicalName: fmt.Sprintf("app-%d", idx/e),
		CanonicalRevision: "latest", WorkloadName: fmt.Sprintf("app-%d", idx/e), WorkloadType: workloadapi.WorkloadType_DEPLOYMENT,
		Services: map[string]*workloadapi.PortList{svcKey(idx / e): {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}}}
	body, _ := anypb.New(&workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})
	return &discovery.Resource{Name: uid, Version: contentVersion(body), Resource: body}
}

func syntheticService(s int) *discovery.Resource {
	vip := netip.MustParseAddr(ipOf([4]byte{10, 96, 0, 1}, s))
	svc := &workloadapi.Service{Name: fmt.Sprintf("svc-%d", s), Namespace: benchNS, Hostname: fmt.Sprintf("svc-%d.%s.svc.cluster.local", s, benchNS),
		Addresses: []*workloadapi.NetworkAddress{{Address: vip.AsSlice()}}, Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}
	body, _ := anypb.New(&workloadapi.Address{Type: &workloadapi.Address_Service{Service: svc}})
	return &discovery.Resource{Name: svcKey(s), Version: contentVersion(body), Resource: body}
}

// syntheticSource serves the Address resources istiod would send for the
// same cluster, built with Istio's own types, over a plaintext Delta ADS
// stream, all in one response as istiod sends an initial state.
func syntheticSource(n, e int) (*source, error) {
	srv, err := xdstest.Start()
	if err != nil {
		return nil, err
	}
	res := make([]*discovery.Resource, 0, n+n*e)
	for s := 0; s < n; s++ {
		res = append(res, syntheticService(s))
	}
	for i := 0; i < n*e; i++ {
		res = append(res, syntheticWorkload(i, e, true))
	}
	streams := make(chan *xdstest.Stream, 1)
	go func() {
		st := <-srv.Streams
		<-st.Requests
		<-st.Requests
		st.Send(&discovery.DeltaDiscoveryResponse{TypeUrl: xds.AddressType, Nonce: "full", Resources: res})
		st.Send(&discovery.DeltaDiscoveryResponse{TypeUrl: xds.AuthorizationType, Nonce: "auth"})
		go func() {
			for range st.Requests { // acks
			}
		}()
		streams <- st
	}()
	var st *xdstest.Stream
	nonce := 0
	return &source{addr: srv.Addr, close: srv.Stop,
		update: func(idx int, healthy bool) (int, error) {
			if st == nil {
				st = <-streams
			}
			nonce++
			st.Send(&discovery.DeltaDiscoveryResponse{TypeUrl: xds.AddressType, Nonce: fmt.Sprint(nonce),
				Resources: []*discovery.Resource{syntheticWorkload(idx, e, healthy)}})
			return idx / e, nil
		}}, nil
}

func run(n, e, updates int, daemon, kind string) (result, error) {
	r := result{Services: n, EndpointsPerSvc: e, Updates: updates, GoVersion: runtime.Version(), TargetUpdateP99Ms: 10, TargetRSSMiB: 80, TargetPeakRSSMiB: 160, Source: kind}
	if n >= 10000 {
		r.TargetSyncSec = 2
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		r.KernelVersion = strings.TrimSpace(string(b))
	}
	dir, err := os.MkdirTemp("", "kmesh-syncbench-")
	if err != nil {
		return r, err
	}
	defer os.RemoveAll(dir)
	var src *source
	if kind == "istiod" {
		src, err = istiodSource(n, e, dir)
	} else {
		src, err = syntheticSource(n, e)
	}
	if err != nil {
		return r, err
	}
	defer src.close()
	r.IstiodReadySec = src.readySec

	id := podnet.RandomSuffix()
	cg, err := podnet.NewCgroup("", "kmesh-syncbench-"+id)
	if err != nil {
		return r, err
	}
	defer cg.Remove()
	pinRoot := filepath.Join("/sys/fs/bpf/kmesh-syncbench", id)
	defer func() {
		_ = bpf.RemovePins(pinRoot)
		_ = os.Remove(pinRoot)
		_ = os.Remove(filepath.Dir(pinRoot))
	}()
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte("bench"), 0o600); err != nil {
		return r, err
	}
	stats, ready, admin := freePort(), freePort(), freePort()
	// No node agent here: an empty socket path turns enrolment off (the
	// environment cannot, empty there means the default).
	cmd := exec.Command(daemon, "--zds-socket=")
	cmd.Env = append(os.Environ(),
		"XDS_ADDRESS="+src.addr, "ALT_XDS_HOSTNAME="+controlplane.IstiodName, "KMESH_TOKEN_FILE="+tokenFile,
		"NODE_NAME=node-0", "POD_NAME=kmesh-bench", "INSTANCE_IP=10.0.0.1", "KMESH_ZDS_SOCKET=",
		"KMESH_CGROUP_PATH="+cg.Path, "KMESH_PIN_ROOT="+pinRoot,
		"KMESH_STATS_ADDR="+stats, "KMESH_READINESS_ADDR="+ready, "KMESH_ADMIN_ADDR="+admin,
		"KMESH_MAP_FRONTEND="+strconv.Itoa(4*n+2*n*e+1024), "KMESH_MAP_BACKEND="+strconv.Itoa(n*e+1024),
		"KMESH_MAP_ENDPOINT="+strconv.Itoa(4*n*e+1024), "KMESH_MAP_SERVICE="+strconv.Itoa(2*n+1024),
		"KMESH_LOG_LEVEL=warn")
	if src.rootFile != "" {
		cmd.Env = append(cmd.Env, "XDS_ROOT_CA="+src.rootFile)
	} else {
		cmd.Env = append(cmd.Env, "KMESH_XDS_PLAINTEXT=true")
	}
	cmd.Env = append(cmd.Env, daemonEnv...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return r, err
	}
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	}()
	cpuDone := make(chan struct{})
	if *profileDir != "" {
		go func() {
			defer close(cpuDone)
			for i := 0; i < 500; i++ {
				resp, err := http.Get("http://" + admin + "/debug/pprof/profile?seconds=4")
				if err != nil {
					time.Sleep(2 * time.Millisecond)
					continue
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				_ = os.WriteFile(filepath.Join(*profileDir, fmt.Sprintf("cpu-%s-%d.pprof", kind, n)), b, 0o644)
				return
			}
		}()
	} else {
		close(cpuDone)
	}
	for {
		resp, err := http.Get("http://" + ready + "/healthz/ready")
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Since(start) > 5*time.Minute {
			return r, fmt.Errorf("daemon not ready after 5 minutes")
		}
		time.Sleep(5 * time.Millisecond)
	}
	r.ReadyWallSec = time.Since(start).Seconds()
	<-cpuDone
	r.DaemonCPUSec = cpuSeconds(cmd.Process.Pid)
	mfs, err := scrape(stats)
	if err != nil {
		return r, err
	}
	r.SyncSec = gauge(mfs, "kmesh_xds_initial_sync_seconds")
	time.Sleep(time.Second) // let the freed sync garbage reach the OS
	r.RSSMiB = procStatus(cmd.Process.Pid, "VmRSS")
	r.PeakRSSMiB = procStatus(cmd.Process.Pid, "VmHWM")
	if mfs2, err := scrape(stats); err == nil {
		for _, name := range []string{"go_memstats_heap_alloc_bytes", "go_memstats_heap_inuse_bytes", "go_memstats_heap_idle_bytes", "go_memstats_heap_released_bytes", "go_memstats_sys_bytes", "go_memstats_stack_inuse_bytes"} {
			logf("  %s = %.1f MiB", name, gauge(mfs2, name)/(1<<20))
		}
	}
	if *profileDir != "" {
		for _, p := range []string{"heap", "allocs"} {
			resp, err := http.Get("http://" + admin + "/debug/pprof/" + p)
			if err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				_ = os.WriteFile(filepath.Join(*profileDir, fmt.Sprintf("%s-%s-%d.pprof", p, kind, n)), b, 0o644)
			}
		}
	}

	maps, closeMaps, err := bpf.OpenPinned(pinRoot)
	if err != nil {
		return r, err
	}
	defer closeMaps()
	fes, _ := maps.Frontends()
	eps, _ := maps.Endpoints()
	r.Frontends, r.Slots = len(fes), len(eps)
	if r.Slots != n*e {
		return r, fmt.Errorf("kernel holds %d endpoint slots after sync, want %d", r.Slots, n*e)
	}

	// Single updates: a pod turns unready and ready again, one at a time.
	bounds, before := histogram(mfs, "kmesh_xds_apply_seconds")
	var e2e []float64
	for i := 0; i < updates; i++ {
		idx := (i / 2 * 7919) % (n * e)
		healthy := i%2 == 1
		svc := idx / e
		want := uint32(e - 1)
		if healthy {
			want = uint32(e)
		}
		fe, ok, err := maps.LookupFrontend(bpf.FrontendKey{Addr: netip.MustParseAddr(ipOf([4]byte{10, 96, 0, 1}, svc)), Port: 80, Proto: bpf.TCP})
		if err != nil || !ok {
			return r, fmt.Errorf("service %d not in the kernel: %v", svc, err)
		}
		t := time.Now()
		if _, err := src.update(idx, healthy); err != nil {
			return r, err
		}
		for {
			s, ok, err := maps.LookupService(fe.ID)
			if err != nil {
				return r, err
			}
			if ok && s.Counts[bpf.FamilyV4][0] == want {
				break
			}
			if time.Since(t) > 30*time.Second {
				return r, fmt.Errorf("update %d not in the kernel after 30 s", i)
			}
		}
		e2e = append(e2e, float64(time.Since(t).Microseconds())/1000)
	}
	mfs, err = scrape(stats)
	if err != nil {
		return r, err
	}
	_, after := histogram(mfs, "kmesh_xds_apply_seconds")
	r.UpdateP50Ms = 1000 * quantile(bounds, before, after, 0.5)
	r.UpdateP99Ms = 1000 * quantile(bounds, before, after, 0.99)
	r.UpdateE2EP50Ms, r.UpdateE2EP99Ms = percentile(e2e, 50), percentile(e2e, 99)
	r.RSSUpdatesMiB = procStatus(cmd.Process.Pid, "VmRSS")
	return r, nil
}

func write(dir string, rs []result) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	j, _ := json.MarshalIndent(rs, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, "sync.json"), append(j, '\n'), 0o644); err != nil {
		return err
	}
	var b strings.Builder
	b.WriteString("# Control-plane sync: istiod → Kmesh daemon → kernel maps\n\n")
	b.WriteString("Produced by `make bench-sync` (`integration/cmd/syncbench`). `kmesh-daemon` runs as its own process;\n")
	b.WriteString("the control plane is either Istio's discovery server in-process (\"istiod\", TLS on loopback, a pod's\n")
	b.WriteString("readiness flipped through the Kubernetes API for updates) or, for sizes the in-memory istiod cannot\n")
	b.WriteString("build in reasonable time on this machine, a Delta ADS server sending the same resources built with\n")
	b.WriteString("Istio's workloadapi types in one initial response (\"synthetic\", plaintext).\n\n")
	b.WriteString("| control plane | services × endpoints | full sync (xDS start → maps) | daemon CPU until ready | RSS after sync | peak RSS | RSS after the updates | update apply p50 / p99 | update → kernel p50 / p99 |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rs {
		fmt.Fprintf(&b, "| %s | %d × %d | %.2f s | %.2f s | %.1f MiB | %.1f MiB | %.1f MiB | %.2f / %.2f ms | %.1f / %.1f ms |\n",
			r.Source, r.Services, r.EndpointsPerSvc, r.SyncSec, r.DaemonCPUSec, r.RSSMiB, r.PeakRSSMiB, r.RSSUpdatesMiB, r.UpdateP50Ms, r.UpdateP99Ms, r.UpdateE2EP50Ms, r.UpdateE2EP99Ms)
	}
	b.WriteString("\nTargets: 10k × 10 in ≤ 2 s, update p99 ≤ 10 ms, RSS after sync ≤ 80 MiB, peak RSS ≤ 160 MiB.\n")
	b.WriteString("The daemon runs with its own defaults (GOGC 50, see ARCHITECTURE.md); `-daemon-env` changes them.\n")
	if len(rs) > 0 && rs[0].Runs > 1 {
		fmt.Fprintf(&b, "Each figure is the median of %d runs (the machine may be shared with other work).\n", rs[0].Runs)
	}
	b.WriteString("\"update apply\" is the daemon's own time from receiving an xDS response to the last map write\n")
	b.WriteString("(`kmesh_xds_apply_seconds`); \"pod update → kernel\" adds istiod's processing and the stream, as seen\n")
	b.WriteString("by polling the pinned maps.\n")
	if len(rs) > 0 {
		fmt.Fprintf(&b, "\nCPU %s (%d vCPU), kernel %s, %s.\n", cpuModel(), runtime.NumCPU(), rs[0].KernelVersion, rs[0].GoVersion)
	}
	return os.WriteFile(filepath.Join(dir, "sync.md"), []byte(b.String()), 0o644)
}

// Not the log package: Istio's logging (linked in with the control plane)
// takes over the standard logger.
func logf(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }

func fatalf(format string, args ...any) {
	logf("syncbench: "+format, args...)
	os.Exit(1)
}

// cpuModel names the CPU the figures were measured on.
func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}
