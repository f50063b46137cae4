package identity

import (
	"bytes"
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
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"kmesh.dev/kmesh/ambient/istiod"
)

// grpcCA is a stand-in for istiod's CA on a loopback TLS listener: it
// records what it was sent and signs the impersonated identity, or fails
// as told. The real CA is exercised in integration/controlplane.
type grpcCA struct {
	pb.UnimplementedIstioCertificateServiceServer
	t  *testing.T
	ca *testCA

	mu     sync.Mutex
	reqs   []*pb.IstioCertificateRequest
	mds    []metadata.MD
	err    error  // returned when set
	signAs string // signs this URI instead of the requested one, when set
}

func (g *grpcCA) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	g.mu.Lock()
	defer g.mu.Unlock()
	g.reqs = append(g.reqs, req)
	g.mds = append(g.mds, md)
	if g.err != nil {
		return nil, g.err
	}
	block, _ := pem.Decode([]byte(req.GetCsr()))
	if block == nil {
		return nil, status.Error(codes.InvalidArgument, "no CSR")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil || csr.CheckSignature() != nil {
		return nil, status.Error(codes.InvalidArgument, "bad CSR")
	}
	uri := req.GetMetadata().GetFields()[impersonatedIdentity].GetStringValue()
	if g.signAs != "" {
		uri = g.signAs
	}
	now := time.Now()
	leaf := g.ca.issue(g.t, csr.PublicKey, []string{uri}, now.Add(-2*time.Minute), now.Add(time.Duration(req.GetValidityDuration())*time.Second))
	return &pb.IstioCertificateResponse{CertChain: g.ca.response(leaf)}, nil
}

// startGRPCCA serves g with a certificate for DefaultServerName signed by
// g.ca and writes the root to a file.
func startGRPCCA(t *testing.T, g *grpcCA) (addr, rootFile string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: DefaultServerName},
		DNSNames: []string{DefaultServerName}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, g.ca.root, &key.PublicKey, g.ca.rootKey)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
	})))
	pb.RegisterIstioCertificateServiceServer(srv, g)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(srv.Stop)
	rootFile = filepath.Join(t.TempDir(), "root-cert.pem")
	if err := os.WriteFile(rootFile, []byte(pemOf(g.ca.root)), 0o600); err != nil {
		t.Fatal(err)
	}
	return l.Addr().String(), rootFile
}

