package sidecar

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
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
