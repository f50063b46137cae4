package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// ConnEventKind says what happened to a kernel-path connection.
type ConnEventKind uint8

const (
	ConnOpen  ConnEventKind = 1 // CONN_EV_OPEN: established
	ConnClose ConnEventKind = 2 // CONN_EV_CLOSE: reached TCP_CLOSE
	// ConnDeny (CONN_EV_DENY): a connect the destination's policies refused
	// in the kernel (PathAuthz). No local address or port (the socket never
	// got one); Remote is the destination workload, Orig what was dialled
	// when a service was balanced, BackendID the destination's backend.
	ConnDeny ConnEventKind = 3
)

// ConnDirection says which end of the connection the enrolled pod is.
type ConnDirection uint8

const (
	ConnOutbound ConnDirection = 1 // CONN_DIR_OUTBOUND: the pod connected
	ConnInbound  ConnDirection = 2 // CONN_DIR_INBOUND: the pod accepted
)

// TCP states a close event can leave (the kernel's BPF_TCP_*).
const (
	TCPEstablished uint8 = 1
	TCPSynSent     uint8 = 2
	TCPSynRecv     uint8 = 3
	TCPFinWait1    uint8 = 4
	TCPFinWait2    uint8 = 5
	TCPTimeWait    uint8 = 6
	TCPClose       uint8 = 7
	TCPCloseWait   uint8 = 8
	TCPLastAck     uint8 = 9
	TCPListen      uint8 = 10
	TCPClosing     uint8 = 11
)

// ConnEvent is one record of kmesh_events (struct conn_event), decoded.
type ConnEvent struct {
	Kind        ConnEventKind
	Direction   ConnDirection
	SockCookie  uint64
	NetnsCookie uint64
	// Time is the kernel's monotonic clock (CLOCK_MONOTONIC) at the event.
	Time time.Duration
	// BytesAcked: bytes this socket sent that the peer acknowledged;
	// BytesReceived: bytes it received.
	BytesAcked, BytesReceived uint64
	Local, Remote             netip.AddrPort
	// Dialled is the service VIP:port the application connected to, when
	// the connect program rewrote it to a backend; invalid otherwise.
	Dialled netip.AddrPort
	// OldState is the TCP state a close event left (TCP*).
	OldState uint8
	// BackendID is the pod's own backend in an accepted socket's open
	// event, 0 elsewhere.
	BackendID uint32
}

// connEventSize is sizeof(struct conn_event); TestABILayout checks it.
const connEventSize = int(unsafe.Sizeof(sockOpsConnEvent{}))

// DecodeConnEvent decodes one kmesh_events record.
func DecodeConnEvent(raw []byte) (ConnEvent, error) {
	var v sockOpsConnEvent
	if len(raw) < connEventSize {
		return ConnEvent{}, fmt.Errorf("kmesh_events record of %d bytes, want %d", len(raw), connEventSize)
	}
	// The record is the C struct in this machine's byte order: a plain
	// copy (binary.Decode's reflection cost more than the rest of the
	// event's handling).
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&v)), connEventSize), raw)
	e := ConnEvent{Kind: ConnEventKind(v.Kind), Direction: ConnDirection(v.Direction), SockCookie: v.SockCookie,
		NetnsCookie: v.NetnsCookie, Time: time.Duration(v.TsNs), BytesAcked: v.BytesAcked, BytesReceived: v.BytesReceived,
		Local:    netip.AddrPortFrom(wordsAddr(v.LocalAddr), ntohs(v.LocalPort)),
		Remote:   netip.AddrPortFrom(wordsAddr(v.RemoteAddr), ntohs(v.RemotePort)),
		OldState: v.OldState, BackendID: v.BackendId}
	if v.OrigPort != 0 {
		e.Dialled = netip.AddrPortFrom(wordsAddr(v.OrigAddr), ntohs(v.OrigPort))
	}
	return e, nil
}

// ConnEvents reads kmesh_events. One reader per daemon: the ring buffer has
// one consumer position.
type ConnEvents struct {
	r *ringbuf.Reader
	// rec is reused by every Read (ReadInto keeps its buffer): one reader
	// goroutine, and the decoded event copies what it needs.
	rec ringbuf.Record
	// wake is a duplicate of the ring's descriptor registered with Go's
	// network poller, so that Wait parks a goroutine rather than a thread
	// (nil if the poller refused it: Wait then sleeps).
	wake   *os.File
	wakeRC syscall.RawConn
	closed atomic.Bool
}

