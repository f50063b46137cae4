package zds

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
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

// checker is a handler that counts adds whose namespace is not the one the
// test enrols.
type checker struct {
	want      uint64
	adds, bad atomic.Int64
}

func (c *checker) Add(_ string, _ *zdsapi.WorkloadInfo, netns *os.File) error {
	defer netns.Close()
	c.adds.Add(1)
	if ino(netns) != c.want {
		c.bad.Add(1)
	}
	return nil
}
func (c *checker) Keep(string) error   { return nil }
func (c *checker) Del(string) error    { return nil }
func (c *checker) SnapshotSent() error { return nil }

// Pods replaced and removed while their adds are being sent (live and in
// snapshots to reconnecting proxies), and the server closed under a
// snapshot: every namespace the proxy receives is the one enrolled — never
// a descriptor closed under the sender, whose number the kernel hands to
// the next file opened (here: /dev/null, opened in a loop). Run with -race.
func TestServerFdOwnership(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "ztunnel.sock")
	srv, err := Listen(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go srv.Run(ctx)
	ns, err := os.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	chk := &checker{want: ino(ns)}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { // reuse freed fd numbers at once
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if f, err := os.Open("/dev/null"); err == nil {
				f.Close()
			}
		}
	}()
	go func() { // proxies come and go: snapshots race the updates
		defer wg.Done()
		for {
			cctx, ccancel := context.WithCancel(ctx)
			go (&Client{Path: path, Handler: chk}).Run(cctx)
			select {
			case <-stop:
				ccancel()
				return
			case <-time.After(5 * time.Millisecond):
			}
			ccancel()
		}
	}()
	go func() {
		defer wg.Done()
		for i := range 2000 {
			uid := fmt.Sprintf("uid-%d", i%8)
			_ = srv.AddPod(ctx, uid, &zdsapi.WorkloadInfo{Name: uid}, ns)
			if i%3 == 0 {
				_ = srv.DelPod(ctx, fmt.Sprintf("uid-%d", (i+4)%8))
			}
		}
	}()
	time.Sleep(200 * time.Millisecond)
	// Close under whatever is being sent.
	srv.Close()
	close(stop)
	cancel()
	wg.Wait()
	t.Logf("%d adds received", chk.adds.Load())
	if chk.adds.Load() == 0 {
		t.Fatal("no add reached the proxy")
	}
	if b := chk.bad.Load(); b != 0 {
		t.Fatalf("%d of %d adds carried a descriptor that was not the enrolled namespace", b, chk.adds.Load())
	}
}
