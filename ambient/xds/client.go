// Package xds is a Delta ADS client that behaves towards istiod as ztunnel
// does: one DeltaAggregatedResources stream per connection, wildcard
// subscriptions, ACK or NACK (with an error naming each rejected resource)
// for every response, exponential backoff between connections, and on
// reconnect the versions of the resources it holds, so istiod sends only
// what changed and names what was removed meanwhile.
package xds

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/experimental"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"

	"kmesh.dev/kmesh/ambient/istiod"
)

// Type URLs of the ambient workload API.
const (
	AddressType       = "type.googleapis.com/istio.workload.Address"
	AuthorizationType = "type.googleapis.com/istio.security.Authorization"
)

// Rejection is one resource a handler could not apply.
type Rejection struct {
	Name   string
	Reason error
}

func (r Rejection) String() string { return r.Name + ": " + r.Reason.Error() }

// Handler applies the resources of one response. Resources it rejects keep
// their previous version (the client NACKs naming them); the rest apply.
// It must range over resources.All() (once): the resources are read from
// the received message as the iteration goes.
type Handler func(typeURL string, resources *Resources, removed []string) []Rejection

// Config configures a Client.
type Config struct {
	// Istiod is istiod's xDS address and how to connect to it: TLS with
	// the mesh root re-read at every connection (Plaintext for tests), the
	// bearer token re-read at every stream, the cluster ID.
	Istiod  istiod.Config
	Node    *core.Node
	Types   []string
	Handler Handler
	// OnSynced runs once, after the first response of every type was handled.
	OnSynced func()
	Metrics  *Metrics
	Log      *slog.Logger
	// Backoff bounds; defaults 10 ms and 15 s, as ztunnel.
	InitialBackoff, MaxBackoff time.Duration
}

// Client is a Delta ADS client. Run it once; it reconnects by itself.
type Client struct {
	cfg Config
	log *slog.Logger

	mu sync.Mutex
	// versions holds, per type, the version of every resource we applied:
	// sent as initial_resource_versions on reconnect. A rejected resource
	// keeps the version we last applied, so istiod re-sends it.
	versions map[string]*versionMap
	synced   map[string]bool
	onSynced sync.Once
	started  time.Time
	// lastErr is why the last stream ended, for readiness to report while
	// the first state has not arrived; nil once a stream is up.
	lastErr atomic.Pointer[error]
}

// LastError is why the last stream to istiod ended (nil while one is
// connected and answering, and before the first attempt ends).
func (c *Client) LastError() error {
	if p := c.lastErr.Load(); p != nil {
		return *p
	}
	return nil
}

