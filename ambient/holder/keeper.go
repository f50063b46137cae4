package holder

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Keeper is the daemon's side. It keeps its own duplicate of every socket
// it put, so a holder that restarts gets them all again, and the sockets
// a previous daemon left (inherited at Open) until the daemon claims them
// or releases them. A holder that is not there (or goes away) costs
// nothing but the protection: the daemon serves with its own sockets,
// and the keeper reconnects with backoff.
type Keeper struct {
	path string
	log  *slog.Logger
	// timeout bounds one request's answer.
	timeout time.Duration

	mu        sync.Mutex
	held      map[Key]*os.File // what this daemon put: its own duplicates
	inherited map[Key]*os.File // what the holder had at Open, unclaimed

	reqMu sync.Mutex // one request in flight
	cur   atomic.Pointer[link]

	connected atomic.Bool
	cancel    context.CancelFunc
	done      chan struct{}
}

// link is one connection to the holder; its reader hands answers over.
type link struct {
	c    *net.UnixConn
	in   chan answer
	gone chan struct{}
}

type answer struct {
	m Msg
	f *os.File
}

// Open connects to the holder at path and takes the sockets it holds
// (their keys tell the daemon which pod and listener each was). When the
// holder is not there, Open still returns a keeper: nothing is inherited,
// and it keeps trying to connect in the background.
func Open(ctx context.Context, path string, log *slog.Logger) *Keeper {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	k := &Keeper{path: path, log: log.With("component", "holder", "socket", path), timeout: 2 * time.Second,
		held: map[Key]*os.File{}, inherited: map[Key]*os.File{}, done: make(chan struct{})}
	l, err := k.dial()
	if err == nil {
		var got map[Key]*os.File
		if got, err = k.list(l); err == nil {
			k.inherited = got
			k.cur.Store(l)
			k.connected.Store(true)
			k.log.Info("listener holder connected", "held_sockets", len(got))
		} else {
			l.c.Close()
		}
	}
	if err != nil {
		k.log.Warn("listener holder not reachable: listeners will not outlive this daemon until it is", "err", err)
	}
	// The keeper lives until Close, not until ctx ends: a daemon stopping
	// on purpose cancels its context first and releases the holder's
	// copies after (Close(true)), which needs the connection.
	ctx, k.cancel = context.WithCancel(context.WithoutCancel(ctx))
	go k.run(ctx)
	return k
}

func (k *Keeper) dial() (*link, error) {
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: k.path, Net: "unixpacket"})
	if err != nil {
		return nil, err
	}
	l := &link{c: c, in: make(chan answer, 16), gone: make(chan struct{})}
	go func() {
		defer close(l.gone)
		defer close(l.in)
		for {
			m, f, err := recv(c)
			if err != nil {
				return
			}
			l.in <- answer{m, f}
		}
	}()
	return l, nil
}

