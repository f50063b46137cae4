package istiod

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const istiodName = "istiod.istio-system.svc"

// pki is a root and a serving certificate it signed.
type pki struct {
	rootPEM []byte
	serving tls.Certificate
}

func newPKI(t *testing.T, names ...string) pki {
	t.Helper()
	rootKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rootTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, &rootKey.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(rootDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(2),
		DNSNames: names, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature,
	}, root, &key.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	return pki{rootPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: rootDER}),
		serving: tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}}
}

// server is a gRPC health server on loopback that records the metadata of
// every RPC it answers. With TLS, it serves whichever certificate cert
// holds at the handshake, and drop closes its connections so the client
// has to make new ones.
type server struct {
	addr string
	cert atomic.Pointer[tls.Certificate]

	mu    sync.Mutex
	mds   []metadata.MD
	conns []net.Conn
}

func startServer(t *testing.T, cert *tls.Certificate) *server {
	t.Helper()
	s := &server{}
	opts := []grpc.ServerOption{grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		s.mu.Lock()
		s.mds = append(s.mds, md)
		s.mu.Unlock()
		return h(ctx, req)
	})}
	if cert != nil {
		s.cert.Store(cert)
		opts = append(opts, grpc.Creds(credentials.NewTLS(&tls.Config{
			GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return s.cert.Load(), nil },
		})))
	}
	srv := grpc.NewServer(opts...)
	healthpb.RegisterHealthServer(srv, health.NewServer())
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = l.Addr().String()
	go func() { _ = srv.Serve(trackingListener{l, s}) }()
	t.Cleanup(srv.Stop)
	return s
}

type trackingListener struct {
	net.Listener
	s *server
}

func (l trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.s.mu.Lock()
		l.s.conns = append(l.s.conns, c)
		l.s.mu.Unlock()
	}
	return c, err
}

func (s *server) drop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.Close()
	}
	s.conns = nil
}

func (s *server) md(i int) metadata.MD {
	s.mu.Lock()
	defer s.mu.Unlock()
	if i >= len(s.mds) {
		return nil
	}
	return s.mds[i]
}

func (s *server) calls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.mds)
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func dial(t *testing.T, cfg Config) *grpc.ClientConn {
	t.Helper()
	conn, err := Dial(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

func call(conn *grpc.ClientConn, opts ...grpc.CallOption) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, opts...)
	return err
}

// Every RPC reads the token file again (projected tokens rotate under a
// running daemon) and carries the cluster ID.
func TestTokenReadAtEveryRPC(t *testing.T) {
	p := newPKI(t, istiodName)
	srv := startServer(t, &p.serving)
	dir := t.TempDir()
	root, token := filepath.Join(dir, "root-cert.pem"), filepath.Join(dir, "istio-token")
	writeFile(t, root, p.rootPEM)
	writeFile(t, token, []byte("first-token\n"))
	conn := dial(t, Config{Addr: srv.addr, RootFile: root, ServerName: istiodName, TokenFile: token, ClusterID: "Kubernetes"})

	if err := call(conn); err != nil {
		t.Fatal(err)
	}
	writeFile(t, token, []byte("second-token"))
	if err := call(conn); err != nil {
		t.Fatal(err)
	}
	for i, want := range []string{"Bearer first-token", "Bearer second-token"} {
		md := srv.md(i)
		if got := md.Get("authorization"); len(got) != 1 || got[0] != want {
			t.Errorf("RPC %d: authorization %q, want %q", i, got, want)
		}
		if got := md.Get("clusterid"); len(got) != 1 || got[0] != "Kubernetes" {
			t.Errorf("RPC %d: clusterid %q", i, got)
		}
	}
}

// No token file, no cluster ID: nothing is added.
func TestNoCredentialsConfigured(t *testing.T) {
	srv := startServer(t, nil)
	if err := call(dial(t, Config{Addr: srv.addr, Plaintext: true})); err != nil {
		t.Fatal(err)
	}
	if md := srv.md(0); len(md.Get("authorization"))+len(md.Get("clusterid")) != 0 {
		t.Fatalf("metadata %v", md)
	}
}

// A root rotated in the file is used at the next handshake: the same
// client connection accepts istiod's certificate from the new root, and
// before the file changes it refuses it saying what to check.
func TestRootReadAtEveryHandshake(t *testing.T) {
	oldPKI, newPKI := newPKI(t, istiodName), newPKI(t, istiodName)
	srv := startServer(t, &oldPKI.serving)
	root := filepath.Join(t.TempDir(), "root-cert.pem")
	writeFile(t, root, oldPKI.rootPEM)
	conn := dial(t, Config{Addr: srv.addr, RootFile: root, ServerName: istiodName})
	if err := call(conn); err != nil {
		t.Fatal(err)
	}

	// istiod's CA rotates: its serving certificate comes from a new root.
	srv.cert.Store(&newPKI.serving)
	srv.drop()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for conn.GetState() == connectivity.Ready { // until the client has seen its connection go
		if !conn.WaitForStateChange(ctx, connectivity.Ready) {
			t.Fatal("the client never noticed its connection closed")
		}
	}
	err := call(conn)
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("certificate from a root not in the file: got %v, want Unavailable", err)
	}
	for _, want := range []string{"certificate not trusted", "does not chain to the mesh root in " + root, "XDS_ROOT_CA"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}

	// The new root reaches the file (the ConfigMap is updated): no restart.
	writeFile(t, root, newPKI.rootPEM)
	if err := call(conn, grpc.WaitForReady(true)); err != nil {
		t.Fatalf("after the root file was rotated: %v", err)
	}
}

