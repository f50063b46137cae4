package identity

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Fetcher gets a fresh certificate for an identity (a *CAClient; tests
// use fakes).
type Fetcher interface {
	Fetch(ctx context.Context, id Identity) (*Certificate, error)
}

// ManagerConfig configures a Manager.
type ManagerConfig struct {
	Fetcher Fetcher
	// RootFile is the mesh root certificate file (PEM), trusted in
	// addition to the roots the CA returns. Optional.
	RootFile string
	// Retry delays after a failed fetch: they double from InitialBackoff
	// (default 200 ms) up to MaxBackoff (default 150 s), with jitter.
	InitialBackoff, MaxBackoff time.Duration
	// Registerer receives the metrics; nil: not registered.
	Registerer prometheus.Registerer
	// Log receives structured logs; nil: discarded.
	Log *slog.Logger
}

// Errors of Certificate and Acquire.
var (
	ErrNotAcquired = errors.New("identity not acquired")
	ErrClosed      = errors.New("identity manager closed")
)

// Manager holds one certificate per identity in use on the node. Pods
// acquire their service account's identity when they arrive and release it
// when they go; the first Acquire starts fetching in the background, the
// last Release stops rotating and forgets the certificate.
//
// A certificate is renewed at half its life (Certificate.RefreshAt). When
// renewal fails the still-valid certificate keeps being served and the
// fetch is retried with exponential backoff; once it expires, Certificate
// returns the renewal error instead.
type Manager struct {
	cfg     ManagerConfig
	log     *slog.Logger
	metrics *metrics
	roots   *rootStore

	mu      sync.Mutex
	entries map[Identity]*entry
	closed  bool
	wg      sync.WaitGroup
}

type entry struct {
	refs   int
	cancel context.CancelFunc
	cert   *Certificate // latest good one; may have expired
	err    error        // of the latest attempt; nil after a success
	// changed is closed (and replaced) whenever cert or err change, and
	// when the entry is dropped, to wake Certificate callers.
	changed chan struct{}
}

// NewManager returns a manager; it does nothing until an Acquire.
func NewManager(cfg ManagerConfig) (*Manager, error) {
	if cfg.Fetcher == nil {
		return nil, errors.New("identity: manager without a fetcher")
	}
	if cfg.InitialBackoff <= 0 {
		cfg.InitialBackoff = 200 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 150 * time.Second
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := &Manager{cfg: cfg, log: log, entries: map[Identity]*entry{}}
	m.roots = newRootStore(cfg.RootFile, log)
	m.metrics = newMetrics(cfg.Registerer, m)
	return m, nil
}

// Acquire adds a reference to id; the first one starts fetching its
// certificate in the background.
func (m *Manager) Acquire(id Identity) error {
	if err := id.Validate(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	if e := m.entries[id]; e != nil {
		e.refs++
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	e := &entry{refs: 1, cancel: cancel, changed: make(chan struct{})}
	m.entries[id] = e
	m.wg.Add(1)
	go m.run(ctx, id, e)
	return nil
}

// Release drops a reference to id; the last one forgets its certificate
// and stops renewing it. Releasing an identity not held does nothing.
func (m *Manager) Release(id Identity) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.entries[id]
	if e == nil {
		return
	}
	if e.refs--; e.refs > 0 {
		return
	}
	delete(m.entries, id)
	e.cancel()
	close(e.changed)
	m.log.Info("certificate released", "identity", id.String())
}

// Certificate returns id's current certificate. If the first fetch is
// still under way it waits for it (or for ctx). If there is no valid
// certificate and the last fetch failed, it returns that error at once
// rather than waiting for the next retry.
func (m *Manager) Certificate(ctx context.Context, id Identity) (*Certificate, error) {
	for {
		m.mu.Lock()
		if m.closed {
			m.mu.Unlock()
			return nil, ErrClosed
		}
		e := m.entries[id]
		if e == nil {
			m.mu.Unlock()
			return nil, fmt.Errorf("%w: %s", ErrNotAcquired, id)
		}
		cert, lastErr, changed := e.cert, e.err, e.changed
		m.mu.Unlock()
		if cert != nil && time.Now().Before(cert.NotAfter) {
			return cert, nil
		}
		if lastErr != nil {
			if cert != nil {
				return nil, fmt.Errorf("the certificate for %s expired at %s and renewing it fails: %w",
					id, cert.NotAfter.Format(time.RFC3339), lastErr)
			}
			return nil, lastErr
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for the certificate of %s: %w", id, context.Cause(ctx))
		case <-changed:
		}
	}
}

// Close stops all renewals and waits for in-flight fetches to end.
func (m *Manager) Close() {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return
	}
	m.closed = true
	for id, e := range m.entries {
		e.cancel()
		close(e.changed)
		delete(m.entries, id)
	}
	m.mu.Unlock()
	m.wg.Wait()
}

// run fetches and renews one identity's certificate until ctx ends.
func (m *Manager) run(ctx context.Context, id Identity, e *entry) {
	defer m.wg.Done()
	log := m.log.With("identity", id.String())
	failures := 0
	for {
		cert, err := m.cfg.Fetcher.Fetch(ctx, id)
		if ctx.Err() != nil {
			return
		}
		m.metrics.csr.WithLabelValues(result(err)).Inc()
		now := time.Now()
		var wait time.Duration
		m.mu.Lock()
		if m.entries[id] != e {
			m.mu.Unlock()
			return
		}
		if err != nil {
			failures++
			wait = m.backoff(failures)
			e.err = err
			if e.cert != nil && now.Before(e.cert.NotAfter) {
				log.Warn("renewing the certificate failed; serving the current one",
					"error", err, "retry_in", wait, "valid_until", e.cert.NotAfter)
			} else {
				log.Warn("fetching the certificate failed", "error", err, "retry_in", wait)
			}
		} else {
			failures = 0
			e.cert, e.err = cert, nil
			refresh := cert.RefreshAt()
			wait = refresh.Sub(now)
			log.Info("certificate issued", "serial", cert.Leaf.SerialNumber.String(),
				"not_after", cert.NotAfter, "refresh_at", refresh)
		}
		if err == nil {
			// The CA's roots before the certificate is published: whoever
			// gets the certificate verifies peers against them.
			m.roots.setCARoots(cert.Roots)
		}
		close(e.changed)
		e.changed = make(chan struct{})
		m.mu.Unlock()

		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// backoff is the delay after the n-th consecutive failure: InitialBackoff
// doubled n-1 times, capped at MaxBackoff, then drawn uniformly from its
// upper half so that nodes that failed together do not retry together.
func (m *Manager) backoff(n int) time.Duration {
	d := m.cfg.InitialBackoff
	for i := 1; i < n && d < m.cfg.MaxBackoff; i++ {
		d *= 2
	}
	d = min(d, m.cfg.MaxBackoff)
	half := d / 2
	return half + time.Duration(rand.Int64N(int64(d-half)+1))
}

// held counts the certificates valid at now and the soonest expiry among them.
func (m *Manager) held(now time.Time) (n int, soonest time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, e := range m.entries {
		if e.cert == nil || !now.Before(e.cert.NotAfter) {
			continue
		}
		if n == 0 || e.cert.NotAfter.Before(soonest) {
			soonest = e.cert.NotAfter
		}
		n++
	}
	return n, soonest
}
