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

// Tracked is one live connection.
type Tracked struct {
	l      *Live
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
func (l *Live) Track(s *Series, sample func() (recv, sent uint64, ok bool)) *Tracked {
	t := &Tracked{l: l, series: s, sample: sample}
	if l == nil {
		return t
	}
	l.mu.Lock()
	l.conns[t] = struct{}{}
	l.mu.Unlock()
	return t
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