// ErrEventsClosed is returned by Read and Wait after Close.
var ErrEventsClosed = errors.New("kmesh_events reader closed")

// OpenConnEvents starts reading kernel-path connection events.
func (m *Maps) OpenConnEvents() (*ConnEvents, error) {
	em := m.byName["kmesh_events"]
	if em == nil {
		return nil, errors.New("kmesh_events is not open")
	}
	r, err := ringbuf.NewReader(em)
	if err != nil {
		return nil, fmt.Errorf("reading kmesh_events: %w", err)
	}
	c := &ConnEvents{r: r}
	// O_NONBLOCK on the duplicate is on the map's open file too; nothing
	// reads or writes a map's descriptor, so it changes nothing else.
	if fd, err := unix.FcntlInt(uintptr(em.FD()), unix.F_DUPFD_CLOEXEC, 0); err == nil {
		if unix.SetNonblock(fd, true) != nil {
			unix.Close(fd)
		} else {
			f := os.NewFile(uintptr(fd), "kmesh_events")
			if rc, err := f.SyscallConn(); err == nil && f.SetReadDeadline(time.Time{}) == nil {
				c.wake, c.wakeRC = f, rc
			} else {
				f.Close()
			}
		}
	}
	return c, nil
}

// Read (not safe for concurrent use) returns the next queued event. With
// a deadline in the past it never waits (os.ErrDeadlineExceeded when the
// ring is empty); otherwise it waits in epoll_wait at most until the
// deadline set with SetDeadline, a thread blocked in a system call.
func (c *ConnEvents) Read() (ConnEvent, error) {
	err := c.r.ReadInto(&c.rec)
	if errors.Is(err, ringbuf.ErrClosed) {
		return ConnEvent{}, ErrEventsClosed
	}
	if err != nil {
		return ConnEvent{}, err
	}
	return DecodeConnEvent(c.rec.RawSample)
}

// SetDeadline bounds the wait of Read.
func (c *ConnEvents) SetDeadline(t time.Time) { c.r.SetDeadline(t) }

// Wait returns at until, or earlier when the kernel wakes the ring's
// readers (sockops.c forces a wakeup at each KMESH_EVENTS_WAKE_BYTES
// queued). The goroutine waits in Go's network poller: a Read that waits
// in epoll_wait holds its thread in a system call, and the runtime's
// monitor, taking the thread's P after 10 ms, goes back to polling every
// 20 µs — about 770 wake-ups a second on an idle node with the monitor
// kept awake (cmd/kmesh-daemon/sysmon.go). It may return early for no
// reason; the caller drains with a deadline in the past and waits again.
func (c *ConnEvents) Wait(until time.Time) error {
	if c.closed.Load() {
		return ErrEventsClosed
	}
	if c.wake == nil {
		if d := time.Until(until); d > 0 {
			time.Sleep(d)
		}
		return nil
	}
	if err := c.wake.SetReadDeadline(until); err != nil {
		if c.closed.Load() {
			return ErrEventsClosed
		}
		return err
	}
	first := true
	err := c.wakeRC.Read(func(uintptr) bool {
		if first { // readiness is only known from the poller
			first = false
			return false
		}
		return true
	})
	switch {
	case err == nil, errors.Is(err, os.ErrDeadlineExceeded):
		return nil
	case c.closed.Load():
		// A closed os.File reports "use of closed file", which is not
		// os.ErrClosed: the flag says it.
		return ErrEventsClosed
	}
	return err
}

// IsTimeout reports whether Read returned because of the deadline.
func IsTimeout(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }

// Close stops the reader; a blocked Read or Wait returns ErrEventsClosed.
func (c *ConnEvents) Close() error {
	c.closed.Store(true)
	if c.wake != nil {
		c.wake.Close()
	}
	return c.r.Close()
}

func dumpEvents(m *Maps) (Table, error) {
	if m.byName["kmesh_events"].Type() != ebpf.RingBuf {
		return Table{}, fmt.Errorf("kmesh_events is not a ring buffer")
	}
	return Table{Note: "ring buffer of kernel-path connection events (opened, closed), consumed by the daemon's telemetry: it cannot be listed (drops: kmesh_stats conn_event_drop)"}, nil
}
