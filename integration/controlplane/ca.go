// The mesh's certificate authority: Istio's own CA code (the self-signed
// IstioCA, the IstioCertificateService server, Kubernetes JWT
// authentication and node-proxy impersonation) over the control plane's
// in-memory API server, served on the xDS port as istiod serves both on
// 15012.
package controlplane

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	meshconfig "istio.io/api/mesh/v1alpha1"
	"istio.io/istio/pilot/pkg/features"
	"istio.io/istio/pkg/cluster"
	"istio.io/istio/pkg/config/mesh"
	kubelib "istio.io/istio/pkg/kube"
	"istio.io/istio/pkg/kube/multicluster"
	"istio.io/istio/pkg/security"
	"istio.io/istio/pkg/util/sets"
	"istio.io/istio/security/pkg/pki/ca"
	caserver "istio.io/istio/security/pkg/server/ca"
	"istio.io/istio/security/pkg/server/ca/authenticate/kubeauth"
	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	clienttesting "k8s.io/client-go/testing"
)

// The node proxy's Kubernetes identity, as in Istio's ztunnel DaemonSet:
// the CA lets this service account ask for the identities of pods on its
// own node (CA_TRUSTED_NODE_ACCOUNTS).
const (
	NodeProxyNamespace      = "istio-system"
	NodeProxyServiceAccount = "ztunnel"
	// TokenAudience is the audience Istio's CA asks the API server to
	// check (TOKEN_AUDIENCES); tokens minted here carry it by default.
	TokenAudience = "istio-ca"
	// apiAudience is what the API server checks when a review names none.
	apiAudience = "https://kubernetes.default.svc.cluster.local"
)

const (
	defaultTrustDomain = "cluster.local"
	rootTTL            = 10 * 365 * 24 * time.Hour
	servingTTL         = 365 * 24 * time.Hour
	workloadTTL        = 24 * time.Hour      // the CA's default (DEFAULT_WORKLOAD_CERT_TTL)
	maxWorkloadTTL     = 90 * 24 * time.Hour // the CA's maximum (MAX_WORKLOAD_CERT_TTL)
)

// PKI is the mesh's key material, which outlives any one control plane: a
// restarted control plane given the same PKI keeps its root, its serving
// certificate and the tokens it minted. It holds
//   - Istio's self-signed CA (root key and certificate): it signs workload
//     certificates and istiod's serving certificate, so one root file
//     verifies xDS, the CA and every workload;
//   - the key that signs the service account tokens the control plane's
//     API server accepts.
//
// A second PKI (another trust domain, or the same one with another root)
// stands in for a foreign mesh.
type PKI struct {
	trustDomain string
	ca          *ca.IstioCA
	root        *x509.Certificate
	rootPEM     []byte
	rootKey     crypto.Signer
	rootFile    string
	serving     *tls.Config
	tokenKey    []byte
}

// pkis maps the serving configuration ServingTLS returned to its PKI, so
// Start finds the CA behind a TLS configuration callers already pass.
var pkis sync.Map // *tls.Config -> *PKI

// NewPKI makes a new root for trustDomain (default cluster.local) with
// Istio's CA code, and istiod's serving certificate from it (for
// IstiodName and 127.0.0.1). If dir is not empty the root is written to
// dir/root-cert.pem.
func NewPKI(dir, trustDomain string) (*PKI, error) {
	if trustDomain == "" {
		trustDomain = defaultTrustDomain
	}
	opts, err := ca.NewSelfSignedDebugIstioCAOptions("", rootTTL, workloadTTL, maxWorkloadTTL, trustDomain, 2048)
	if err != nil {
		return nil, fmt.Errorf("making the mesh root: %w", err)
	}
	ica, err := ca.NewIstioCA(opts)
	if err != nil {
		return nil, fmt.Errorf("making the Istio CA: %w", err)
	}
	root, key, _, rootPEM := ica.GetCAKeyCertBundle().GetAll()
	signer, ok := (*key).(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("the CA key is a %T", *key)
	}
	p := &PKI{trustDomain: trustDomain, ca: ica, root: root, rootPEM: rootPEM, rootKey: signer, tokenKey: make([]byte, 32)}
	if _, err := rand.Read(p.tokenKey); err != nil {
		return nil, err
	}
	chainPEM, keyPEM, err := ica.GenKeyCert([]string{IstiodName, "127.0.0.1"}, servingTTL, false)
	if err != nil {
		return nil, fmt.Errorf("issuing istiod's serving certificate: %w", err)
	}
	cert, err := tls.X509KeyPair(chainPEM, keyPEM)
	if err != nil {
		return nil, err
	}
	p.serving = &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS12}
	if dir != "" {
		p.rootFile = filepath.Join(dir, "root-cert.pem")
		if err := os.WriteFile(p.rootFile, rootPEM, 0o600); err != nil {
			return nil, err
		}
	}
	pkis.Store(p.serving, p)
	return p, nil
}

