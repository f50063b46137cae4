package holder

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// Server is the holder: it keeps the sockets it is given until told to
// drop them or until it exits. It makes no decision about them; whoever
// takes them back checks that they are what it wants.
type Server struct {
	// MaxHeld bounds the sockets held at once (default 65536: the
	// daemon's 4096 pods by default, a few listeners each, with room).
	// A put beyond it is refused and the daemon keeps serving with its own.
	MaxHeld int
	// MaxConns bounds the clients at once (default 4: one daemon, plus a
	// restarted one arriving before the old connection is noticed gone).
	MaxConns int
	Log      *slog.Logger

	mu    sync.Mutex
	held  map[Key]*os.File
	conns map[*net.UnixConn]struct{}
}

func (s *Server) init() {
	if s.held == nil {
		s.held = map[Key]*os.File{}
		s.conns = map[*net.UnixConn]struct{}{}
	}
	if s.MaxHeld == 0 {
		s.MaxHeld = 1 << 16
	}
	if s.MaxConns == 0 {
		s.MaxConns = 4
	}
	if s.Log == nil {
		s.Log = slog.New(slog.DiscardHandler)
	}
}

// Listen creates the holder's socket at path (replacing a stale one a
// previous holder left), readable and writable by its owner only.
func Listen(path string) (*net.UnixListener, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// Serve accepts clients on l until ctx ends, then closes l. Held sockets
// stay held: Close releases them.
func (s *Server) Serve(ctx context.Context, l *net.UnixListener) error {
	s.mu.Lock()
	s.init()
	s.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		if err := checkPeer(c); err != nil {
			s.Log.Warn("client refused", "err", err)
			c.Close()
			continue
		}
		s.mu.Lock()
		if len(s.conns) >= s.MaxConns {
			s.mu.Unlock()
			s.Log.Warn("client refused: too many clients", "max", s.MaxConns)
			c.Close()
			continue
		}
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		closeOnStop := context.AfterFunc(ctx, func() { c.Close() })
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer closeOnStop()
			s.serveConn(c)
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
			c.Close()
		}()
	}
}

// checkPeer admits only processes of the holder's own user: the socket
// file's mode says the same, this does not depend on the directory.
func checkPeer(c *net.UnixConn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if cerr != nil {
		return fmt.Errorf("SO_PEERCRED: %w", cerr)
	}
	if int(cred.Uid) != os.Geteuid() {
		return fmt.Errorf("peer uid %d is not the holder's %d", cred.Uid, os.Geteuid())
	}
	return nil
}

// serveConn answers one client until it closes or sends something
// malformed (answered with err, then the connection is closed: a client
// that does not speak the protocol gets nothing more).
func (s *Server) serveConn(c *net.UnixConn) {
	for {
		m, f, err := recv(c)
		if err != nil {
			if errors.Is(err, ErrMalformed) {
				s.Log.Warn("malformed message: closing the client", "err", err)
				_ = send(c, Msg{Op: OpErr, Text: truncate(err.Error())}, -1)
			} else if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				s.Log.Warn("client connection failed", "err", err)
			}
			return
		}
		if err := s.handle(c, m, f); err != nil {
			if err := send(c, Msg{Op: OpErr, Text: truncate(err.Error())}, -1); err != nil {
				return
			}
			continue
		}
		if m.Op == OpList {
			continue // handle answered
		}
		if err := send(c, Msg{Op: OpOK}, -1); err != nil {
			return
		}
	}
}

func truncate(s string) string {
	if len(s) > MaxText {
		return s[:MaxText]
	}
	return s
}

// handle does one request; f (a put's socket) is the server's from now on.
func (s *Server) handle(c *net.UnixConn, m Msg, f *os.File) error {
	switch m.Op {
	case OpPut:
		if !isSocket(f) {
			f.Close()
			return errors.New("not a socket")
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		old, had := s.held[m.Key]
		if !had && len(s.held) >= s.MaxHeld {
			f.Close()
			return fmt.Errorf("holding %d sockets already", len(s.held))
		}
		s.held[m.Key] = f
		if had {
			old.Close()
		}
		s.Log.Debug("holding", "key", m.Key.String())
	case OpDrop:
		s.mu.Lock()
		if f := s.held[m.Key]; f != nil {
			f.Close()
			delete(s.held, m.Key)
		}
		s.mu.Unlock()
	case OpDropPod:
		s.mu.Lock()
		for k, f := range s.held {
			if k.Pod == m.Key.Pod {
				f.Close()
				delete(s.held, k)
			}
		}
		s.mu.Unlock()
		s.Log.Debug("dropped pod", "pod", m.Key.Pod)
	case OpList:
		// Duplicates, so that the sockets stay held while they travel and
		// the client's copies are its own.
		s.mu.Lock()
		var fs []*os.File
		var keys []Key
		for k, f := range s.held {
			d, err := dupFD(f.Fd(), k.String())
			if err != nil {
				continue
			}
			fs, keys = append(fs, d), append(keys, k)
		}
		s.mu.Unlock()
		defer func() {
			for _, f := range fs {
				f.Close()
			}
		}()
		for i, f := range fs {
			if err := send(c, Msg{Op: OpEntry, Key: keys[i]}, int(f.Fd())); err != nil {
				return err
			}
		}
		return send(c, Msg{Op: OpOK}, -1)
	default:
		return fmt.Errorf("%s is not a request", m.Op)
	}
	return nil
}

// Len is how many sockets are held.
func (s *Server) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.held)
}

// Close releases every held socket.
func (s *Server) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, f := range s.held {
		f.Close()
		delete(s.held, k)
	}
}