func newCAClient(t *testing.T, cfg CAConfig) *CAClient {
	t.Helper()
	c, err := NewCAClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func TestCAClientRequest(t *testing.T) {
	g := &grpcCA{t: t, ca: newTestCA(t, "cluster.local", false)}
	addr, rootFile := startGRPCCA(t, g)
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("first-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c := newCAClient(t, CAConfig{Istiod: istiod.Config{Addr: addr, RootFile: rootFile, TokenFile: tokenFile, ClusterID: "Kubernetes"}, TTL: 90 * time.Minute})
	ctx := context.Background()

	cert, err := c.Fetch(ctx, sleepID)
	if err != nil {
		t.Fatal(err)
	}
	if cert.Identity != sleepID || cert.NotAfter.Sub(time.Now()) < 89*time.Minute {
		t.Fatalf("certificate %v until %v", cert.Identity, cert.NotAfter)
	}
	req, md := g.reqs[0], g.mds[0]
	if req.GetValidityDuration() != 5400 {
		t.Errorf("validity_duration %d, want 5400", req.GetValidityDuration())
	}
	if got := req.GetMetadata().GetFields()[impersonatedIdentity].GetStringValue(); got != sleepID.String() {
		t.Errorf("ImpersonatedIdentity %q", got)
	}
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer first-token" {
		t.Errorf("authorization %q", got)
	}
	if got := md.Get("clusterid"); len(got) != 1 || got[0] != "Kubernetes" {
		t.Errorf("clusterid %q", got)
	}
	block, _ := pem.Decode([]byte(req.GetCsr()))
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	pub, ok := csr.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		t.Errorf("CSR key %T, want ECDSA P-256", csr.PublicKey)
	}
	if !bytes.Equal(csr.RawSubject, []byte{0x30, 0x00}) {
		t.Errorf("CSR subject %q, want empty", csr.Subject)
	}
	if len(csr.URIs) != 1 || csr.URIs[0].String() != sleepID.String() || len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses) != 0 {
		t.Errorf("CSR SANs %v %v %v", csr.URIs, csr.DNSNames, csr.IPAddresses)
	}

	// The token is re-read at every request.
	if err := os.WriteFile(tokenFile, []byte("second-token"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Fetch(ctx, sleepID); err != nil {
		t.Fatal(err)
	}
	if got := g.mds[1].Get("authorization"); got[0] != "Bearer second-token" {
		t.Errorf("rotated token not used: %q", got)
	}
}

func TestCAClientErrors(t *testing.T) {
	ctx := context.Background()
	t.Run("refused", func(t *testing.T) {
		g := &grpcCA{t: t, ca: newTestCA(t, "cluster.local", false),
			err: status.Error(codes.Unauthenticated, "request impersonation authentication failure")}
		addr, root := startGRPCCA(t, g)
		_, err := newCAClient(t, CAConfig{Istiod: istiod.Config{Addr: addr, RootFile: root}}).Fetch(ctx, sleepID)
		var ce *CAError
		if !errors.As(err, &ce) || ce.Code != codes.Unauthenticated || !errors.Is(err, ErrCARefused) || errors.Is(err, ErrCAUnavailable) {
			t.Fatalf("got %v", err)
		}
		if !strings.Contains(err.Error(), "CA_TRUSTED_NODE_ACCOUNTS") {
			t.Errorf("no hint in %q", err)
		}
	})
	t.Run("wrong server name", func(t *testing.T) {
		g := &grpcCA{t: t, ca: newTestCA(t, "cluster.local", false)}
		addr, root := startGRPCCA(t, g)
		_, err := newCAClient(t, CAConfig{Istiod: istiod.Config{Addr: addr, RootFile: root, ServerName: "other.example"}}).Fetch(ctx, sleepID)
		if !errors.Is(err, ErrCAUnavailable) || !strings.Contains(err.Error(), "other.example") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("root file rotated to another root", func(t *testing.T) {
		g := &grpcCA{t: t, ca: newTestCA(t, "cluster.local", false)}
		addr, root := startGRPCCA(t, g)
		if err := os.WriteFile(root, []byte(pemOf(newTestCA(t, "x", false).root)), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := newCAClient(t, CAConfig{Istiod: istiod.Config{Addr: addr, RootFile: root}}).Fetch(ctx, sleepID); !errors.Is(err, ErrCAUnavailable) {
			t.Fatalf("CA with an untrusted certificate: %v", err)
		}
	})
	t.Run("answer for another identity", func(t *testing.T) {
		g := &grpcCA{t: t, ca: newTestCA(t, "cluster.local", false), signAs: "spiffe://cluster.local/ns/default/sa/other"}
		addr, root := startGRPCCA(t, g)
		_, err := newCAClient(t, CAConfig{Istiod: istiod.Config{Addr: addr, RootFile: root}}).Fetch(ctx, sleepID)
		if !errors.Is(err, ErrIdentityMismatch) {
			t.Fatalf("got %v", err)
		}
		if r := result(err); r != "invalid" {
			t.Errorf("counted as %q", r)
		}
	})
	t.Run("token file missing", func(t *testing.T) {
		g := &grpcCA{t: t, ca: newTestCA(t, "cluster.local", false)}
		addr, root := startGRPCCA(t, g)
		_, err := newCAClient(t, CAConfig{Istiod: istiod.Config{Addr: addr, RootFile: root, TokenFile: "/nonexistent/token"}}).Fetch(ctx, sleepID)
		if err == nil || !errors.Is(err, os.ErrNotExist) || len(g.reqs) != 0 {
			t.Fatalf("got %v after %d requests", err, len(g.reqs))
		}
	})
	t.Run("unreachable", func(t *testing.T) {
		l, _ := net.Listen("tcp", "127.0.0.1:0")
		addr := l.Addr().String()
		l.Close()
		root := filepath.Join(t.TempDir(), "root.pem")
		_ = os.WriteFile(root, []byte(pemOf(newTestCA(t, "x", false).root)), 0o600)
		_, err := newCAClient(t, CAConfig{Istiod: istiod.Config{Addr: addr, RootFile: root}, Timeout: 2 * time.Second}).Fetch(ctx, sleepID)
		if !errors.Is(err, ErrCAUnavailable) || result(err) != "unavailable" {
			t.Fatalf("got %v", err)
		}
	})
}
