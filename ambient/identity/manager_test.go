package identity

import (
	"context"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc/codes"
)

// fakeCA is an in-memory Fetcher signing with a testCA. Inside a synctest
// bubble its certificates follow the bubble's clock.
type fakeCA struct {
	t   testing.TB
	ca  *testCA
	ttl time.Duration

	mu    sync.Mutex
	err   error     // returned instead of a certificate when set
	block bool      // Fetch waits for ctx
	calls []fetched // every attempt
}

type fetched struct {
	at  time.Time
	id  Identity
	err error
}

func (f *fakeCA) Fetch(ctx context.Context, id Identity) (*Certificate, error) {
	f.mu.Lock()
	err, block := f.err, f.block
	f.calls = append(f.calls, fetched{time.Now(), id, err})
	f.mu.Unlock()
	if block {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	if err != nil {
		return nil, err
	}
	key, chain := f.ca.workload(f.t, id, f.ttl)
	return ParseCertChain(chain, key, id, time.Now())
}

func (f *fakeCA) set(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err = err
}

func (f *fakeCA) attempts() []fetched {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]fetched(nil), f.calls...)
}

var unavailable = &CAError{Identity: sleepID, Addr: "ca:15012", Code: codes.Unavailable, Message: "connection refused"}

func newManager(t *testing.T, f Fetcher, reg prometheus.Registerer) *Manager {
	t.Helper()
	m, err := NewManager(ManagerConfig{Fetcher: f, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	return m
}

func mustCert(t *testing.T, m *Manager, id Identity) *Certificate {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := m.Certificate(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestManagerRotatesAtHalfLife(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeCA{t: t, ca: newTestCA(t, "cluster.local", false), ttl: time.Hour}
		m := newManager(t, f, nil)
		if err := m.Acquire(sleepID); err != nil {
			t.Fatal(err)
		}
		first := mustCert(t, m, sleepID) // waits for the first fetch
		time.Sleep(29 * time.Minute)
		if c := mustCert(t, m, sleepID); c != first {
			t.Fatal("renewed before half life")
		}
		time.Sleep(2 * time.Minute)
		synctest.Wait()
		second := mustCert(t, m, sleepID)
		if second == first || second.Leaf.SerialNumber.Cmp(first.Leaf.SerialNumber) == 0 {
			t.Fatal("not renewed after half life")
		}
		if n := len(f.attempts()); n != 2 {
			t.Fatalf("%d fetches, want 2", n)
		}
	})
}

func TestManagerOutage(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeCA{t: t, ca: newTestCA(t, "cluster.local", false), ttl: time.Hour}
		reg := prometheus.NewRegistry()
		m := newManager(t, f, reg)
		if err := m.Acquire(sleepID); err != nil {
			t.Fatal(err)
		}
		held := mustCert(t, m, sleepID)
		f.set(unavailable)
		outage := time.Now()

		// Until it expires, the held certificate is served while retries back off.
		time.Sleep(time.Until(held.NotAfter) - time.Second)
		synctest.Wait()
		if c := mustCert(t, m, sleepID); c != held {
			t.Fatal("lost the still-valid certificate during the outage")
		}
		var gaps []time.Duration
		var last time.Time
		for _, a := range f.attempts() {
			if !a.at.After(outage) {
				continue
			}
			if !last.IsZero() {
				gaps = append(gaps, a.at.Sub(last))
			}
			last = a.at
		}
		if len(gaps) < 5 {
			t.Fatalf("only %d retries in 30 minutes", len(gaps)+1)
		}
		for i, g := range gaps {
			if g > 150*time.Second {
				t.Fatalf("retry %d after %v: above the 150 s cap", i, g)
			}
		}
		if g := gaps[len(gaps)-1]; g < 75*time.Second {
			t.Fatalf("last retry gap %v: backoff did not grow to the cap", g)
		}
		if gaps[0] > time.Second {
			t.Fatalf("first retry after %v", gaps[0])
		}
		if got := counter(t, m.metrics.csr.WithLabelValues("unavailable")); got != float64(len(gaps)+1) {
			t.Fatalf("unavailable CSRs counted %v, want %d", got, len(gaps)+1)
		}

		// Expired: no longer served; the error says why.
		time.Sleep(2 * time.Second)
		synctest.Wait()
		_, err := m.Certificate(context.Background(), sleepID)
		if !errors.Is(err, ErrCAUnavailable) || !strings.Contains(err.Error(), "expired") {
			t.Fatalf("after expiry got %v", err)
		}
		if n, _ := m.held(time.Now()); n != 0 {
			t.Fatalf("%d certificates counted as held after expiry", n)
		}

		// CA back: renewed at the next retry, within the cap.
		f.set(nil)
		time.Sleep(150 * time.Second)
		synctest.Wait()
		if c := mustCert(t, m, sleepID); c == held {
			t.Fatal("not renewed once the CA came back")
		}
	})
}

func TestManagerRefusalIsReturnedAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		refused := &CAError{Identity: sleepID, Code: codes.Unauthenticated, Message: "request impersonation authentication failure"}
		f := &fakeCA{t: t, ca: newTestCA(t, "cluster.local", false), ttl: time.Hour, err: refused}
		m := newManager(t, f, nil)
		if err := m.Acquire(sleepID); err != nil {
			t.Fatal(err)
		}
		_, err := m.Certificate(context.Background(), sleepID)
		var ce *CAError
		if !errors.As(err, &ce) || !errors.Is(err, ErrCARefused) || !strings.Contains(err.Error(), "CA_TRUSTED_NODE_ACCOUNTS") {
			t.Fatalf("got %v", err)
		}
		// The pod shows up on the node: the next retry succeeds.
		f.set(nil)
		time.Sleep(time.Second)
		synctest.Wait()
		mustCert(t, m, sleepID)
	})
}

func TestManagerCertificateHonoursContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeCA{t: t, ca: newTestCA(t, "cluster.local", false), ttl: time.Hour, block: true}
		m := newManager(t, f, nil)
		if err := m.Acquire(sleepID); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := m.Certificate(ctx, sleepID); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("got %v", err)
		}
	})
}

func TestManagerRefCounting(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeCA{t: t, ca: newTestCA(t, "cluster.local", false), ttl: time.Hour}
		reg := prometheus.NewRegistry()
		m := newManager(t, f, reg)
		other := Identity{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "httpbin"}
		for _, id := range []Identity{sleepID, sleepID, other} {
			if err := m.Acquire(id); err != nil {
				t.Fatal(err)
			}
		}
		mustCert(t, m, sleepID)
		mustCert(t, m, other)
		if n := len(f.attempts()); n != 2 {
			t.Fatalf("%d fetches for two identities", n)
		}
		if got := gathered(t, reg, "kmesh_identity_certificates"); got != 2 {
			t.Fatalf("certificates gauge %v", got)
		}
		if got := gathered(t, reg, "kmesh_identity_certificate_expiry_seconds"); got < 3599 || got > 3600 {
			t.Fatalf("expiry gauge %v", got)
		}

		m.Release(sleepID) // one pod of two left
		mustCert(t, m, sleepID)
		m.Release(sleepID) // the last one
		if _, err := m.Certificate(context.Background(), sleepID); !errors.Is(err, ErrNotAcquired) {
			t.Fatalf("released identity: %v", err)
		}
		before := len(f.attempts())
		time.Sleep(2 * time.Hour)
		synctest.Wait()
		for _, a := range f.attempts()[before:] {
			if a.id == sleepID {
				t.Fatal("released identity still renewed")
			}
		}
		if got := gathered(t, reg, "kmesh_identity_certificates"); got != 1 {
			t.Fatalf("certificates gauge %v after release", got)
		}
		m.Release(sleepID) // extra releases are harmless
	})
}

