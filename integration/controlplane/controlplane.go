// Package controlplane embeds Istio's own control plane logic: the real
// discovery server (istiod's xDS generation and ambient index, from
// istio.io/istio/pilot/test/xds) over an in-memory Kubernetes API, served
// on a loopback gRPC listener with TLS, together with Istio's CA (ca.go).
// What a Kmesh daemon receives from it is what a real istiod would send for
// the same Kubernetes objects.
//
// It runs inside tests, the node simulator and the demo alike: the
// test.Failer istio's code wants is satisfied by a small struct that turns
// fatal errors into a returned error and collects cleanups for Stop.
package controlplane

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"

	"istio.io/istio/pilot/pkg/features"
	"istio.io/istio/pilot/test/xds"
	"istio.io/istio/pkg/cluster"
	kubelib "istio.io/istio/pkg/kube"
	istiolog "istio.io/istio/pkg/log"
	"k8s.io/apimachinery/pkg/runtime"
)

// Options configure a control plane.
type Options struct {
	// Objects are Kubernetes and Istio objects as YAML documents.
	Objects string
	// KubeObjects are Kubernetes objects given directly (large synthetic
	// clusters, where YAML parsing would dominate).
	KubeObjects []runtime.Object
	// Addr is where to listen; default 127.0.0.1:0. A restarted control
	// plane passes the address of the previous one.
	Addr string
	// TLS, when set, serves xDS over TLS with this configuration.
	TLS *tls.Config
	// PKI is the mesh's root and token key (see PKI). With a PKI the
	// control plane also serves Istio's CA, on the xDS port as istiod
	// does. Default: the PKI behind TLS when ServingTLS made it. Given a
	// PKI and no TLS, TLS is PKI.ServingTLS(). Without a PKI: no CA.
	PKI *PKI
	// ClusterID names the cluster; default "Kubernetes".
	ClusterID string
	// Verbose turns istiod's own logging on (info level); by default it is off.
	Verbose bool
}

// ControlPlane is one running embedded istiod.
type ControlPlane struct {
	Addr string
	// CAAddr is where Istio's CA is served: Addr when there is a PKI (as
	// istiod serves xDS and CA on 15012), else empty.
	CAAddr string
	pki    *PKI
	caDown atomic.Bool
	fds    *xds.FakeDiscoveryServer
	f      *failer
	done   chan struct{}
	stop   sync.Once
}

// failer adapts istio's test.Failer to a long-running process.
type failer struct {
	mu       sync.Mutex
	cleanups []func()
	err      error
	dir      string
}

type fatalPanic struct{ err error }

func (f *failer) Fail()       { f.fail(errors.New("control plane failed")) }
func (f *failer) FailNow()    { f.fail(errors.New("control plane failed")) }
func (f *failer) Helper()     {}
func (f *failer) Skip(...any) {}
func (f *failer) Fatal(args ...any) {
	f.fail(errors.New(fmt.Sprint(args...)))
}
func (f *failer) Fatalf(format string, args ...any) { f.fail(fmt.Errorf(format, args...)) }
func (f *failer) Log(args ...any)                   {}
func (f *failer) Logf(format string, args ...any)   {}
func (f *failer) TempDir() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.dir == "" {
		f.dir, _ = os.MkdirTemp("", "kmesh-controlplane-")
		dir := f.dir
		f.cleanups = append(f.cleanups, func() { os.RemoveAll(dir) })
	}
	return f.dir
}

func (f *failer) Cleanup(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cleanups = append(f.cleanups, fn)
}

// fail records the first error and unwinds the constructor (see Start).
func (f *failer) fail(err error) {
	f.mu.Lock()
	if f.err == nil {
		f.err = err
	}
	f.mu.Unlock()
	panic(fatalPanic{err})
}

func (f *failer) runCleanups() {
	f.mu.Lock()
	cs := f.cleanups
	f.cleanups = nil
	f.mu.Unlock()
	for i := len(cs) - 1; i >= 0; i-- {
		cs[i]()
	}
}

// Start brings up the discovery server with ambient enabled.
func Start(opts Options) (cp *ControlPlane, err error) {
	features.EnableAmbient = true
	// istiod's own log is noise for the simulator's users (its CRD
	// watchers complain about CRDs a fake API server does not annotate).
	level := istiolog.NoneLevel
	if opts.Verbose {
		level = istiolog.InfoLevel
	}
	for _, sc := range istiolog.Scopes() {
		sc.SetOutputLevel(level)
	}
	if opts.Addr == "" {
		opts.Addr = "127.0.0.1:0"
	}
	if opts.PKI == nil && opts.TLS != nil {
		opts.PKI = pkiFor(opts.TLS)
	}
	if opts.TLS == nil && opts.PKI != nil {
		opts.TLS = opts.PKI.ServingTLS()
	}
	f := &failer{}
	defer func() {
		if r := recover(); r != nil {
			fp, ok := r.(fatalPanic)
			if !ok {
				panic(r)
			}
			f.runCleanups()
			cp, err = nil, fmt.Errorf("starting the embedded control plane: %w", fp.err)
		}
	}()
	// Bound before istiod is ready, so early clients queue rather than fail.
	l, err := net.Listen("tcp", opts.Addr)
	if err != nil {
		return nil, fmt.Errorf("starting the embedded control plane: %w", err)
	}
	f.Cleanup(func() { _ = l.Close() })
	cp = &ControlPlane{Addr: l.Addr().String(), pki: opts.PKI, f: f, done: make(chan struct{})}
	cid := clusterID(opts.ClusterID)
	// The fake serves its own gRPC server on an in-memory listener; ours
	// (newGRPCServer) serves the discovery server on l, with the CA.
	cp.fds = xds.NewFakeDiscoveryServer(f, xds.FakeOptions{
		KubernetesObjectString: opts.Objects,
		KubernetesObjects:      opts.KubeObjects,
		DefaultClusterName:     cid,
		KubeClientModifier: func(c kubelib.Client) {
			if opts.PKI != nil {
				installTokenReview(c, opts.PKI)
			}
		},
	})
	srv := cp.newGRPCServer(opts.TLS)
	cp.fds.Discovery.Register(srv)
	if opts.PKI != nil {
		if err := cp.registerCA(srv, cid); err != nil {
			f.Fatal(err)
		}
		cp.CAAddr = cp.Addr
	}
	go func() { _ = srv.Serve(l) }()
	f.Cleanup(srv.Stop)
	return cp, nil
}

func clusterID(id string) cluster.ID {
	if id == "" {
		return "Kubernetes"
	}
	return cluster.ID(id)
}

// Kube is the control plane's Kubernetes API (an in-memory clientset).
func (c *ControlPlane) Kube() kubelib.Client { return c.fds.KubeClient() }

// Stop shuts the control plane down; connected clients see their streams end.
func (c *ControlPlane) Stop() {
	c.stop.Do(func() {
		close(c.done)
		c.f.runCleanups()
	})
}

// Done is closed when the control plane stops.
func (c *ControlPlane) Done() <-chan struct{} { return c.done }

// Kube objects are created through Kube().Kube() (client-go's Interface) and
// Kube().Istio(); the ambient index sees them within milliseconds and istiod
// pushes the resulting Address resources to connected node proxies.
