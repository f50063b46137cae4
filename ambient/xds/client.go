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
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

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
type Handler func(typeURL string, resources []*discovery.Resource, removed []string) []Rejection

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
	versions map[string]map[string]string
	synced   map[string]bool
	onSynced sync.Once
	started  time.Time
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
	c := &Client{cfg: cfg, log: log.With("component", "xds"), versions: map[string]map[string]string{}, synced: map[string]bool{}}
	for _, t := range cfg.Types {
		c.versions[t] = map[string]string{}
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
		if vs := c.versions[t]; len(vs) > 0 {
			req.InitialResourceVersions = make(map[string]string, len(vs))
			for n, v := range vs {
				req.InitialResourceVersions[n] = v
			}
		}
		reqs = append(reqs, req)
	}
	return reqs
}

func (c *Client) stream(ctx context.Context) error {
	// istiod's full Address state for a large cluster is big: accept it.
	conn, err := istiod.Dial(c.cfg.Istiod, grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(200<<20)))
	if err != nil {
		return fmt.Errorf("xDS client: %w", err)
	}
	defer conn.Close()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := discovery.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(sctx)
	if err != nil {
		hint := " (is istiod reachable, and port 15012 open?)"
		if strings.Contains(err.Error(), "handshake failed") {
			hint = "" // istiod.VerifyError says what to check
		}
		return fmt.Errorf("opening the ADS stream to %s%s: %w", c.cfg.Istiod.Addr, hint, err)
	}
	for _, req := range c.initialRequests() {
		if err := st.Send(req); err != nil {
			return err
		}
		c.log.Debug("subscribed", "type", req.TypeUrl, "initial_resources", len(req.InitialResourceVersions))
	}
	c.log.Info("xDS stream established", "address", c.cfg.Istiod.Addr)
	for {
		resp, err := st.Recv()
		if err != nil {
			return err
		}
		ack := c.handle(resp)
		if err := st.Send(ack); err != nil {
			return err
		}
	}
}

// handle applies one response and returns the ACK or NACK for it.
func (c *Client) handle(resp *discovery.DeltaDiscoveryResponse) *discovery.DeltaDiscoveryRequest {
	t := resp.GetTypeUrl()
	m := c.cfg.Metrics
	m.Messages.WithLabelValues(t).Inc()
	m.MessageBytes.WithLabelValues(t).Add(float64(proto.Size(resp)))
	start := time.Now()
	rejected := c.cfg.Handler(t, resp.GetResources(), resp.GetRemovedResources())
	m.ApplySeconds.WithLabelValues(t).Observe(time.Since(start).Seconds())

	bad := make(map[string]bool, len(rejected))
	for _, r := range rejected {
		bad[r.Name] = true
	}
	c.mu.Lock()
	vs := c.versions[t]
	if vs == nil {
		vs = map[string]string{}
		c.versions[t] = vs
	}
	for _, r := range resp.GetResources() {
		if !bad[r.GetName()] {
			vs[r.GetName()] = r.GetVersion()
		}
	}
	for _, n := range resp.GetRemovedResources() {
		if !bad[n] {
			delete(vs, n)
		}
	}
	first := !c.synced[t]
	c.synced[t] = true
	all := len(c.synced) >= len(c.cfg.Types)
	c.mu.Unlock()

	ack := &discovery.DeltaDiscoveryRequest{TypeUrl: t, ResponseNonce: resp.GetNonce()}
	if len(rejected) > 0 {
		msgs := make([]string, len(rejected))
		for i, r := range rejected {
			msgs[i] = r.String()
		}
		ack.ErrorDetail = &statuspb.Status{Code: int32(codes.InvalidArgument), Message: strings.Join(msgs, "; ")}
		m.Rejections.WithLabelValues(t).Add(float64(len(rejected)))
		c.log.Error("NACK: resources rejected, their previous versions keep serving", "type", t, "rejected", ack.ErrorDetail.Message)
	} else {
		c.log.Debug("ACK", "type", t, "resources", len(resp.GetResources()), "removed", len(resp.GetRemovedResources()))
	}
	if first && all {
		c.onSynced.Do(func() {
			m.InitialSync.Set(time.Since(c.started).Seconds())
			if c.cfg.OnSynced != nil {
				c.cfg.OnSynced()
			}
		})
	}
	return ack
}
