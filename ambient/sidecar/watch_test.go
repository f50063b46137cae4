package sidecar

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"testing"
	"time"

	"kmesh.dev/kmesh/bpf"
)

type lockedMap struct {
	mu sync.Mutex
	m  memMap
}

func (l *lockedMap) SetSpliceNS(c uint64, f bpf.SpliceNS) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.m.SetSpliceNS(c, f)
}

func (l *lockedMap) SetSidecarPod(uint64, netip.Addr) error      { return nil }
func (l *lockedMap) DeleteSidecarPod(uint64) error               { return nil }
func (l *lockedMap) SidecarPods() (map[uint64]netip.Addr, error) { return nil, nil }

func (l *lockedMap) get() map[uint64]bpf.SpliceNS {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[uint64]bpf.SpliceNS{}
	for k, v := range l.m {
		out[k] = v
	}
	return out
}

func podJSONText(uid, ann string) string {
	return fmt.Sprintf(`{"metadata":{"uid":%q,"name":%q,"namespace":"ns1","annotations":{"sidecar.istio.io/status":"{}"%s}},"spec":{"nodeName":"n1"},"status":{"phase":"Running"}}`, uid, uid, ann)
}

// The watch lists this node's pods (asking only for them) and the
// namespaces, applies them, then follows the watch streams.
func TestWatch(t *testing.T) {
	podEvents, nsEvents := make(chan string, 4), make(chan string, 4)
	var bad []string
	var mu sync.Mutex
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer tok" {
			http.Error(w, "no token", http.StatusUnauthorized)
			return
		}
		q := r.URL.Query()
		watch := q.Get("watch") == "true"
		var events chan string
		switch r.URL.Path {
		case "/api/v1/pods":
			if q.Get("fieldSelector") != "spec.nodeName=n1" {
				mu.Lock()
				bad = append(bad, "pods asked without the node's field selector: "+r.URL.RawQuery)
				mu.Unlock()
			}
			if !watch {
				fmt.Fprintf(w, `{"metadata":{"resourceVersion":"5"},"items":[%s,%s]}`, podJSONText("a", `,"kmesh.dev/splice":"true"`), podJSONText("b", ""))
				return
			}
			events = podEvents
		case "/api/v1/namespaces":
			if !watch {
				fmt.Fprint(w, `{"metadata":{"resourceVersion":"7"},"items":[{"metadata":{"name":"ns1","annotations":{"kmesh.dev/splice":"true"}}}]}`)
				return
			}
			events = nsEvents
		default:
			http.NotFound(w, r)
			return
		}
		if q.Get("resourceVersion") == "" {
			mu.Lock()
			bad = append(bad, "watch without the list's resource version")
			mu.Unlock()
		}
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		for {
			select {
			case <-r.Context().Done():
				return
			case e := <-events:
				fmt.Fprintln(w, e)
				w.(http.Flusher).Flush()
			}
		}
	}))
	defer srv.Close()
	m := &lockedMap{m: memMap{}}
	r := &Reconciler{Node: "n1", Map: m, Finder: fakeFinder{"a": 1, "b": 2}, Max: 10}
	w := &Watch{Server: srv.URL, Client: srv.Client(), Token: func() (string, error) { return "tok", nil }, Node: "n1", R: r, Retry: 50 * time.Millisecond}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); w.Run(ctx) }()
	defer func() { cancel(); <-done }()
	wait := func(step string, want map[uint64]bpf.SpliceNS) {
		t.Helper()
		var got map[uint64]bpf.SpliceNS
		for range 200 {
			got = m.get()
			if fmt.Sprint(got) == fmt.Sprint(want) {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Fatalf("%s: %v, want %v", step, got, want)
	}
	in := bpf.SpliceInPod
	wait("listed", map[uint64]bpf.SpliceNS{1: in, 2: in})
	nsEvents <- `{"type":"MODIFIED","object":{"metadata":{"name":"ns1","annotations":{}}}}`
	wait("namespace opted out", map[uint64]bpf.SpliceNS{1: in})
	podEvents <- `{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"9"}}}`
	podEvents <- fmt.Sprintf(`{"type":"DELETED","object":%s}`, podJSONText("a", `,"kmesh.dev/splice":"true"`))
	wait("pod deleted", map[uint64]bpf.SpliceNS{})
	mu.Lock()
	defer mu.Unlock()
	for _, b := range bad {
		t.Error(b)
	}
}

// TestPodJSON: what the capture decision needs is read from an injected
// pod as the API server serves it: the IPv4 among the pod's addresses, and
// the sidecar's identity from its container (or, for a native sidecar, its
// init container), falling back to the pod's securityContext.
func TestPodJSON(t *testing.T) {
	for _, c := range []struct {
		name, json string
		ip         string
		uid, gid   int64
	}{
		{"sidecar container, dual stack with IPv6 first",
			`{"metadata":{"uid":"u"},"spec":{"containers":[{"name":"app"},{"name":"istio-proxy","securityContext":{"runAsUser":1337,"runAsGroup":1337}}]},` +
				`"status":{"podIP":"fd00::5","podIPs":[{"ip":"fd00::5"},{"ip":"10.244.1.5"}]}}`, "10.244.1.5", 1337, 1337},
		{"native sidecar (init container), group from the pod",
			`{"metadata":{"uid":"u"},"spec":{"securityContext":{"runAsGroup":1337,"runAsUser":1000},"initContainers":[{"name":"istio-proxy","securityContext":{"runAsUser":1337}}]},` +
				`"status":{"podIP":"10.244.1.6"}}`, "10.244.1.6", 1337, 1337},
		{"IPv6 only, identity unknown", `{"metadata":{"uid":"u"},"spec":{"containers":[{"name":"istio-proxy"}]},"status":{"podIPs":[{"ip":"fd00::7"}]}}`, "invalid IP", 0, 0},
	} {
		var p podJSON
		if err := json.Unmarshal([]byte(c.json), &p); err != nil {
			t.Fatal(err)
		}
		got := p.pod()
		if got.IPv4.String() != c.ip || got.ProxyUID != c.uid || got.ProxyGID != c.gid {
			t.Errorf("%s: %s uid %d gid %d, want %s %d %d", c.name, got.IPv4, got.ProxyUID, got.ProxyGID, c.ip, c.uid, c.gid)
		}
	}
}
