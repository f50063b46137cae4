// Package istiod is how the daemon's clients of the control plane (the xDS
// client, the CA client) connect to istiod, as ztunnel does:
//
//   - TLS verified against the mesh root certificate file as it is at each
//     handshake, so a rotated root is picked up without a restart;
//   - the node's bearer token, read from its file at every RPC (projected
//     tokens rotate), as "authorization: Bearer <token>";
//   - the cluster ID, as "clusterid" metadata: istiod picks the cluster
//     whose API server reviews the token.
//
// The token and cluster ID travel as gRPC per-RPC credentials, so every
// RPC on a connection made here carries them, whoever makes it.
package istiod

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// Config says where istiod is and how this node proves who it is.
type Config struct {
	// Addr is istiod's address, host:port (a gRPC target; istiod serves
	// xDS and its CA on 15012).
	Addr string
	// RootFile is the mesh root certificate (PEM) istiod's serving
	// certificate must chain to. It is read at every TLS handshake.
	RootFile string
	// ServerName is the name istiod's certificate must hold; default: the
	// host of Addr.
	ServerName string
	// TokenFile holds the node's service account token, read at every
	// RPC. Empty: no token is sent.
	TokenFile string
	// ClusterID is sent as "clusterid" metadata when set.
	ClusterID string
	// Plaintext talks to istiod without TLS (development and tests only).
	// The token and cluster ID are still sent, in the clear.
	Plaintext bool
}

// Validate checks the configuration's shape; it reads no file.
func (c Config) Validate() error {
	if c.Addr == "" {
		return errors.New("istiod: no address")
	}
	if !c.Plaintext && c.RootFile == "" {
		return errors.New("istiod: no mesh root certificate file to verify istiod with")
	}
	return nil
}

// Check is Validate plus reading the root file once, for a caller that
// wants a missing or empty root to fail at start rather than at the first
// handshake. Later handshakes read the file again.
func (c Config) Check() error {
	if err := c.Validate(); err != nil {
		return err
	}
	if c.Plaintext {
		return nil
	}
	_, err := readRoots(c.RootFile)
	return err
}

// Dial makes a client connection to istiod (lazily: the first RPC
// connects) with DialOptions and then opts.
func Dial(c Config, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(c.Addr, append(c.DialOptions(), opts...)...)
	if err != nil {
		return nil, fmt.Errorf("istiod: client for %s: %w", c.Addr, err)
	}
	return conn, nil
}

// DialOptions are the transport and per-RPC credentials of c.
func (c Config) DialOptions() []grpc.DialOption {
	var tc credentials.TransportCredentials = insecure.NewCredentials()
	if !c.Plaintext {
		tc = credentials.NewTLS(c.TLSConfig())
	}
	return []grpc.DialOption{grpc.WithTransportCredentials(tc), grpc.WithPerRPCCredentials(c.PerRPCCredentials())}
}

// TLSConfig verifies istiod's certificate chain and name against the root
// file as it is at each handshake. (The standard verification would use a
// pool fixed when the configuration was made.)
func (c Config) TLSConfig() *tls.Config {
	name := c.serverName()
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		ServerName: name,
		NextProtos: []string{"h2"},
		// VerifyConnection verifies, with the root file read now.
		InsecureSkipVerify: true, //nolint:gosec // VerifyConnection below verifies.
		VerifyConnection: func(cs tls.ConnectionState) error {
			return verify(cs, c.Addr, c.RootFile, name)
		},
	}
}

// serverName is ServerName or the host of Addr (as gRPC would derive it
// from the target's authority).
func (c Config) serverName() string {
	if c.ServerName != "" {
		return c.ServerName
	}
	authority := c.Addr
	if i := strings.LastIndex(authority, "/"); i >= 0 { // dns:///host:port
		authority = authority[i+1:]
	}
	if host, _, err := net.SplitHostPort(authority); err == nil {
		return host
	}
	return authority
}

func readRoots(file string) (*x509.CertPool, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("istiod: reading the mesh root certificate: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("istiod: the mesh root file %s holds no PEM certificate", file)
	}
	return pool, nil
}

