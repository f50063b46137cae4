package identity

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
)

// Defaults, as ztunnel's.
const (
	DefaultTTL        = 24 * time.Hour
	DefaultServerName = "istiod.istio-system.svc"
	defaultTimeout    = 10 * time.Second
)

// impersonatedIdentity is the CSR metadata key naming the identity a node
// proxy asks for on a workload's behalf (Istio's security.ImpersonatedIdentity).
const impersonatedIdentity = "ImpersonatedIdentity"

// CAConfig configures a CAClient.
type CAConfig struct {
	// Addr is the CA's host:port (CA_ADDRESS; istiod serves it on 15012).
	Addr string
	// RootFile is the mesh root certificate (PEM). It verifies the CA's
	// serving certificate and is re-read at every connection, so a rotated
	// root is picked up.
	RootFile string
	// ServerName is the name verified in the CA's certificate;
	// default DefaultServerName.
	ServerName string
	// TokenFile holds the node's service account token, sent as
	// "authorization: Bearer <token>". Read at every request (projected
	// tokens rotate).
	TokenFile string
	// ClusterID is sent as "clusterid" metadata: the CA picks the cluster
	// whose API server reviews the token and whose pods it checks.
	ClusterID string
	// TTL is the validity asked for (SECRET_TTL); default DefaultTTL. The CA
	// refuses more than its maximum and counts in whole seconds.
	TTL time.Duration
	// Timeout bounds one request; default 10 s.
	Timeout time.Duration
}

// CAClient asks istiod's CA for workload certificates on behalf of the pods
// of this node. It is safe for concurrent use.
type CAClient struct {
	cfg    CAConfig
	conn   *grpc.ClientConn
	client pb.IstioCertificateServiceClient
}

// NewCAClient prepares a client; it connects lazily, on the first Fetch.
func NewCAClient(cfg CAConfig) (*CAClient, error) {
	if cfg.Addr == "" {
		return nil, errors.New("identity: no CA address")
	}
	if cfg.RootFile == "" {
		return nil, errors.New("identity: no mesh root certificate file to verify the CA with")
	}
	if cfg.ServerName == "" {
		cfg.ServerName = DefaultServerName
	}
	if cfg.TTL <= 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = defaultTimeout
	}
	tc := &tls.Config{
		MinVersion: tls.VersionTLS12,
		ServerName: cfg.ServerName,
		// Verification is done by verifyCA against the root file as it is
		// now, not as it was when the client was made.
		InsecureSkipVerify: true, //nolint:gosec // VerifyConnection below verifies.
		VerifyConnection: func(cs tls.ConnectionState) error {
			return verifyCA(cs, cfg.RootFile, cfg.ServerName)
		},
	}
	conn, err := grpc.NewClient(cfg.Addr,
		grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	if err != nil {
		return nil, fmt.Errorf("identity: CA client for %s: %w", cfg.Addr, err)
	}
	return &CAClient{cfg: cfg, conn: conn, client: pb.NewIstioCertificateServiceClient(conn)}, nil
}

// Close closes the connection.
func (c *CAClient) Close() error { return c.conn.Close() }

// Fetch makes a key and a CSR for id, asks the CA to sign it on id's
// behalf and checks the answer (see ParseCertChain). Errors are a *CAError
// (the CA could not be reached or said no) or a *ChainError (its answer
// was unusable).
func (c *CAClient) Fetch(ctx context.Context, id Identity) (*Certificate, error) {
	key, csr, err := NewCSR(id)
	if err != nil {
		return nil, err
	}
	md, err := structpb.NewStruct(map[string]any{impersonatedIdentity: id.String()})
	if err != nil {
		return nil, err
	}
	ctx, err = c.outgoing(ctx)
	if err != nil {
		return nil, err
	}
	ttl := int64((c.cfg.TTL + time.Second - 1) / time.Second)
	ctx, cancel := context.WithTimeout(ctx, c.cfg.Timeout)
	defer cancel()
	resp, err := c.client.CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr: string(csr), ValidityDuration: ttl, Metadata: md,
	})
	if err != nil {
		st := status.Convert(err)
		return nil, &CAError{Identity: id, Addr: c.cfg.Addr, Code: st.Code(), Message: st.Message()}
	}
	return ParseCertChain(resp.GetCertChain(), key, id, time.Now())
}