// run keeps a connection to the holder: when it drops, reconnect with
// backoff and put every socket again.
func (k *Keeper) run(ctx context.Context) {
	defer close(k.done)
	backoff := 50 * time.Millisecond
	for {
		if l := k.cur.Load(); l != nil {
			select {
			case <-ctx.Done():
				l.c.Close()
				return
			case <-l.gone:
			}
			l.c.Close()
			k.cur.Store(nil)
			k.connected.Store(false)
			k.log.Warn("listener holder connection lost: serving with the daemon's own sockets, reconnecting")
			backoff = 50 * time.Millisecond
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
		l, err := k.dial()
		if err != nil {
			continue
		}
		// Under reqMu: no put or drop interleaves with the re-put.
		k.reqMu.Lock()
		k.mu.Lock()
		keys := make([]Key, 0, len(k.held))
		fds := make([]*os.File, 0, len(k.held))
		for key, f := range k.held {
			if d, err := dupFD(f.Fd(), key.String()); err == nil {
				keys, fds = append(keys, key), append(fds, d)
			}
		}
		k.mu.Unlock()
		var perr error
		for i, key := range keys {
			if perr == nil {
				perr = k.request(l, Msg{Op: OpPut, Key: key}, fds[i])
			}
			fds[i].Close()
		}
		if perr != nil {
			k.reqMu.Unlock()
			l.c.Close()
			k.log.Warn("listener holder: putting the sockets again failed", "err", perr)
			continue
		}
		k.cur.Store(l)
		k.connected.Store(true)
		k.reqMu.Unlock()
		k.log.Info("listener holder connected: every listener is held again", "sockets", len(keys))
	}
}

// request sends m (with f attached when not nil) and waits for ok.
func (k *Keeper) request(l *link, m Msg, f *os.File) error {
	fd := -1
	if f != nil {
		fd = int(f.Fd())
	}
	if err := send(l.c, m, fd); err != nil {
		return err
	}
	a, err := k.await(l)
	if err != nil {
		return err
	}
	switch a.m.Op {
	case OpOK:
		return nil
	case OpErr:
		return fmt.Errorf("holder refused %s %s: %s", m.Op, m.Key, a.m.Text)
	}
	return fmt.Errorf("holder answered %s to %s", a.m.Op, m.Op)
}

func (k *Keeper) await(l *link) (answer, error) {
	t := time.NewTimer(k.timeout)
	defer t.Stop()
	select {
	case a, ok := <-l.in:
		if !ok {
			return answer{}, errors.New("holder connection closed")
		}
		if a.f != nil && a.m.Op != OpEntry {
			a.f.Close()
		}
		return a, nil
	case <-t.C:
		l.c.Close() // the reader ends, run reconnects
		return answer{}, errors.New("holder did not answer")
	}
}

// list asks for every held socket.
func (k *Keeper) list(l *link) (map[Key]*os.File, error) {
	if err := send(l.c, Msg{Op: OpList}, -1); err != nil {
		return nil, err
	}
	got := map[Key]*os.File{}
	for {
		a, err := k.await(l)
		if err != nil {
			for _, f := range got {
				f.Close()
			}
			return nil, err
		}
		switch a.m.Op {
		case OpEntry:
			if old := got[a.m.Key]; old != nil {
				old.Close()
			}
			got[a.m.Key] = a.f
		case OpOK:
			return got, nil
		default:
			for _, f := range got {
				f.Close()
			}
			return nil, fmt.Errorf("holder answered %s %q to list", a.m.Op, a.m.Text)
		}
	}
}

// send does one request on the current connection, if there is one. A
// failure is logged, not returned: the daemon serves without the holder.
func (k *Keeper) send(m Msg, f *os.File) {
	k.reqMu.Lock()
	defer k.reqMu.Unlock()
	l := k.cur.Load()
	if l == nil {
		return // re-put on reconnect covers puts; drops are moot
	}
	if err := k.request(l, m, f); err != nil {
		k.log.Warn("listener holder request failed", "op", m.Op.String(), "key", m.Key.String(), "err", err)
	}
}

// Claim takes the socket a previous daemon left under key, if the holder
// had one. The caller owns it (and checks it is what it wants).
func (k *Keeper) Claim(key Key) *os.File {
	k.mu.Lock()
	defer k.mu.Unlock()
	f := k.inherited[key]
	delete(k.inherited, key)
	return f
}

// Put has the holder keep the socket fd under key (a duplicate: the
// caller keeps its own), replacing what key held.
func (k *Keeper) Put(key Key, fd uintptr) error {
	d, err := dupFD(fd, key.String())
	if err != nil {
		return err
	}
	k.mu.Lock()
	old := k.held[key]
	k.held[key] = d
	k.mu.Unlock()
	if old != nil {
		old.Close()
	}
	k.send(Msg{Op: OpPut, Key: key}, d)
	return nil
}

// Drop stops holding key.
func (k *Keeper) Drop(key Key) {
	k.mu.Lock()
	f := k.held[key]
	delete(k.held, key)
	k.mu.Unlock()
	if f != nil {
		f.Close()
	}
	k.send(Msg{Op: OpDrop, Key: key}, nil)
}

// DropPod stops holding every socket of a pod (it left the mesh).
func (k *Keeper) DropPod(pod string) {
	k.mu.Lock()
	for key, f := range k.held {
		if key.Pod == pod {
			f.Close()
			delete(k.held, key)
		}
	}
	for key, f := range k.inherited {
		if key.Pod == pod {
			f.Close()
			delete(k.inherited, key)
		}
	}
	k.mu.Unlock()
	k.send(Msg{Op: OpDropPod, Key: Key{Pod: pod}}, nil)
}

// ReleaseInherited drops what no pod claimed: after the node agent's
// first snapshot, those are sockets of pods that left (or listeners this
// daemon no longer opens). Left held, they would take connections that
// nobody accepts. It returns how many it dropped.
func (k *Keeper) ReleaseInherited() int {
	k.mu.Lock()
	var drop []Key
	for key, f := range k.inherited {
		f.Close()
		if _, reput := k.held[key]; !reput {
			drop = append(drop, key)
		}
	}
	k.inherited = map[Key]*os.File{}
	k.mu.Unlock()
	for _, key := range drop {
		k.send(Msg{Op: OpDrop, Key: key}, nil)
	}
	if len(drop) > 0 {
		k.log.Info("dropped held sockets no enrolled pod claimed", "sockets", len(drop))
	}
	return len(drop)
}

// Connected reports whether the holder has this daemon's sockets now.
func (k *Keeper) Connected() bool { return k != nil && k.connected.Load() }

// Held is how many sockets this daemon has put.
func (k *Keeper) Held() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.held)
}

// Close disconnects. With release, the holder is first told to drop
// everything this daemon put: a daemon that stops on purpose (an upgrade)
// hands its connections over to its successor's listeners, and a socket
// left held would keep queueing connections that nobody accepts. Without
// release the holder keeps them, for the next daemon.
func (k *Keeper) Close(release bool) {
	if k == nil {
		return
	}
	if release {
		k.mu.Lock()
		pods := map[string]bool{}
		for key := range k.held {
			pods[key.Pod] = true
		}
		for key := range k.inherited {
			pods[key.Pod] = true
		}
		k.mu.Unlock()
		for pod := range pods {
			k.DropPod(pod)
		}
	}
	k.cancel()
	<-k.done
	k.connected.Store(false)
	k.mu.Lock()
	defer k.mu.Unlock()
	for key, f := range k.held {
		f.Close()
		delete(k.held, key)
	}
	for key, f := range k.inherited {
		f.Close()
		delete(k.inherited, key)
	}
}