// verify checks istiod's chain against the root file as it is now.
func verify(cs tls.ConnectionState, addr, rootFile, name string) error {
	if len(cs.PeerCertificates) == 0 {
		return &VerifyError{Addr: addr, RootFile: rootFile, ServerName: name, Err: errors.New("istiod presented no certificate")}
	}
	roots, err := readRoots(rootFile)
	if err != nil {
		return err
	}
	opts := x509.VerifyOptions{DNSName: name, Roots: roots, Intermediates: x509.NewCertPool()}
	for _, c := range cs.PeerCertificates[1:] {
		opts.Intermediates.AddCert(c)
	}
	if _, err := cs.PeerCertificates[0].Verify(opts); err != nil {
		return &VerifyError{Addr: addr, RootFile: rootFile, ServerName: name, Err: err}
	}
	return nil
}

// VerifyError is istiod's certificate failing verification, with a hint
// at the usual cause. gRPC reports it inside an Unavailable status ("...
// authentication handshake failed: <this error>").
type VerifyError struct {
	Addr, RootFile, ServerName string
	Err                        error
}

func (e *VerifyError) Error() string {
	return fmt.Sprintf("istiod at %s: certificate not trusted: %v (%s)", e.Addr, e.Err, e.hint())
}

func (e *VerifyError) Unwrap() error { return e.Err }

func (e *VerifyError) hint() string {
	var unknown x509.UnknownAuthorityError
	var host x509.HostnameError
	var invalid x509.CertificateInvalidError
	switch {
	case errors.As(e.Err, &unknown):
		return fmt.Sprintf("it does not chain to the mesh root in %s: is that file istiod's current root "+
			"(the istio-ca-root-cert ConfigMap; XDS_ROOT_CA names the file)?", e.RootFile)
	case errors.As(e.Err, &host):
		return fmt.Sprintf("it is not issued for %s: set the name istiod's certificate holds "+
			"(ALT_XDS_HOSTNAME), or reach istiod by that name", e.ServerName)
	case errors.As(e.Err, &invalid) && invalid.Reason == x509.Expired:
		return "expired or not yet valid: are the clocks of this node and istiod right?"
	}
	return "check the mesh root file " + e.RootFile + " and the name " + e.ServerName
}

// PerRPCCredentials adds the cluster ID and the token, read now, to every
// RPC. Over TLS gRPC refuses to send them on a connection without
// transport security; in Plaintext mode they are sent anyway.
func (c Config) PerRPCCredentials() credentials.PerRPCCredentials {
	return rpcCreds{tokenFile: c.TokenFile, clusterID: c.ClusterID, secure: !c.Plaintext}
}

type rpcCreds struct {
	tokenFile, clusterID string
	secure               bool
}

func (r rpcCreds) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	md := make(map[string]string, 2)
	if r.clusterID != "" {
		md["clusterid"] = r.clusterID
	}
	if r.tokenFile != "" {
		b, err := os.ReadFile(r.tokenFile)
		if err != nil {
			return nil, &TokenError{File: r.tokenFile, Err: err}
		}
		md["authorization"] = "Bearer " + strings.TrimSpace(string(b))
	}
	return md, nil
}

func (r rpcCreds) RequireTransportSecurity() bool { return r.secure }

// TokenError is the token file failing to read. An RPC that could not get
// its credentials fails with this error itself (not a copy of its text),
// so errors.Is(err, fs.ErrNotExist) and errors.As work on the RPC's error.
type TokenError struct {
	File string
	Err  error
}

func (e *TokenError) Error() string {
	return fmt.Sprintf("reading the token for istiod from %s: %v", e.File, e.Err)
}

func (e *TokenError) Unwrap() error { return e.Err }

// GRPCStatus makes gRPC hand the error back unchanged (it passes on
// per-RPC credential errors that carry a status) with code Unauthenticated.
func (e *TokenError) GRPCStatus() *status.Status {
	return status.New(codes.Unauthenticated, e.Error())
}