// New returns a client; nothing happens until Run.
func New(cfg Config) *Client {
	if cfg.InitialBackoff == 0 {
		cfg.InitialBackoff = 10 * time.Millisecond
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = 15 * time.Second
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	log := cfg.Log
	if log == nil {
		log = slog.Default()
	}
	c := &Client{cfg: cfg, log: log.With("component", "xds"), versions: map[string]*versionMap{}, synced: map[string]bool{}}
	for _, t := range cfg.Types {
		c.versions[t] = &versionMap{}
	}
	return c
}

// Run connects and serves the stream until ctx ends, reconnecting with
// exponential backoff and jitter. State already applied keeps serving
// while disconnected.
func (c *Client) Run(ctx context.Context) error {
	c.started = time.Now()
	backoff := c.cfg.InitialBackoff
	for {
		start := time.Now()
		err := c.stream(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err == nil {
			err = io.EOF
		}
		c.lastErr.Store(&err)
		reason := terminationReason(err)
		c.cfg.Metrics.Terminations.WithLabelValues(reason).Inc()
		if time.Since(start) > time.Minute {
			backoff = c.cfg.InitialBackoff // a long healthy stream resets the backoff
		}
		if reason == "reconnect" {
			backoff = c.cfg.InitialBackoff
		} else {
			c.log.Warn("xDS stream ended; state kept, reconnecting", "address", c.cfg.Istiod.Addr, "err", err, "retry_in", backoff)
		}
		wait := backoff/2 + time.Duration(rand.Int64N(int64(backoff/2)+1))
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		if reason != "reconnect" {
			backoff = min(backoff*2, c.cfg.MaxBackoff)
		}
	}
}

// hint says what to check for a failed stream, where the error itself does
// not: istiod.VerifyError and istiod.TokenError already do.
func hint(err error, cfg istiod.Config) string {
	var verr *istiod.VerifyError
	var terr *istiod.TokenError
	if errors.As(err, &verr) || errors.As(err, &terr) || strings.Contains(err.Error(), "handshake failed") {
		return ""
	}
	s, ok := status.FromError(err)
	if !ok {
		return ""
	}
	switch s.Code() {
	case codes.Unavailable:
		return " (is istiod running, XDS_ADDRESS right and port 15012 open?)"
	case codes.Unauthenticated, codes.PermissionDenied:
		return fmt.Sprintf(" (istiod refused this node's credentials: the token in %s must be a projected service account token "+
			"with audience istio-ca, for a service account istiod trusts as a node proxy (its CA_TRUSTED_NODE_ACCOUNTS, "+
			"istio-system/ztunnel by default); CLUSTER_ID %q must be istiod's)", cfg.TokenFile, cfg.ClusterID)
	}
	return ""
}

// terminationReason classifies a stream end for the metric, as ztunnel:
// graceful server-side ends (max connection age, GOAWAY) reconnect at once.
func terminationReason(err error) string {
	if err == nil || errors.Is(err, io.EOF) {
		return "complete"
	}
	if s, ok := status.FromError(err); ok {
		switch s.Code() {
		case codes.Canceled, codes.DeadlineExceeded, codes.Unknown:
			return "reconnect"
		case codes.Unavailable:
			if strings.Contains(s.Message(), "transport is closing") || strings.Contains(s.Message(), "GOAWAY") {
				return "reconnect"
			}
			return "connection_error"
		}
		return "error"
	}
	return "connection_error"
}

func (c *Client) initialRequests() []*discovery.DeltaDiscoveryRequest {
	c.mu.Lock()
	defer c.mu.Unlock()
	var reqs []*discovery.DeltaDiscoveryRequest
	for _, t := range c.cfg.Types {
		req := &discovery.DeltaDiscoveryRequest{TypeUrl: t, Node: c.cfg.Node}
		if vs := c.versions[t]; vs != nil && vs.len() > 0 {
			req.InitialResourceVersions = vs.all()
		}
		reqs = append(reqs, req)
	}
	return reqs
}

func (c *Client) stream(ctx context.Context) error {
	conn, err := istiod.Dial(c.cfg.Istiod,
		// istiod's full Address state for a large cluster is big: accept it.
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(200<<20)),
		// Receive buffers are not pooled: the first response is the whole
		// mesh, and buffers returned to a pool would stay allocated (until
		// later collections empty it) while the state built from them grows.
		// Later responses are small.
		experimental.WithBufferPool(mem.NopBufferPool{}))
	if err != nil {
		return fmt.Errorf("xDS client: %w", err)
	}
	defer conn.Close()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := discovery.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(sctx, grpc.ForceCodecV2(newCodec()))
	if err != nil {
		return fmt.Errorf("opening the ADS stream to %s%s: %w", c.cfg.Istiod.Addr, hint(err, c.cfg.Istiod), err)
	}
	for _, req := range c.initialRequests() {
		if err := st.Send(req); err != nil {
			return err
		}
		c.log.Debug("subscribed", "type", req.TypeUrl, "initial_resources", len(req.InitialResourceVersions))
	}
	c.log.Info("xDS stream established", "address", c.cfg.Istiod.Addr)
	for {
		var resp rawResponse
		if err := st.RecvMsg(&resp); err != nil {
			if h := hint(err, c.cfg.Istiod); h != "" {
				return fmt.Errorf("ADS stream to %s%s: %w", c.cfg.Istiod.Addr, h, err)
			}
			return err
		}
		ack, err := c.handle(newRope(resp.data))
		if err != nil {
			return err
		}
		c.lastErr.Store(nil) // istiod answers
		if err := st.Send(ack); err != nil {
			return err
		}
	}
}

// handle applies one response and returns the ACK or NACK for it. A
// response that is not a well-formed DeltaDiscoveryResponse ends the stream
// (as a failure to decode it in gRPC would).
func (c *Client) handle(msg *rope) (*discovery.DeltaDiscoveryRequest, error) {
	env, err := readEnvelope(msg)
	if err != nil {
		msg.free()
		return nil, status.Errorf(codes.Internal, "xDS response of %d bytes: %v", msg.size, err)
	}
	t := env.typeURL
	m := c.cfg.Metrics
	m.Messages.WithLabelValues(t).Inc()
	m.MessageBytes.WithLabelValues(t).Add(float64(env.size))

	c.mu.Lock()
	vs := c.versions[t]
	if vs == nil {
		vs = &versionMap{}
		c.versions[t] = vs
	}
	c.mu.Unlock()
	// Versions are recorded as the handler reads each resource, and undone
	// for those it rejects: nothing of the response is kept aside. (istiod
	// names a resource once per response.)
	undo := map[string]version{} // previous versions of the resources replaced
	var added []string           // resources new to us
	var rejected []Rejection
	res := &Resources{msg: msg, n: env.resources,
		onRes: func(name string, v []byte) {
			c.mu.Lock()
			if prev, ok := vs.set(name, v); !ok {
				added = append(added, name)
			} else if _, seen := undo[name]; !seen {
				undo[name] = prev
			}
			c.mu.Unlock()
		},
		onBad: func(r Rejection) { rejected = append(rejected, r) },
	}
	start := time.Now()
	rejected = append(rejected, c.cfg.Handler(t, res, env.removed)...)
	res.release()
	m.ApplySeconds.WithLabelValues(t).Observe(time.Since(start).Seconds())

	bad := make(map[string]bool, len(rejected))
	for _, r := range rejected {
		bad[r.Name] = true
	}
	c.mu.Lock()
	if len(bad) > 0 {
		for _, n := range added {
			if bad[n] {
				vs.delete(n)
			}
		}
		for n, prev := range undo {
			if bad[n] {
				vs.restore(n, prev)
			}
		}
	}
	for _, n := range env.removed {
		if !bad[n] {
			vs.delete(n)
		}
	}
	first := !c.synced[t]
	c.synced[t] = true
	all := len(c.synced) >= len(c.cfg.Types)
	c.mu.Unlock()

	ack := &discovery.DeltaDiscoveryRequest{TypeUrl: t, ResponseNonce: env.nonce}
	if len(rejected) > 0 {
		msgs := make([]string, len(rejected))
		for i, r := range rejected {
			msgs[i] = r.String()
		}
		ack.ErrorDetail = &statuspb.Status{Code: int32(codes.InvalidArgument), Message: strings.Join(msgs, "; ")}
		m.Rejections.WithLabelValues(t).Add(float64(len(rejected)))
		c.log.Error("NACK: resources rejected, their previous versions keep serving", "type", t, "rejected", ack.ErrorDetail.Message)
	} else {
		c.log.Debug("ACK", "type", t, "resources", env.resources, "removed", len(env.removed))
	}
	if first && all {
		c.onSynced.Do(func() {
			m.InitialSync.Set(time.Since(c.started).Seconds())
			if c.cfg.OnSynced != nil {
				c.cfg.OnSynced()
			}
		})
	}
	return ack, nil
}
