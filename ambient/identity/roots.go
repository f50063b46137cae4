package identity

import (
	"bytes"
	"crypto/x509"
	"log/slog"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Roots returns the mesh's trust anchors now: the roots the CA returned
// with the latest certificate plus those in the configured root file. The
// file is re-read when it changes (checked at most once a second). The
// pool is shared: do not modify it.
func (m *Manager) Roots() *x509.CertPool {
	m.roots.maybeReload(time.Now())
	return m.roots.pool.Load()
}

// RootCertificates lists the certificates Roots trusts (for status pages).
func (m *Manager) RootCertificates() []*x509.Certificate {
	m.roots.maybeReload(time.Now())
	m.roots.mu.Lock()
	defer m.roots.mu.Unlock()
	return slices.Clone(m.roots.all)
}

// rootCheckInterval bounds how often Roots looks at the root file.
const rootCheckInterval = time.Second

type rootStore struct {
	file string
	log  *slog.Logger
	pool atomic.Pointer[x509.CertPool]
	// nextCheck is the UnixNano time before which the file is not looked at.
	nextCheck atomic.Int64

	mu        sync.Mutex
	fileStamp fileStamp
	fileRoots []*x509.Certificate
	caRoots   []*x509.Certificate
	all       []*x509.Certificate
}

type fileStamp struct {
	mod  time.Time
	size int64
}

func newRootStore(file string, log *slog.Logger) *rootStore {
	r := &rootStore{file: file, log: log}
	r.pool.Store(x509.NewCertPool())
	r.maybeReload(time.Now())
	return r
}

func (r *rootStore) maybeReload(now time.Time) {
	if r.file == "" || now.UnixNano() < r.nextCheck.Load() {
		return
	}
	r.nextCheck.Store(now.Add(rootCheckInterval).UnixNano())
	r.mu.Lock()
	defer r.mu.Unlock()
	fi, err := os.Stat(r.file)
	if err != nil {
		r.log.Warn("mesh root file unreadable; keeping the roots we had", "file", r.file, "error", err)
		return
	}
	st := fileStamp{fi.ModTime(), fi.Size()}
	if st == r.fileStamp {
		return
	}
	b, err := os.ReadFile(r.file)
	if err != nil {
		r.log.Warn("mesh root file unreadable; keeping the roots we had", "file", r.file, "error", err)
		return
	}
	certs, err := parsePEMCerts(b)
	if err != nil {
		r.log.Warn("mesh root file unusable; keeping the roots we had", "file", r.file, "error", err)
		return
	}
	r.fileStamp = st
	if !sameCerts(certs, r.fileRoots) {
		r.fileRoots = certs
		r.rebuild()
		r.log.Info("mesh roots loaded from file", "file", r.file, "count", len(certs))
	}
}

func (r *rootStore) setCARoots(certs []*x509.Certificate) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if sameCerts(certs, r.caRoots) {
		return
	}
	r.caRoots = certs
	r.rebuild()
	r.log.Info("mesh roots updated from the CA", "count", len(certs))
}

// rebuild makes a new pool of file and CA roots; r.mu is held.
func (r *rootStore) rebuild() {
	pool := x509.NewCertPool()
	var all []*x509.Certificate
	for _, c := range append(slices.Clone(r.fileRoots), r.caRoots...) {
		if slices.ContainsFunc(all, func(o *x509.Certificate) bool { return o.Equal(c) }) {
			continue
		}
		all = append(all, c)
		pool.AddCert(c)
	}
	r.all = all
	r.pool.Store(pool)
}

func sameCerts(a, b []*x509.Certificate) bool {
	return slices.EqualFunc(a, b, func(x, y *x509.Certificate) bool { return bytes.Equal(x.Raw, y.Raw) })
}
