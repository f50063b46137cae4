package zds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sort"
	"sync"
	"time"

	"istio.io/istio/pkg/zdsapi"
)

// Server is the node-agent end of ZDS: it holds the enrolled pods of one
// node and tells the connected node proxy about them, as istio-cni does.
type Server struct {
	path string
	l    *net.UnixListener
	log  *slog.Logger

	mu     sync.Mutex
	closed bool
	pods   map[string]*pod
	conn   *serverConn // the newest proxy connection gets the updates
}

// pod is an enrolled pod. Its netns file belongs to the Server (closed by
// AddPod replacing it, DelPod and Close, under mu). A message carrying a pod's
// namespace carries a duplicate of its own, made under mu, which belongs to
// the message and is closed once sent or dropped: a namespace replaced or
// removed while a message is in flight is never closed under the sender (whose
// fd number the kernel could meanwhile give to another file).
type pod struct {
	info  *zdsapi.WorkloadInfo
	netns *os.File
}

type serverConn struct {
	uc   *net.UnixConn
	reqs chan request
	done chan struct{}
}

// request is a message for the proxy; fd (nil or a duplicate) belongs to
// the request: to submit until serve receives it, then to serve.
type request struct {
	msg  *zdsapi.WorkloadRequest
	fd   *os.File
	resp chan error
}

// Listen creates the socket (replacing a stale one left by a crash).
func Listen(path string, log *slog.Logger) (*Server, error) {
	if log == nil {
		log = slog.Default()
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("ZDS socket %s: %w", path, err)
	}
	return &Server{path: path, l: l, log: log.With("component", "zds-server"), pods: map[string]*pod{}}, nil
}

// Run accepts proxy connections until ctx ends.
func (s *Server) Run(ctx context.Context) {
	context.AfterFunc(ctx, func() { s.l.Close() })
	for {
		uc, err := s.l.AcceptUnix()
		if err != nil {
			return
		}
		go func() {
			if err := s.serve(ctx, uc); err != nil && ctx.Err() == nil {
				s.log.Debug("proxy connection ended", "err", err)
			}
		}()
	}
}

func (s *Server) serve(ctx context.Context, uc *net.UnixConn) error {
	defer uc.Close()
	// reqs is unbuffered so that a request is either received by this loop
	// (which then owns its fd) or still the submitter's when we stop.
	c := &serverConn{uc: uc, reqs: make(chan request), done: make(chan struct{})}
	defer close(c.done)
	// Register before the snapshot, as Istio's agent does, so no add made
	// meanwhile is lost (at worst it arrives twice; adds are idempotent).
	s.mu.Lock()
	s.conn = c
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		if s.conn == c {
			s.conn = nil
		}
		s.mu.Unlock()
	}()

	var hello zdsapi.ZdsHello
	if fd, err := readMsg(uc, &hello, time.Now().Add(ioTimeout)); err != nil {
		return fmt.Errorf("reading hello: %w", err)
	} else if fd != nil {
		fd.Close()
	}
	if hello.GetVersion() != zdsapi.Version_V1 {
		return fmt.Errorf("unsupported ZDS version %v", hello.GetVersion())
	}
	snap, err := s.snapshot()
	if err != nil {
		return err
	}
	for i, p := range snap {
		err := c.send(p.msg, p.fd)
		p.fd.Close()
		if err != nil {
			for _, rest := range snap[i+1:] {
				rest.fd.Close()
			}
			return err
		}
	}
	if err := c.send(&zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_SnapshotSent{SnapshotSent: &zdsapi.SnapshotSent{}}}, nil); err != nil {
		return err
	}
	for {
		select {
		case r := <-c.reqs:
			err := c.send(r.msg, r.fd)
			if r.fd != nil {
				r.fd.Close()
			}
			r.resp <- err
		case <-ctx.Done():
			return nil
		}
	}
}

// send writes one request and waits for its ack.
func (c *serverConn) send(m *zdsapi.WorkloadRequest, fd *os.File) error {
	if err := writeMsg(c.uc, m, fd); err != nil {
		return err
	}
	var resp zdsapi.WorkloadResponse
	f, err := readMsg(c.uc, &resp, time.Now().Add(ioTimeout))
	if f != nil {
		f.Close()
	}
	if err != nil {
		return fmt.Errorf("waiting for the proxy's ack: %w", err)
	}
	if e := resp.GetAck().GetError(); e != "" {
		return fmt.Errorf("proxy refused: %s", e)
	}
	return nil
}