// NewCSR makes an ECDSA P-256 key and a PEM CSR for it with an empty
// subject and id as its only SAN, as ztunnel does.
func NewCSR(id Identity) (crypto.Signer, []byte, error) {
	if err := id.Validate(); err != nil {
		return nil, nil, err
	}
	u, err := url.Parse(id.String())
	if err != nil {
		return nil, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, key)
	if err != nil {
		return nil, nil, err
	}
	return key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// Classes of CA failure, for errors.Is on a *CAError.
var (
	// ErrCARefused: the CA answered and said no (bad token, not allowed to
	// act for the identity, bad request). Retrying only helps once
	// something changes (a pod shows up, a token is fixed).
	ErrCARefused = errors.New("refused by the CA")
	// ErrCAUnavailable: the CA could not be reached or did not answer.
	ErrCAUnavailable = errors.New("CA unavailable")
)

// CAError is a failed CreateCertificate call.
type CAError struct {
	Identity Identity
	Addr     string
	Code     codes.Code
	Message  string
}

func (e *CAError) Error() string {
	msg := fmt.Sprintf("CA at %s, certificate for %s: %s: %s", e.Addr, e.Identity, e.Code, e.Message)
	if h := e.hint(); h != "" {
		msg += " (" + h + ")"
	}
	return msg
}

// Is makes errors.Is(err, ErrCARefused) and errors.Is(err, ErrCAUnavailable) work.
func (e *CAError) Is(target error) bool {
	switch target {
	case ErrCARefused:
		return e.refused()
	case ErrCAUnavailable:
		return !e.refused()
	}
	return false
}

func (e *CAError) refused() bool {
	switch e.Code {
	case codes.Unauthenticated, codes.PermissionDenied, codes.InvalidArgument, codes.FailedPrecondition:
		return true
	}
	return false
}

func (e *CAError) hint() string {
	switch e.Code {
	case codes.Unauthenticated, codes.PermissionDenied:
		if strings.Contains(e.Message, "impersonation") {
			return fmt.Sprintf("the CA does not let this node act for %s: is a pod of service account %s/%s "+
				"scheduled on this node, and is this node's service account in istiod's CA_TRUSTED_NODE_ACCOUNTS?",
				e.Identity, e.Identity.Namespace, e.Identity.ServiceAccount)
		}
		return "the CA did not accept this node's token: check the token file, its audience (istio-ca) and the clusterid"
	case codes.Unavailable, codes.DeadlineExceeded:
		return "is istiod running, and is its port reachable from this node?"
	case codes.InvalidArgument:
		return "the CA refused the request itself: is SECRET_TTL above the CA's maximum?"
	}
	return ""
}

// verifyCA checks the CA's certificate chain against the root file as it
// is now.
func verifyCA(cs tls.ConnectionState, rootFile, serverName string) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("the CA presented no certificate")
	}
	b, err := os.ReadFile(rootFile)
	if err != nil {
		return fmt.Errorf("reading the mesh root: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(b) {
		return fmt.Errorf("%s holds no PEM certificate", rootFile)
	}
	opts := x509.VerifyOptions{DNSName: serverName, Roots: roots, Intermediates: x509.NewCertPool()}
	for _, c := range cs.PeerCertificates[1:] {
		opts.Intermediates.AddCert(c)
	}
	_, err = cs.PeerCertificates[0].Verify(opts)
	return err
}

// outgoing adds the bearer token (re-read each call) and the cluster ID.
func (c *CAClient) outgoing(ctx context.Context) (context.Context, error) {
	md := metadata.MD{}
	if c.cfg.ClusterID != "" {
		md.Set("clusterid", c.cfg.ClusterID)
	}
	if c.cfg.TokenFile != "" {
		b, err := os.ReadFile(c.cfg.TokenFile)
		if err != nil {
			return nil, fmt.Errorf("identity: reading the token for the CA: %w", err)
		}
		md.Set("authorization", "Bearer "+strings.TrimSpace(string(b)))
	}
	return metadata.NewOutgoingContext(ctx, md), nil
}