func TestWrongServerName(t *testing.T) {
	p := newPKI(t, istiodName)
	srv := startServer(t, &p.serving)
	root := filepath.Join(t.TempDir(), "root-cert.pem")
	writeFile(t, root, p.rootPEM)
	err := call(dial(t, Config{Addr: srv.addr, RootFile: root, ServerName: "other.example"}))
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "not issued for other.example") ||
		!strings.Contains(err.Error(), "ALT_XDS_HOSTNAME") {
		t.Fatalf("got %v", err)
	}
	if srv.calls() != 0 {
		t.Fatal("an RPC reached a server that failed verification")
	}
}

// A token that cannot be read fails the RPC before it is sent, with the
// reading error itself (errors.Is works through gRPC).
func TestTokenFileMissing(t *testing.T) {
	p := newPKI(t, istiodName)
	srv := startServer(t, &p.serving)
	root := filepath.Join(t.TempDir(), "root-cert.pem")
	writeFile(t, root, p.rootPEM)
	err := call(dial(t, Config{Addr: srv.addr, RootFile: root, ServerName: istiodName, TokenFile: "/nonexistent/istio-token"}))
	var te *TokenError
	if !errors.Is(err, os.ErrNotExist) || !errors.As(err, &te) || status.Code(err) != codes.Unauthenticated {
		t.Fatalf("got %v (%T)", err, err)
	}
	if srv.calls() != 0 {
		t.Fatal("the RPC was sent without its token")
	}
}

// Plaintext (development, tests): gRPC would refuse credentials that
// require transport security on an insecure connection; these are sent,
// as the xDS client always did.
func TestPlaintextSendsCredentials(t *testing.T) {
	srv := startServer(t, nil)
	token := filepath.Join(t.TempDir(), "istio-token")
	writeFile(t, token, []byte("tok"))
	if err := call(dial(t, Config{Addr: srv.addr, Plaintext: true, TokenFile: token, ClusterID: "c1"})); err != nil {
		t.Fatal(err)
	}
	md := srv.md(0)
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer tok" {
		t.Errorf("authorization %q", got)
	}
	if got := md.Get("clusterid"); len(got) != 1 || got[0] != "c1" {
		t.Errorf("clusterid %q", got)
	}
}

// Over TLS the credentials insist on transport security: a connection
// made with them and insecure transport by mistake sends nothing.
func TestCredentialsRequireTLSUnlessPlaintext(t *testing.T) {
	if !(Config{}).PerRPCCredentials().RequireTransportSecurity() {
		t.Error("TLS configuration: token allowed over an insecure connection")
	}
	if (Config{Plaintext: true}).PerRPCCredentials().RequireTransportSecurity() {
		t.Error("plaintext configuration: gRPC would refuse to send the token")
	}
}

func TestServerName(t *testing.T) {
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{Addr: "istiod.istio-system.svc:15012"}, "istiod.istio-system.svc"},
		{Config{Addr: "127.0.0.1:15012"}, "127.0.0.1"},
		{Config{Addr: "[fd00::1]:15012"}, "fd00::1"},
		{Config{Addr: "dns:///istiod.istio-system.svc:15012"}, "istiod.istio-system.svc"},
		{Config{Addr: "istiod"}, "istiod"},
		{Config{Addr: "127.0.0.1:15012", ServerName: "istiod.istio-system.svc"}, "istiod.istio-system.svc"},
	} {
		if got := tc.cfg.serverName(); got != tc.want {
			t.Errorf("%+v: %q, want %q", tc.cfg, got, tc.want)
		}
	}
}

func TestCheck(t *testing.T) {
	dir := t.TempDir()
	good, empty := filepath.Join(dir, "root.pem"), filepath.Join(dir, "empty.pem")
	writeFile(t, good, newPKI(t, istiodName).rootPEM)
	writeFile(t, empty, nil)
	for _, tc := range []struct {
		cfg  Config
		want string // "" for no error
	}{
		{Config{Addr: "istiod:15012", RootFile: good}, ""},
		{Config{Addr: "istiod:15012", Plaintext: true}, ""},
		{Config{RootFile: good}, "no address"},
		{Config{Addr: "istiod:15012"}, "no mesh root certificate file"},
		{Config{Addr: "istiod:15012", RootFile: filepath.Join(dir, "missing.pem")}, "no such file"},
		{Config{Addr: "istiod:15012", RootFile: empty}, "holds no PEM certificate"},
	} {
		err := tc.cfg.Check()
		if (tc.want == "") != (err == nil) || err != nil && !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.cfg, err, tc.want)
		}
	}
}