func pkiFor(cfg *tls.Config) *PKI {
	if v, ok := pkis.Load(cfg); ok {
		return v.(*PKI)
	}
	return nil
}

// TrustDomain is the trust domain the root issues identities in.
func (p *PKI) TrustDomain() string { return p.trustDomain }

// Root is the mesh root certificate.
func (p *PKI) Root() *x509.Certificate { return p.root }

// RootPEM is the mesh root as PEM (what root-cert.pem holds).
func (p *PKI) RootPEM() []byte { return slices.Clone(p.rootPEM) }

// RootFile is where NewPKI wrote the root ("" if it was given no directory).
func (p *PKI) RootFile() string { return p.rootFile }

// ServingTLS is istiod's server configuration (the same one every call).
func (p *PKI) ServingTLS() *tls.Config { return p.serving }

// SignWorkloadCert issues a certificate for id (normally a SPIFFE URI;
// any URI is accepted, for negative tests) directly from the root, shaped
// like the CA's (empty subject, the URI as only SAN, ECDSA P-256 key),
// valid from notBefore to notAfter. A zero notBefore means now minus the
// CA's two minutes of clock-skew grace; a zero notAfter, notBefore + 24 h.
// The chain holds the leaf only (the root is the issuer).
func (p *PKI) SignWorkloadCert(id string, notBefore, notAfter time.Time) (*tls.Certificate, error) {
	u, err := url.Parse(id)
	if err != nil {
		return nil, err
	}
	if notBefore.IsZero() {
		notBefore = time.Now().Add(-2 * time.Minute)
	}
	if notAfter.IsZero() {
		notAfter = notBefore.Add(workloadTTL)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial, NotBefore: notBefore, NotAfter: notAfter, URIs: []*url.URL{u},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.root, &key.PublicKey, p.rootKey)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, nil
}

// Token describes a service account token. A token bound to a pod (the
// kind kubelet projects) is only valid while that pod exists with that UID.
type Token struct {
	Namespace, ServiceAccount string
	// PodName and PodUID bind the token to a pod (optional).
	PodName string
	PodUID  types.UID
	// NodeName is the bound pod's node, reported back by reviews.
	NodeName string
	// Audiences default to TokenAudience.
	Audiences []string
	// Expiry defaults to a year from now.
	Expiry time.Time
}

// tokenClaims is the JWT payload, shaped like a Kubernetes bound token's.
type tokenClaims struct {
	Issuer    string   `json:"iss"`
	Subject   string   `json:"sub"`
	Audience  []string `json:"aud"`
	IssuedAt  int64    `json:"iat"`
	NotBefore int64    `json:"nbf"`
	Expiry    int64    `json:"exp"`
	ID        string   `json:"jti"`
	Kube      struct {
		Namespace      string `json:"namespace"`
		ServiceAccount ref    `json:"serviceaccount"`
		Pod            *ref   `json:"pod,omitempty"`
		Node           *ref   `json:"node,omitempty"`
	} `json:"kubernetes.io"`
}

type ref struct {
	Name string `json:"name"`
	UID  string `json:"uid,omitempty"`
}

const tokenIssuer = "https://kubernetes.default.svc.cluster.local"

