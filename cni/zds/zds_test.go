package zds

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"istio.io/istio/pkg/zdsapi"
)

type event struct {
	kind, uid string
	ino       uint64
}

type recorder struct {
	mu     sync.Mutex
	events []event
	got    chan event
}

func (r *recorder) add(e event) {
	r.mu.Lock()
	r.events = append(r.events, e)
	r.mu.Unlock()
	r.got <- e
}

func ino(f *os.File) uint64 {
	var st unix.Stat_t
	_ = unix.Fstat(int(f.Fd()), &st)
	return st.Ino
}

func (r *recorder) Add(uid string, _ *zdsapi.WorkloadInfo, netns *os.File) error {
	defer netns.Close()
	r.add(event{"add", uid, ino(netns)})
	return nil
}
func (r *recorder) Keep(uid string) error { r.add(event{"keep", uid, 0}); return nil }
func (r *recorder) Del(uid string) error  { r.add(event{"del", uid, 0}); return nil }
func (r *recorder) SnapshotSent() error   { r.add(event{"snapshot", "", 0}); return nil }

func next(t *testing.T, r *recorder) event {
	t.Helper()
	select {
	case e := <-r.got:
		return e
	case <-time.After(5 * time.Second):
		t.Fatal("no ZDS event")
		return event{}
	}
}

// The server and client talk the ZDS wire protocol; a namespace fd sent by
// the agent arrives as the same namespace (same inode) at the proxy.
func TestServerClient(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "ztunnel.sock")
	srv, err := Listen(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go srv.Run(ctx)

	ns, err := os.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	want := ino(ns)
	// A pod enrolled before the proxy connects comes in the snapshot.
	if err := srv.AddPod(ctx, "uid-1", &zdsapi.WorkloadInfo{Name: "a", Namespace: "ns", ServiceAccount: "sa"}, ns); err != nil {
		t.Fatal(err)
	}
	rec := &recorder{got: make(chan event, 16)}
	cctx, ccancel := context.WithCancel(ctx)
	go (&Client{Path: path, Handler: rec}).Run(cctx)
	if e := next(t, rec); e != (event{"add", "uid-1", want}) {
		t.Fatalf("snapshot add: %+v", e)
	}
	if e := next(t, rec); e.kind != "snapshot" {
		t.Fatalf("want snapshot_sent, got %+v", e)
	}
	// Live updates after the snapshot, acked one by one.
	if err := srv.AddPod(ctx, "uid-2", &zdsapi.WorkloadInfo{Name: "b"}, ns); err != nil {
		t.Fatal(err)
	}
	if e := next(t, rec); e != (event{"add", "uid-2", want}) {
		t.Fatalf("add: %+v", e)
	}
	if err := srv.DelPod(ctx, "uid-1"); err != nil {
		t.Fatal(err)
	}
	if e := next(t, rec); e != (event{"del", "uid-1", 0}) {
		t.Fatalf("del: %+v", e)
	}
	// The proxy restarts: it gets the current pods again, then snapshot_sent.
	ccancel()
	time.Sleep(50 * time.Millisecond)
	go (&Client{Path: path, Handler: rec}).Run(ctx)
	if e := next(t, rec); e != (event{"add", "uid-2", want}) {
		t.Fatalf("after reconnect: %+v", e)
	}
	if e := next(t, rec); e.kind != "snapshot" {
		t.Fatalf("want snapshot_sent, got %+v", e)
	}
	if got := srv.Enrolled(); len(got) != 1 || got[0] != "uid-2" {
		t.Fatalf("enrolled %v", got)
	}
}
