package agent

import (
	"bytes"
	"encoding/json"
	"io"
	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/bpf/bpftest"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"istio.io/istio/pkg/workloadapi"
	"istio.io/istio/pkg/zdsapi"

	"kmesh.dev/kmesh/ambient/configdump"
	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/ambient/telemetry"
)

func TestLoggingRequest(t *testing.T) {
	const cur, def = slog.LevelWarn, slog.LevelInfo
	for _, tc := range []struct {
		query string
		want  slog.Level
		err   string
	}{
		{"", cur, ""},
		{"level=", cur, ""}, // what `istioctl ztunnel-config log` sends to list
		{"level=debug", slog.LevelDebug, ""},
		{"level=trace", levelTrace, ""},
		{"level=off", LevelOff, ""},
		{"level=warning", slog.LevelWarn, ""}, // istioctl's word
		{"level=critical", slog.LevelError, ""},
		{"reset", def, ""},
		{"reset&level=", def, ""}, // `istioctl ztunnel-config log -r`
		{"reset&level=error", slog.LevelError, ""},
		{"level=loud", cur, "unknown log level"},
		{"level=access:debug,info", cur, "per-module"},
		{"level=ztunnel::proxy=debug", cur, "per-module"},
	} {
		q, _ := url.ParseQuery(tc.query)
		got, err := loggingRequest(q, cur, def)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: err %v, want %q", tc.query, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%q: %v, %v; want %v", tc.query, got, err, tc.want)
		}
	}
}

func TestLevelNamesRoundTrip(t *testing.T) {
	for _, name := range []string{"trace", "debug", "info", "warn", "error", "off"} {
		l, err := ParseLevel(name)
		if err != nil || LevelName(l) != name {
			t.Errorf("%s: parsed %v (%v), named %q", name, l, err, LevelName(l))
		}
	}
}

type testAdmin struct {
	srv    *httptest.Server
	level  *slog.LevelVar
	quits  atomic.Int32
	logged *bytes.Buffer
}

func newTestAdmin(t *testing.T, in configdump.Input) *testAdmin {
	ta := &testAdmin{level: new(slog.LevelVar), logged: &bytes.Buffer{}}
	ta.level.Set(slog.LevelInfo)
	ad := &admin{dump: func() configdump.Input { return in }, kmesh: func() any { return in.State },
		level: ta.level, def: slog.LevelInfo, quit: func() { ta.quits.Add(1) },
		log: slog.New(slog.NewTextHandler(ta.logged, &slog.HandlerOptions{Level: ta.level}))}
	ta.srv = httptest.NewServer(ad.handler())
	t.Cleanup(ta.srv.Close)
	return ta
}