// MintToken signs a token (an HS256 JWT, checked by the control plane's
// TokenReview; the same PKI makes tokens valid across restarts).
func (p *PKI) MintToken(t Token) string {
	now := time.Now()
	if t.Audiences == nil {
		t.Audiences = []string{TokenAudience}
	}
	if t.Expiry.IsZero() {
		t.Expiry = now.Add(365 * 24 * time.Hour)
	}
	var c tokenClaims
	c.Issuer, c.Subject, c.Audience = tokenIssuer, serviceAccountUser(t.Namespace, t.ServiceAccount), t.Audiences
	c.IssuedAt, c.NotBefore, c.Expiry = now.Unix(), now.Add(-time.Minute).Unix(), t.Expiry.Unix()
	jti := make([]byte, 8)
	_, _ = rand.Read(jti)
	c.ID = fmt.Sprintf("%x", jti)
	c.Kube.Namespace, c.Kube.ServiceAccount = t.Namespace, ref{Name: t.ServiceAccount}
	if t.PodName != "" {
		c.Kube.Pod = &ref{Name: t.PodName, UID: string(t.PodUID)}
	}
	if t.NodeName != "" {
		c.Kube.Node = &ref{Name: t.NodeName}
	}
	body, _ := json.Marshal(c)
	enc := base64.RawURLEncoding
	signed := enc.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`)) + "." + enc.EncodeToString(body)
	return signed + "." + enc.EncodeToString(p.sign(signed))
}

func (p *PKI) sign(s string) []byte {
	h := hmac.New(sha256.New, p.tokenKey)
	h.Write([]byte(s))
	return h.Sum(nil)
}

func serviceAccountUser(ns, sa string) string { return "system:serviceaccount:" + ns + ":" + sa }

// review answers a TokenReview as an API server would: the signature,
// validity and audiences are checked, and a pod-bound token is valid only
// while its pod exists with the same UID. getPod reads the pod.
func (p *PKI) review(token string, audiences []string, now time.Time, getPod func(ns, name string) (*corev1.Pod, error)) authv1.TokenReviewStatus {
	deny := func(msg string) authv1.TokenReviewStatus {
		return authv1.TokenReviewStatus{Authenticated: false, Error: msg}
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return deny("invalid bearer token")
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil || !hmac.Equal(sig, p.sign(parts[0]+"."+parts[1])) {
		return deny("invalid bearer token")
	}
	body, err := base64.RawURLEncoding.DecodeString(parts[1])
	var c tokenClaims
	if err != nil || json.Unmarshal(body, &c) != nil {
		return deny("invalid bearer token")
	}
	if now.Unix() >= c.Expiry || now.Unix() < c.NotBefore {
		return deny("[invalid bearer token, square/go-jose/jwt: validation failed, token is expired (exp)]")
	}
	if len(audiences) == 0 {
		audiences = []string{apiAudience}
	}
	var matched []string
	for _, a := range audiences {
		if slices.Contains(c.Audience, a) {
			matched = append(matched, a)
		}
	}
	if len(matched) == 0 {
		return deny("[invalid bearer token, token audiences " + fmt.Sprint(c.Audience) + " is invalid for the target audiences " + fmt.Sprint(audiences) + "]")
	}
	ns, sa := c.Kube.Namespace, c.Kube.ServiceAccount.Name
	extra := map[string]authv1.ExtraValue{"authentication.kubernetes.io/credential-id": {"JTI=" + c.ID}}
	if c.Kube.Pod != nil {
		pod, err := getPod(ns, c.Kube.Pod.Name)
		if err != nil {
			return deny(fmt.Sprintf("[invalid bearer token, pod %q not found]", c.Kube.Pod.Name))
		}
		if string(pod.UID) != c.Kube.Pod.UID {
			return deny(fmt.Sprintf("[invalid bearer token, pod %s/%s UID (%s) does not match claim (%s)]", ns, pod.Name, pod.UID, c.Kube.Pod.UID))
		}
		extra["authentication.kubernetes.io/pod-name"] = authv1.ExtraValue{c.Kube.Pod.Name}
		extra["authentication.kubernetes.io/pod-uid"] = authv1.ExtraValue{c.Kube.Pod.UID}
		if c.Kube.Node != nil {
			extra["authentication.kubernetes.io/node-name"] = authv1.ExtraValue{c.Kube.Node.Name}
		}
	}
	return authv1.TokenReviewStatus{
		Authenticated: true,
		Audiences:     matched,
		User: authv1.UserInfo{
			Username: serviceAccountUser(ns, sa),
			Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
			Extra:    extra,
		},
	}
}

// installTokenReview answers TokenReviews on the fake clientset with p.
// The reactor runs under the clientset's lock, so pods are read from its
// tracker, not through the clientset.
func installTokenReview(c kubelib.Client, p *PKI) {
	cs, ok := c.Kube().(*fake.Clientset)
	if !ok {
		return
	}
	tracker := cs.Tracker()
	getPod := func(ns, name string) (*corev1.Pod, error) {
		o, err := tracker.Get(corev1.SchemeGroupVersion.WithResource("pods"), ns, name)
		if err != nil {
			return nil, err
		}
		return o.(*corev1.Pod), nil
	}
	cs.PrependReactor("create", "tokenreviews", func(a clienttesting.Action) (bool, runtime.Object, error) {
		tr, ok := a.(clienttesting.CreateAction).GetObject().(*authv1.TokenReview)
		if !ok {
			return false, nil, nil
		}
		out := tr.DeepCopy()
		out.Status = p.review(tr.Spec.Token, tr.Spec.Audiences, time.Now(), getPod)
		return true, out, nil
	})
}

// caMu serialises CA servers' construction: Istio reads the trusted node
// accounts from a package variable when the server is made.
var caMu sync.Mutex

// registerCA serves Istio's CA on srv for the control plane's cluster.
func (c *ControlPlane) registerCA(srv *grpc.Server, clusterID cluster.ID) error {
	kc := c.Kube()
	holder := meshHolder{mesh.DefaultMeshConfig()}
	holder.m.TrustDomain = c.pki.trustDomain
	auth := kubeauth.NewKubeJWTAuthenticator(holder, kc.Kube(), clusterID, nil, nil)
	mc := multicluster.NewFakeController()

	caMu.Lock()
	trusted := sets.New(types.NamespacedName{Namespace: NodeProxyNamespace, Name: NodeProxyServiceAccount})
	for n := range features.CATrustedNodeAccounts { // whatever CA_TRUSTED_NODE_ACCOUNTS said too
		trusted.Insert(n)
	}
	// A new set, not an update: earlier servers keep reading theirs.
	features.CATrustedNodeAccounts = trusted
	s, err := caserver.New(c.pki.ca, servingTTL, []security.Authenticator{auth}, mc)
	caMu.Unlock()
	if err != nil {
		return err
	}
	stop := make(chan struct{})
	c.f.Cleanup(func() { close(stop) })
	// The node authorizer watches pods (by node and service account);
	// start its informer on the running client.
	mc.Add(clusterID, kc, stop)
	if !kc.RunAndWait(stop) {
		return errors.New("the CA's pod informer did not sync")
	}
	s.Register(srv)
	return nil
}

type meshHolder struct{ m *meshconfig.MeshConfig }

func (h meshHolder) Mesh() *meshconfig.MeshConfig { return h.m }

// newGRPCServer is the server on the control plane's port: xDS always,
// the CA too when there is a PKI. It mirrors istiod's 15012 with one
// difference: xDS streams are not authenticated (they see no TLS peer, as
// before the CA was added), so node daemons need no token for xDS.
func (c *ControlPlane) newGRPCServer(cfg *tls.Config) *grpc.Server {
	var opts []grpc.ServerOption
	if cfg != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(cfg)))
	}
	opts = append(opts, grpc.ChainStreamInterceptor(withoutTLSPeer), grpc.ChainUnaryInterceptor(c.caGate))
	return grpc.NewServer(opts...)
}

// withoutTLSPeer hides the TLS peer from xDS streams: Istio authenticates
// every TLS stream and would refuse a daemon without a reviewable token.
func withoutTLSPeer(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	ctx := ss.Context()
	if p, ok := peer.FromContext(ctx); ok {
		q := *p
		q.AuthInfo = nil
		ctx = peer.NewContext(ctx, &q)
	}
	return h(srv, contextStream{ss, ctx})
}

type contextStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s contextStream) Context() context.Context { return s.ctx }

// caGate fails CA calls while SetCAOutage(true) is in effect.
func (c *ControlPlane) caGate(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if c.caDown.Load() && strings.HasPrefix(info.FullMethod, "/istio.v1.auth.IstioCertificateService/") {
		return nil, status.Error(codes.Unavailable, "CA outage (simulated)")
	}
	return h(ctx, req)
}

// SetCAOutage makes the CA answer Unavailable (down) or serve again,
// while xDS keeps working: a CA outage without a control plane restart.
func (c *ControlPlane) SetCAOutage(down bool) { c.caDown.Store(down) }

// PKI is the mesh key material the control plane serves with (nil
// without TLS).
func (c *ControlPlane) PKI() *PKI { return c.pki }

// CARoot is the mesh root certificate (nil without TLS).
func (c *ControlPlane) CARoot() *x509.Certificate {
	if c.pki == nil {
		return nil
	}
	return c.pki.root
}

// SignWorkloadCert issues a certificate from the mesh root directly; see
// PKI.SignWorkloadCert.
func (c *ControlPlane) SignWorkloadCert(id string, notBefore, notAfter time.Time) (*tls.Certificate, error) {
	if c.pki == nil {
		return nil, errors.New("control plane without a PKI")
	}
	return c.pki.SignWorkloadCert(id, notBefore, notAfter)
}

// NodeProxyPod is the pod a node proxy on node runs as: istio-system/
// ztunnel-<node>, service account ztunnel, host network, with a UID
// derived from the node name (stable across control plane restarts). It
// has no IP, so istiod makes no workload of it.
func NodeProxyPod(node string) *corev1.Pod {
	h := sha256.Sum256([]byte("kmesh-node-proxy/" + node))
	uid := fmt.Sprintf("%x-%x-%x-%x-%x", h[0:4], h[4:6], h[6:8], h[8:10], h[10:16])
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: "ztunnel-" + node, Namespace: NodeProxyNamespace, UID: types.UID(uid),
			Labels: map[string]string{"app": "ztunnel"},
		},
		Spec: corev1.PodSpec{
			NodeName: node, ServiceAccountName: NodeProxyServiceAccount, HostNetwork: true,
			Containers: []corev1.Container{{Name: "istio-proxy", Image: "kmesh"}},
		},
		Status: corev1.PodStatus{Phase: corev1.PodRunning},
	}
}

// NodeToken returns a token for the node proxy on node, bound to its pod
// (NodeProxyPod, created if missing): what the CA wants from a daemon that
// asks for certificates on behalf of the node's pods.
func (c *ControlPlane) NodeToken(ctx context.Context, node string) (string, error) {
	want := NodeProxyPod(node)
	pods := c.Kube().Kube().CoreV1().Pods(want.Namespace)
	if _, err := pods.Get(ctx, want.Name, metav1.GetOptions{}); apierrors.IsNotFound(err) {
		if _, err := pods.Create(ctx, want, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return "", err
		}
	} else if err != nil {
		return "", err
	}
	return c.PodToken(ctx, want.Namespace, want.Name)
}

// PodToken returns a token bound to an existing pod, for its service
// account (as kubelet projects into it).
func (c *ControlPlane) PodToken(ctx context.Context, namespace, name string) (string, error) {
	if c.pki == nil {
		return "", errors.New("control plane without a PKI")
	}
	pod, err := c.Kube().Kube().CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	return c.pki.MintToken(Token{Namespace: namespace, ServiceAccount: sa, PodName: name, PodUID: pod.UID, NodeName: pod.Spec.NodeName}), nil
}