func TestManagerReleaseWakesWaiters(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeCA{t: t, ca: newTestCA(t, "cluster.local", false), ttl: time.Hour, block: true}
		m := newManager(t, f, nil)
		if err := m.Acquire(sleepID); err != nil {
			t.Fatal(err)
		}
		done := make(chan error)
		go func() {
			_, err := m.Certificate(context.Background(), sleepID)
			done <- err
		}()
		synctest.Wait()
		m.Release(sleepID)
		if err := <-done; !errors.Is(err, ErrNotAcquired) {
			t.Fatalf("got %v", err)
		}
		m.Close()
		if err := m.Acquire(sleepID); !errors.Is(err, ErrClosed) {
			t.Fatalf("Acquire after Close: %v", err)
		}
	})
}

func TestManagerRoots(t *testing.T) {
	rootFile := filepath.Join(t.TempDir(), "root-cert.pem")
	synctest.Test(t, func(t *testing.T) {
		fileCA := newTestCA(t, "cluster.local", false)
		caCA := newTestCA(t, "cluster.local", false)
		if err := os.WriteFile(rootFile, []byte(pemOf(fileCA.root)), 0o600); err != nil {
			t.Fatal(err)
		}
		f := &fakeCA{t: t, ca: caCA, ttl: time.Hour}
		m, err := NewManager(ManagerConfig{Fetcher: f, RootFile: rootFile})
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		if !trusts(m, fileCA) || trusts(m, caCA) {
			t.Fatal("file root not trusted before any certificate")
		}
		if err := m.Acquire(sleepID); err != nil {
			t.Fatal(err)
		}
		mustCert(t, m, sleepID)
		if !trusts(m, fileCA) || !trusts(m, caCA) {
			t.Fatal("want both the file's and the CA's roots")
		}
		// The file is rotated to another root: picked up after a second.
		rotated := newTestCA(t, "cluster.local", false)
		if err := os.WriteFile(rootFile, []byte(pemOf(rotated.root)+pemOf(rotated.root)), 0o600); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Second)
		if !trusts(m, rotated) || trusts(m, fileCA) || !trusts(m, caCA) {
			t.Fatal("root file change not picked up")
		}
		if n := len(m.RootCertificates()); n != 2 {
			t.Fatalf("%d roots, want 2 (duplicates merged)", n)
		}
	})
}

func trusts(m *Manager, ca *testCA) bool {
	_, err := ca.root.Verify(x509VerifyOpts(m))
	return err == nil
}

func gathered(t *testing.T, g prometheus.Gatherer, name string) float64 {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	return -1
}

func x509VerifyOpts(m *Manager) x509.VerifyOptions { return x509.VerifyOptions{Roots: m.Roots()} }

func counter(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var out dto.Metric
	if err := c.Write(&out); err != nil {
		t.Fatal(err)
	}
	return out.GetCounter().GetValue()
}

func TestManagerHeld(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeCA{t: t, ca: newTestCA(t, "cluster.local", false), ttl: time.Hour}
		m := newManager(t, f, nil)
		web := Identity{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "web"}
		for _, id := range []Identity{web, sleepID, sleepID} {
			if err := m.Acquire(id); err != nil {
				t.Fatal(err)
			}
		}
		issued := mustCert(t, m, sleepID)
		mustCert(t, m, web)
		f.set(unavailable)
		// Renewal fails at half life: the issued certificate stays, with the error.
		time.Sleep(time.Until(issued.RefreshAt()) + time.Second)
		synctest.Wait()
		held := m.Held()
		if len(held) != 2 || held[0].Identity != sleepID || held[1].Identity != web {
			t.Fatalf("held %+v: want sleep then web, sorted", held)
		}
		if h := held[0]; h.Cert != issued || !errors.Is(h.Err, ErrCAUnavailable) || h.Refs != 2 {
			t.Fatalf("sleep: cert same=%v err=%v refs=%d; want the issued certificate, the renewal error, 2 pods", h.Cert == issued, h.Err, h.Refs)
		}
		m.Release(web)
		if held := m.Held(); len(held) != 1 {
			t.Fatalf("after the last release of web: %d held", len(held))
		}
	})
}
