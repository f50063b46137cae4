package identity

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"

	"kmesh.dev/kmesh/ambient/istiod"
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
	// Istiod is the CA's address (CA_ADDRESS; istiod serves it on 15012)
	// and how to connect: TLS verified against the mesh root file as it is
	// at each connection, the node's token read at every request, the
	// cluster ID (the CA picks the cluster whose API server reviews the
	// token and whose pods it checks). Its ServerName defaults to
	// DefaultServerName; Plaintext is refused.
	Istiod istiod.Config
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
	if cfg.Istiod.Addr == "" {
		return nil, errors.New("identity: no CA address")
	}
	if cfg.Istiod.Plaintext {
		return nil, errors.New("identity: the CA is only asked over TLS (it signs the certificates the mesh trusts)")
	}
	if cfg.Istiod.RootFile == "" {
		return nil, errors.New("identity: no mesh root certificate file to verify the CA with")
	}
	if cfg.Istiod.ServerName == "" {
		cfg.Istiod.ServerName = DefaultServerName
	}
	if cfg.TTL <= 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = defaultTimeout
	}
	conn, err := istiod.Dial(cfg.Istiod)
	if err != nil {
		return nil, fmt.Errorf("identity: CA client: %w", err)
	}
	return &CAClient{cfg: cfg, conn: conn, client: pb.NewIstioCertificateServiceClient(conn)}, nil
}

// Close closes the connection.
func (c *CAClient) Close() error { return c.conn.Close() }

// Fetch makes a key and a CSR for id, asks the CA to sign it on id's
// behalf and checks the answer (see ParseCertChain). Errors are a *CAError
// (the CA could not be reached or said no), a *ChainError (its answer was
// unusable) or an *istiod.TokenError (the token file could not be read, so
// nothing was sent).
func (c *CAClient) Fetch(ctx context.Context, id Identity) (*Certificate, error) {
	key, csr, err := NewCSR(id)
	if err != nil {
		return nil, err
	}
	md, err := structpb.NewStruct(map[string]any{impersonatedIdentity: id.String()})
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
		var te *istiod.TokenError
		if errors.As(err, &te) {
			return nil, fmt.Errorf("identity: %w", err) // never sent: nothing the CA said
		}
		st := status.Convert(err)
		return nil, &CAError{Identity: id, Addr: c.cfg.Istiod.Addr, Code: st.Code(), Message: st.Message()}
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
		if strings.Contains(e.Message, "handshake failed") {
			return "" // istiod.VerifyError says what to check
		}
		return "is istiod running, and is its port reachable from this node?"
	case codes.InvalidArgument:
		return "the CA refused the request itself: is SECRET_TTL above the CA's maximum?"
	}
	return ""
}
