package telemetry

import (
	"sync"
	"time"
)

// Live reports the bytes of long-lived connections every interval, not
// only when they close: a connection open for hours otherwise shows no
// traffic until its end. The node proxy registers each connection it
// carries with a sampler (its application socket's tcp_info).
type Live struct {
	mu    sync.Mutex
	conns map[*Tracked]struct{}
	stop  chan struct{}
	once  sync.Once
}

// ConnInfo is one open connection as ztunnel's config dump lists it under
// the pod it belongs to (`istioctl ztunnel-config connections`).
type ConnInfo struct {
	// Pod is the enrolled pod's UID (the node proxy's connections);
	// Netns its namespace cookie (the kernel path's, which know the pod
	// by the cookie the kernel attests).
	Pod   string
	Netns uint64
	// Inbound: the pod is the destination.
	Inbound bool
	// Src is the client's address, OriginalDst what it dialled, ActualDst
	// where the connection went (a chosen backend, an HBONE peer).
	Src, OriginalDst, ActualDst string
	// Protocol is "HBONE" or "TCP".
	Protocol string
}

// Tracked is one live connection.
type Tracked struct {
	l      *Live
	info   ConnInfo
	series *Series
	sample func() (recv, sent uint64, ok bool)
	// Reported so far (guarded by l.mu).
	recv, sent uint64
}

// NewLive starts reporting every interval (5 s when <= 0); Stop ends it.
func NewLive(interval time.Duration) *Live {
	if interval <= 0 {
		interval = 5 * time.Second
	}
	l := &Live{conns: map[*Tracked]struct{}{}, stop: make(chan struct{})}
	go func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-l.stop:
				return
			case <-t.C:
				l.Report()
			}
		}
	}()
	return l
}

// Stop ends the periodic reports.
func (l *Live) Stop() { l.once.Do(func() { close(l.stop) }) }

// Track registers an open connection. sample returns its bytes so far
// (client to server, server to client); ok false: unknown now.
func (l *Live) Track(s *Series, info ConnInfo, sample func() (recv, sent uint64, ok bool)) *Tracked {
	t := &Tracked{l: l, info: info, series: s, sample: sample}
	if l == nil {
		return t
	}
	l.mu.Lock()
	l.conns[t] = struct{}{}
	l.mu.Unlock()
	return t
}

// Connections lists the live connections.
func (l *Live) Connections() []ConnInfo {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]ConnInfo, 0, len(l.conns))
	for t := range l.conns {
		out = append(out, t.info)
	}
	return out
}

// Report adds what every live connection moved since its last report.
func (l *Live) Report() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for t := range l.conns {
		if r, s, ok := t.sample(); ok {
			t.series.Add(sub(r, t.recv), sub(s, t.sent))
			t.recv, t.sent = max(t.recv, r), max(t.sent, s)
		}
	}
}

// Close counts the connection closed with its final totals, less what was
// reported already.
func (t *Tracked) Close(recv, sent uint64) {
	if t.l != nil {
		t.l.mu.Lock()
		delete(t.l.conns, t)
		t.l.mu.Unlock()
	}
	t.series.Close(sub(recv, t.recv), sub(sent, t.sent))
}
