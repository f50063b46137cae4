package agent

import (
	"context"
	"log/slog"
	"net"
	"path/filepath"
	"testing"
	"time"

	"kmesh.dev/kmesh/ambient/dataplane"
	"kmesh.dev/kmesh/ambient/holder"
	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/bpf/bpftest"
)

// TestHolderReleaseAfterFirstSnapshot: sockets a previous daemon left in
// the listener holder for a pod that went away meanwhile are dropped once
// the node agent's first snapshot says which pods remain; claimed ones
// stay held, and later snapshots do not run the release again.
func TestHolderReleaseAfterFirstSnapshot(t *testing.T) {
	path := filepath.Join(t.TempDir(), "holder.sock")
	l, err := holder.Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &holder.Server{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ctx, l) }()
	t.Cleanup(func() { cancel(); <-done; srv.Close() })

	listen := func() uintptr {
		l, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		rc, _ := l.SyscallConn()
		var fd uintptr
		_ = rc.Control(func(f uintptr) { fd = f })
		return fd
	}
	stay, gone := holder.Key{Pod: "stay", Netns: 1, Name: "15001/v4"}, holder.Key{Pod: "gone", Netns: 2, Name: "15001/v4"}
	prev := holder.Open(context.Background(), path, nil)
	for _, k := range []holder.Key{stay, gone} {
		if err := prev.Put(k, listen()); err != nil {
			t.Fatal(err)
		}
	}
	prev.Close(false) // the previous daemon crashed

	k := holder.Open(context.Background(), path, nil)
	t.Cleanup(func() { k.Close(false) })
	e := newEnroller(dataplane.New(bpftest.New(bpf.MapSizes{}), dataplane.Options{}), "c1", nil, nil, slog.New(slog.DiscardHandler))
	runs := 0
	e.afterSnapshot = func() { runs++; k.ReleaseInherited() }
	// The "stay" pod is enrolled again: its proxy claims and re-puts it.
	f := k.Claim(stay)
	if f == nil {
		t.Fatal("the held socket of a remaining pod was not inherited")
	}
	if err := k.Put(stay, f.Fd()); err != nil {
		t.Fatal(err)
	}
	f.Close()
	for range 2 {
		if err := e.SnapshotSent(); err != nil {
			t.Fatal(err)
		}
	}
	if runs != 1 {
		t.Fatalf("release ran %d times, want once (after the first snapshot)", runs)
	}
	for end := time.Now().Add(2 * time.Second); srv.Len() != 1 && time.Now().Before(end); {
		time.Sleep(5 * time.Millisecond)
	}
	if n := srv.Len(); n != 1 {
		t.Fatalf("holder holds %d sockets, want 1 (the remaining pod's)", n)
	}
}