// snapEntry is one add of a snapshot; fd is a duplicate the caller closes.
type snapEntry struct {
	msg *zdsapi.WorkloadRequest
	fd  *os.File
}

// snapshot is an add for every enrolled pod, each with a duplicate of the
// pod's namespace taken under mu (the caller closes them).
func (s *Server) snapshot() ([]snapEntry, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	uids := make([]string, 0, len(s.pods))
	for uid := range s.pods {
		uids = append(uids, uid)
	}
	sort.Strings(uids)
	out := make([]snapEntry, 0, len(uids))
	for _, uid := range uids {
		p := s.pods[uid]
		fd, err := dup(p.netns)
		if err != nil {
			for _, e := range out {
				e.fd.Close()
			}
			return nil, err
		}
		out = append(out, snapEntry{msg: addMsg(uid, p.info), fd: fd})
	}
	return out, nil
}

func addMsg(uid string, info *zdsapi.WorkloadInfo) *zdsapi.WorkloadRequest {
	return &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Add{Add: &zdsapi.AddWorkload{Uid: uid, WorkloadInfo: info}}}
}

// submit hands a request to the connected proxy and waits for its ack. With
// no proxy connected it succeeds: the next proxy gets the pod in its snapshot.
// submit owns fd (nil, or a duplicate for this message): it closes it unless
// the connection's loop took the request, which then closes it.
func (s *Server) submit(ctx context.Context, c *serverConn, m *zdsapi.WorkloadRequest, fd *os.File) error {
	if c == nil {
		if fd != nil {
			fd.Close()
		}
		return nil
	}
	r := request{msg: m, fd: fd, resp: make(chan error, 1)}
	select {
	case c.reqs <- r:
	case <-c.done:
		if fd != nil {
			fd.Close()
		}
		return nil
	case <-ctx.Done():
		if fd != nil {
			fd.Close()
		}
		return ctx.Err()
	}
	select {
	case err := <-r.resp:
		return err
	case <-c.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// AddPod enrols a pod: the server keeps a duplicate of netns (the caller
// keeps its own) and tells the proxy. After Close it fails (net.ErrClosed).
func (s *Server) AddPod(ctx context.Context, uid string, info *zdsapi.WorkloadInfo, netns *os.File) error {
	kept, err := dup(netns)
	if err != nil {
		return err
	}
	sent, err := dup(netns)
	if err != nil {
		kept.Close()
		return err
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		kept.Close()
		sent.Close()
		return net.ErrClosed
	}
	if old := s.pods[uid]; old != nil {
		old.netns.Close()
	}
	s.pods[uid] = &pod{info: info, netns: kept}
	c := s.conn
	s.mu.Unlock()
	return s.submit(ctx, c, addMsg(uid, info), sent)
}

// DelPod unenrols a pod.
func (s *Server) DelPod(ctx context.Context, uid string) error {
	s.mu.Lock()
	p := s.pods[uid]
	delete(s.pods, uid)
	c := s.conn
	s.mu.Unlock()
	if p == nil {
		return nil
	}
	p.netns.Close()
	return s.submit(ctx, c, &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Del{Del: &zdsapi.DelWorkload{Uid: uid}}}, nil)
}

// Enrolled lists the enrolled pod uids.
func (s *Server) Enrolled() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.pods))
	for uid := range s.pods {
		out = append(out, uid)
	}
	sort.Strings(out)
	return out
}

// Close stops listening and releases the namespaces it holds.
func (s *Server) Close() error {
	err := s.l.Close()
	if errors.Is(err, net.ErrClosed) {
		err = nil // Run's context already closed it
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for uid, p := range s.pods {
		p.netns.Close()
		delete(s.pods, uid)
	}
	_ = os.Remove(s.path)
	return err
}

func dup(f *os.File) (*os.File, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var nf *os.File
	var derr error
	err = rc.Control(func(fd uintptr) {
		var n int
		n, derr = dupCloexec(int(fd))
		if derr == nil {
			nf = os.NewFile(uintptr(n), f.Name())
		}
	})
	if err != nil {
		return nil, err
	}
	return nf, derr
}