func (ta *testAdmin) do(t *testing.T, method, path string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, ta.srv.URL+path, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestAdminLogging(t *testing.T) {
	ta := newTestAdmin(t, configdump.Input{})
	// The level changes what the daemon's logger writes, at once.
	dbg := slog.New(slog.NewTextHandler(ta.logged, &slog.HandlerOptions{Level: ta.level}))
	for _, step := range []struct {
		method, path string
		code         int
		body         string
		level        slog.Level
	}{
		{"GET", "/logging", 200, "current log level is info\n", slog.LevelInfo},
		{"POST", "/logging", 200, "current log level is info\n", slog.LevelInfo},
		{"POST", "/logging?level=debug", 200, "current log level is debug\n", slog.LevelDebug},
		{"GET", "/logging?level=error", 405, "use POST", slog.LevelDebug},
		{"POST", "/logging?level=access:debug", 400, "per-module", slog.LevelDebug},
		{"POST", "/logging?level=loud", 400, "error|warn|info|debug|trace|off", slog.LevelDebug},
		{"POST", "/logging?reset", 200, "current log level is info\n", slog.LevelInfo},
		{"PUT", "/logging", 405, "Invalid HTTP method", slog.LevelInfo},
	} {
		code, body := ta.do(t, step.method, step.path)
		if code != step.code || !strings.Contains(body, step.body) || ta.level.Level() != step.level {
			t.Fatalf("%s %s: %d %q, level %v; want %d %q, level %v", step.method, step.path, code, body, ta.level.Level(), step.code, step.body, step.level)
		}
		if step.path == "/logging?level=debug" {
			dbg.Debug("visible now")
		}
	}
	dbg.Debug("hidden again")
	log := ta.logged.String()
	if !strings.Contains(log, "visible now") || strings.Contains(log, "hidden again") {
		t.Errorf("the logger did not follow the level:\n%s", log)
	}
	if !strings.Contains(log, "from=info to=debug") || !strings.Contains(log, "from=debug to=info") {
		t.Errorf("level changes not logged:\n%s", log)
	}
}

func TestAdminLoggingFixedLevel(t *testing.T) {
	ad := &admin{log: slog.New(slog.DiscardHandler)}
	srv := httptest.NewServer(ad.handler())
	defer srv.Close()
	resp, err := http.Post(srv.URL+"/logging?level=debug", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotImplemented {
		t.Fatalf("a daemon without a LevelVar answered %d", resp.StatusCode)
	}
}

func TestAdminQuit(t *testing.T) {
	ta := newTestAdmin(t, configdump.Input{})
	if code, _ := ta.do(t, "GET", "/quitquitquit"); code != http.StatusMethodNotAllowed || ta.quits.Load() != 0 {
		t.Fatalf("GET /quitquitquit: %d, quit called %d times; want 405 and no shutdown", code, ta.quits.Load())
	}
	if code, body := ta.do(t, "POST", "/quitquitquit"); code != 200 || body != "shutdown now\n" || ta.quits.Load() != 1 {
		t.Fatalf("POST /quitquitquit: %d %q, quit called %d times", code, body, ta.quits.Load())
	}
}

func TestAdminConfigDumps(t *testing.T) {
	st := state.NewStore()
	w, err := state.ConvertWorkload(workloadProto("Kubernetes//Pod/demo/web-0", "web-0", "demo"))
	if err != nil {
		t.Fatal(err)
	}
	st.Apply(state.Update{Workloads: []*state.Workload{w}})
	ta := newTestAdmin(t, configdump.Input{State: st.Snapshot(),
		Pods: []configdump.Pod{{UID: "uid-1", Name: "web-0", Namespace: "demo", ServiceAccount: "default", State: "Up"}}})

	// /config_dump is ztunnel's: istioctl's keys, the pod by enrolment UID.
	code, body := ta.do(t, "GET", "/config_dump")
	var zt struct {
		Workloads []struct {
			UID      string `json:"uid"`
			Protocol string `json:"protocol"`
		} `json:"workloads"`
		WorkloadState map[string]struct {
			State string `json:"state"`
		} `json:"workloadState"`
	}
	if err := json.Unmarshal([]byte(body), &zt); code != 200 || err != nil {
		t.Fatalf("/config_dump: %d %v\n%s", code, err, body)
	}
	if len(zt.Workloads) != 1 || zt.Workloads[0].Protocol != "HBONE" || zt.WorkloadState["uid-1"].State != "Up" {
		t.Errorf("/config_dump is not ztunnel's format:\n%s", body)
	}
	// /kmesh/config_dump is the store as Kmesh holds it.
	code, body = ta.do(t, "GET", "/kmesh/config_dump")
	if code != 200 || !strings.Contains(body, `"hbone": true`) || strings.Contains(body, "workloadState") {
		t.Errorf("/kmesh/config_dump is not Kmesh's own dump: %d\n%s", code, body)
	}
}

func workloadProto(uid, name, ns string) *workloadapi.Workload {
	return &workloadapi.Workload{Uid: uid, Name: name, Namespace: ns, Node: "node-1",
		Addresses: [][]byte{{10, 244, 1, 5}}, TunnelProtocol: workloadapi.TunnelProtocol_HBONE}
}

func TestAdminIndex(t *testing.T) {
	ta := newTestAdmin(t, configdump.Input{})
	code, body := ta.do(t, "GET", "/")
	for _, p := range []string{"/config_dump", "/kmesh/config_dump", "/logging", "/quitquitquit", "/debug/pprof/"} {
		if code != 200 || !strings.Contains(body, p+" ") {
			t.Errorf("GET /: %d, does not list %s:\n%s", code, p, body)
		}
		// Each listed page exists (a GET of /quitquitquit is refused, not missing).
		if c, _ := ta.do(t, "GET", p); c == http.StatusNotFound {
			t.Errorf("GET %s: 404", p)
		}
	}
	if code, _ := ta.do(t, "GET", "/no-such-page"); code != http.StatusNotFound {
		t.Errorf("GET /no-such-page: %d, want 404", code)
	}
}

// The enroller's pods as /config_dump lists them: enrolled means Up, a pod
// without a service account is "default"'s (as its certificate is), the
// namespace cookie links the pod to kmeshctl dump managed, and each pod
// lists its open connections of both paths.
func TestDumpPods(t *testing.T) {
	e := &enroller{pods: map[string]*enrolledPod{
		"uid-web":    {info: &zdsapi.WorkloadInfo{Name: "web-0", Namespace: "demo", ServiceAccount: "web"}, cookie: 4097},
		"uid-client": {info: &zdsapi.WorkloadInfo{Name: "client", Namespace: "demo"}, cookie: 4098},
	}}
	conns := []telemetry.ConnInfo{
		// The kernel path's, known by namespace cookie: both ends' sockets.
		{Netns: 4098, Src: "10.244.1.2:40000", OriginalDst: "10.96.0.10:80", ActualDst: "10.244.1.11:8080", Protocol: "TCP"},
		{Netns: 4097, Inbound: true, Src: "10.244.1.2:40000", OriginalDst: "10.244.1.11:8080", ActualDst: "10.244.1.11:8080", Protocol: "TCP"},
		// The node proxy's, known by pod UID.
		{Pod: "uid-client", Src: "10.244.1.2:40001", OriginalDst: "10.96.0.10:80", ActualDst: "10.244.2.9:15008", Protocol: "HBONE"},
		{Pod: "uid-web", Inbound: true, Src: "10.244.2.9:39000", OriginalDst: "10.244.1.11:8080", ActualDst: "10.244.1.11:8080", Protocol: "HBONE"},
		// A pod that left meanwhile: in no list.
		{Netns: 9999, Src: "10.244.1.7:1", OriginalDst: "10.244.1.11:8080", ActualDst: "10.244.1.11:8080", Protocol: "TCP"},
	}
	got := e.dumpPods("td.example", conns)
	slices.SortFunc(got, func(a, b configdump.Pod) int { return strings.Compare(a.UID, b.UID) })
	want := []configdump.Pod{
		{UID: "uid-client", Name: "client", Namespace: "demo", ServiceAccount: "default", TrustDomain: "td.example", State: "Up", NetnsCookie: 4098,
			Connections: configdump.Connections{Outbound: []configdump.Connection{
				{Src: "10.244.1.2:40000", OriginalDst: "10.96.0.10:80", ActualDst: "10.244.1.11:8080", Protocol: "TCP"},
				{Src: "10.244.1.2:40001", OriginalDst: "10.96.0.10:80", ActualDst: "10.244.2.9:15008", Protocol: "HBONE"}}}},
		{UID: "uid-web", Name: "web-0", Namespace: "demo", ServiceAccount: "web", TrustDomain: "td.example", State: "Up", NetnsCookie: 4097,
			Connections: configdump.Connections{Inbound: []configdump.Connection{
				{Src: "10.244.1.2:40000", OriginalDst: "10.244.1.11:8080", ActualDst: "10.244.1.11:8080", Protocol: "TCP"},
				{Src: "10.244.2.9:39000", OriginalDst: "10.244.1.11:8080", ActualDst: "10.244.1.11:8080", Protocol: "HBONE"}}}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("dumpPods:\n%+v\nwant\n%+v", got, want)
	}
}

// The cookie index follows the pods: a pod is found by its namespace
// cookie while enrolled, under its new cookie after its sandbox changed,
// and not at all once it left.
func TestWorkloadByNetnsFollowsPods(t *testing.T) {
	ns := func() *os.File {
		f, err := os.Open(os.DevNull)
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	e := newEnroller(dataplane.New(bpftest.New(bpf.MapSizes{}), dataplane.Options{}), "c1", nil, nil, slog.New(slog.DiscardHandler))
	p := &enrolledPod{info: &zdsapi.WorkloadInfo{Name: "web-0", Namespace: "demo"}, workloadUID: "c1//Pod/demo/web-0", netns: ns(), cookie: 7}
	e.pods["u"], e.byCookie[7] = p, p
	if uid, ok := e.WorkloadByNetns(7); !ok || uid != p.workloadUID {
		t.Fatalf("cookie 7: %q %v", uid, ok)
	}
	if err := e.Del("u"); err != nil {
		t.Fatal(err)
	}
	if _, ok := e.WorkloadByNetns(7); ok {
		t.Fatal("a pod that left is still found by its cookie")
	}
	if _, _, ok := e.PodByNetns(7); ok {
		t.Fatal("PodByNetns finds a pod that left")
	}
}
