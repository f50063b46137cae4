// Command syncbench measures how fast a Kmesh daemon follows istiod: the
// full sync of N services × E endpoints from Istio's real discovery server
// into the kernel maps, the daemon's memory once synced, and the latency of
// single updates from xDS receipt to map write. The daemon runs as its own
// process (bin/kmesh-daemon) so its RSS is its own. No traffic is sent.
//
//	go run ./integration/cmd/syncbench -services 1000,10000 -out docs/benchmarks
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"math"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/controlplane"
	"kmesh.dev/kmesh/integration/podnet"
)

type result struct {
	Services          int     `json:"services"`
	EndpointsPerSvc   int     `json:"endpoints_per_service"`
	IstiodReadySec    float64 `json:"istiod_ready_seconds"`
	SyncSec           float64 `json:"sync_seconds"`
	ReadyWallSec      float64 `json:"ready_wall_seconds"`
	RSSMiB            float64 `json:"rss_mib"`
	PeakRSSMiB        float64 `json:"peak_rss_mib"`
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
}

var profileDir = flag.String("profile", "", "directory to save the daemon's heap profile after sync")

func main() {
	services := flag.String("services", "1000,10000", "service counts to measure")
	eps := flag.Int("endpoints", 10, "endpoints per service")
	updates := flag.Int("updates", 200, "single updates to time")
	daemon := flag.String("daemon", "bin/kmesh-daemon", "kmesh-daemon binary")
	out := flag.String("out", "docs/benchmarks", "directory for sync.json and sync.md")
	flag.Parse()
	if os.Geteuid() != 0 {
		log.Fatal("syncbench loads BPF programs: run it as root")
	}
	var results []result
	for _, s := range strings.Split(*services, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil {
			log.Fatal(err)
		}
		r, err := run(n, *eps, *updates, *daemon)
		if err != nil {
			log.Fatalf("%d services: %v", n, err)
		}
		results = append(results, r)
		log.Printf("%d services × %d: sync %.2fs, RSS %.1f MiB, update p50 %.2f ms p99 %.2f ms", n, *eps, r.SyncSec, r.RSSMiB, r.UpdateP50Ms, r.UpdateP99Ms)
	}
	if err := write(*out, results); err != nil {
		log.Fatal(err)
	}
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
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
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

func run(n, e, updates int, daemon string) (result, error) {
	r := result{Services: n, EndpointsPerSvc: e, Updates: updates, GoVersion: runtime.Version(), TargetUpdateP99Ms: 10, TargetRSSMiB: 80}
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
	tlsCfg, rootFile, err := controlplane.ServingTLS(dir)
	if err != nil {
		return r, err
	}
	t0 := time.Now()
	cp, err := controlplane.Start(controlplane.Options{KubeObjects: objects(n, e), TLS: tlsCfg})
	if err != nil {
		return r, err
	}
	defer cp.Stop()
	r.IstiodReadySec = time.Since(t0).Seconds()

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
	cmd := exec.Command(daemon)
	cmd.Env = append(os.Environ(),
		"XDS_ADDRESS="+cp.Addr, "XDS_ROOT_CA="+rootFile, "ALT_XDS_HOSTNAME="+controlplane.IstiodName, "KMESH_TOKEN_FILE="+tokenFile,
		"NODE_NAME=node-0", "POD_NAME=kmesh-bench", "INSTANCE_IP=10.0.0.1",
		"KMESH_CGROUP_PATH="+cg.Path, "KMESH_PIN_ROOT="+pinRoot,
		"KMESH_STATS_ADDR="+stats, "KMESH_READINESS_ADDR="+ready, "KMESH_ADMIN_ADDR="+admin,
		"KMESH_MAP_FRONTEND="+strconv.Itoa(4*n+2*n*e+1024), "KMESH_MAP_BACKEND="+strconv.Itoa(n*e+1024),
		"KMESH_MAP_ENDPOINT="+strconv.Itoa(4*n*e+1024), "KMESH_MAP_SERVICE="+strconv.Itoa(2*n+1024),
		"KMESH_LOG_LEVEL=warn")
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
	r.DaemonCPUSec = cpuSeconds(cmd.Process.Pid)
	mfs, err := scrape(stats)
	if err != nil {
		return r, err
	}
	r.SyncSec = gauge(mfs, "kmesh_xds_initial_sync_seconds")
	runtime.GC()
	time.Sleep(500 * time.Millisecond)
	r.RSSMiB = procStatus(cmd.Process.Pid, "VmRSS")
	if *profileDir != "" {
		for _, p := range []string{"heap", "allocs"} {
			resp, err := http.Get("http://" + admin + "/debug/pprof/" + p)
			if err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				_ = os.WriteFile(filepath.Join(*profileDir, fmt.Sprintf("%s-%d.pprof", p, n)), b, 0o644)
			}
		}
	}
	r.PeakRSSMiB = procStatus(cmd.Process.Pid, "VmHWM")

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
	pods := cp.Kube().Kube().CoreV1().Pods(benchNS)
	var e2e []float64
	for i := 0; i < updates; i++ {
		idx := (i * 7919) % (n * e)
		svc := idx / e
		p := pod(idx, svc)
		if i%2 == 0 {
			p.Status.Conditions[0].Status = corev1.ConditionFalse
		}
		want := uint32(e - 1)
		if i%2 == 1 {
			want = uint32(e)
		}
		fe, ok, err := maps.LookupFrontend(bpf.FrontendKey{Addr: netip.MustParseAddr(ipOf([4]byte{10, 96, 0, 1}, svc)), Port: 80, Proto: bpf.TCP})
		if err != nil || !ok {
			return r, fmt.Errorf("service %d not in the kernel: %v", svc, err)
		}
		t := time.Now()
		if _, err := pods.UpdateStatus(context.Background(), p, metav1.UpdateOptions{}); err != nil {
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
	b.WriteString("Produced by `make bench-sync` (`integration/cmd/syncbench`): Istio's real discovery server in-process\n")
	b.WriteString("with a synthetic ambient cluster, `kmesh-daemon` as its own process over TLS on loopback.\n\n")
	b.WriteString("| services × endpoints | istiod ready | full sync (xDS start → maps) | daemon CPU during sync | RSS after sync | peak RSS | update apply p50 / p99 | pod update → kernel p50 / p99 |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|\n")
	for _, r := range rs {
		fmt.Fprintf(&b, "| %d × %d | %.1f s | %.2f s | %.2f s | %.1f MiB | %.1f MiB | %.2f / %.2f ms | %.1f / %.1f ms |\n",
			r.Services, r.EndpointsPerSvc, r.IstiodReadySec, r.SyncSec, r.DaemonCPUSec, r.RSSMiB, r.PeakRSSMiB, r.UpdateP50Ms, r.UpdateP99Ms, r.UpdateE2EP50Ms, r.UpdateE2EP99Ms)
	}
	b.WriteString("\nTargets: 10k × 10 in ≤ 2 s, update p99 ≤ 10 ms, RSS ≤ 80 MiB.\n")
	b.WriteString("\"update apply\" is the daemon's own time from receiving an xDS response to the last map write\n")
	b.WriteString("(`kmesh_xds_apply_seconds`); \"pod update → kernel\" adds istiod's processing and the stream, as seen\n")
	b.WriteString("by polling the pinned maps.\n")
	if len(rs) > 0 {
		fmt.Fprintf(&b, "\nKernel %s, %s.\n", rs[0].KernelVersion, rs[0].GoVersion)
	}
	return os.WriteFile(filepath.Join(dir, "sync.md"), []byte(b.String()), 0o644)
}
