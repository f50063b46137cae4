package xds

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"kmesh.dev/kmesh/ambient/istiod"
	"kmesh.dev/kmesh/ambient/xds/xdstest"
)

func recv(t *testing.T, s *xdstest.Stream) *discovery.DeltaDiscoveryRequest {
	t.Helper()
	select {
	case r := <-s.Requests:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("no request from the client")
		return nil
	}
}

func nextStream(t *testing.T, srv *xdstest.Server) *xdstest.Stream {
	t.Helper()
	select {
	case s := <-srv.Streams:
		return s
	case <-time.After(5 * time.Second):
		t.Fatal("the client did not connect")
		return nil
	}
}

func res(name, version string) *discovery.Resource {
	body, _ := anypb.New(wrapperspb.String(name))
	return &discovery.Resource{Name: name, Version: version, Resource: body}
}

func TestClientAckNackAndReconnect(t *testing.T) {
	srv, err := xdstest.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	tok := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tok, []byte("secret-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var synced atomic.Int32
	var applied atomic.Int32
	c := New(Config{
		Istiod: istiod.Config{Addr: srv.Addr, Plaintext: true, TokenFile: tok, ClusterID: "c1"},
		Node:   &core.Node{Id: "ztunnel~1.2.3.4~p.ns~ns.svc.cluster.local"},
		Types:  []string{AddressType, AuthorizationType},
		Handler: func(typeURL string, rs *Resources, removed []string) []Rejection {
			var rej []Rejection
			for r := range rs.All() {
				if strings.HasPrefix(r.Name, "bad") {
					rej = append(rej, Rejection{Name: r.Name, Reason: errors.New("address of 3 bytes")})
				} else {
					applied.Add(1)
				}
			}
			return rej
		},
		OnSynced: func() { synced.Add(1) },
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go c.Run(ctx)

	s := nextStream(t, srv)
	if got := s.MD.Get("clusterid"); len(got) != 1 || got[0] != "c1" {
		t.Errorf("clusterid metadata %v", got)
	}
	if got := s.MD.Get("authorization"); len(got) != 1 || got[0] != "Bearer secret-token" {
		t.Errorf("authorization metadata %v", got)
	}
	for _, want := range []string{AddressType, AuthorizationType} {
		r := recv(t, s)
		if r.GetTypeUrl() != want || r.GetNode().GetId() == "" || len(r.GetInitialResourceVersions()) != 0 || len(r.GetResourceNamesSubscribe()) != 0 {
			t.Fatalf("initial request %v: want a wildcard subscription to %s with the node", r, want)
		}
	}

	s.Send(&discovery.DeltaDiscoveryResponse{TypeUrl: AddressType, Nonce: "n1",
		Resources: []*discovery.Resource{res("good", "v1"), res("bad", "v1"), res("other", "v7")}})
	nack := recv(t, s)
	if nack.GetResponseNonce() != "n1" || nack.GetErrorDetail() == nil || !strings.Contains(nack.GetErrorDetail().GetMessage(), "bad: address of 3 bytes") {
		t.Fatalf("want a NACK naming bad, got %v", nack)
	}
	if synced.Load() != 0 {
		t.Fatal("synced before every type answered")
	}
	s.Send(&discovery.DeltaDiscoveryResponse{TypeUrl: AuthorizationType, Nonce: "n2"})
	ack := recv(t, s)
	if ack.GetResponseNonce() != "n2" || ack.GetErrorDetail() != nil {
		t.Fatalf("want an ACK, got %v", ack)
	}
	if synced.Load() != 1 {
		t.Fatal("OnSynced did not run after every type answered")
	}
	s.Send(&discovery.DeltaDiscoveryResponse{TypeUrl: AddressType, Nonce: "n3", RemovedResources: []string{"other"}})
	recv(t, s)

	// The server drops the stream: the client reconnects and reports what it
	// holds, with the versions it applied (never the rejected resource).
	s.Close()
	s2 := nextStream(t, srv)
	r := recv(t, s2)
	if got := r.GetInitialResourceVersions(); len(got) != 1 || got["good"] != "v1" {
		t.Fatalf("initial_resource_versions %v, want only good@v1", got)
	}
	recv(t, s2)
	s2.Send(&discovery.DeltaDiscoveryResponse{TypeUrl: AddressType, Nonce: "n4"})
	recv(t, s2)
	if synced.Load() != 1 {
		t.Fatal("OnSynced ran twice")
	}
	if applied.Load() != 2 {
		t.Fatalf("%d resources applied, want 2", applied.Load())
	}
}

func TestTerminationReason(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{nil, "complete"},
		{errors.New("dial tcp: connection refused"), "connection_error"},
	} {
		if got := terminationReason(tc.err); got != tc.want {
			t.Errorf("terminationReason(%v) = %s, want %s", tc.err, got, tc.want)
		}
	}
}

// While no state has come, LastError says why, and what to check: the
// readiness endpoint shows it. A stream that answers clears it.
func TestLastErrorSaysWhatToCheck(t *testing.T) {
	srv, err := xdstest.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	dir := t.TempDir()
	tok := filepath.Join(dir, "token")
	closed := func() string { // a loopback port nothing listens on
		s, err := xdstest.Start()
		if err != nil {
			t.Fatal(err)
		}
		s.Stop()
		return s.Addr
	}()
	run := func(t *testing.T, cfg istiod.Config) *Client {
		c := New(Config{Istiod: cfg, Node: &core.Node{Id: "n"}, Types: []string{AddressType},
			Handler:        func(string, *Resources, []string) []Rejection { return nil },
			InitialBackoff: time.Millisecond, MaxBackoff: 10 * time.Millisecond})
		ctx, cancel := context.WithCancel(context.Background())
		t.Cleanup(cancel)
		go c.Run(ctx)
		return c
	}
	waitFor := func(t *testing.T, c *Client, want string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			if err := c.LastError(); err != nil && strings.Contains(err.Error(), want) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("LastError %v, want one containing %q", c.LastError(), want)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	t.Run("no token file", func(t *testing.T) {
		c := run(t, istiod.Config{Addr: srv.Addr, Plaintext: true, TokenFile: tok})
		waitFor(t, c, "reading the token for istiod from "+tok)
		// The token appears (the projected volume was late): the stream
		// comes up, istiod answers, the error is gone.
		if err := os.WriteFile(tok, []byte("t"), 0o600); err != nil {
			t.Fatal(err)
		}
		s := nextStream(t, srv)
		recv(t, s)
		s.Send(&discovery.DeltaDiscoveryResponse{TypeUrl: AddressType, Nonce: "n1"})
		recv(t, s)
		if err := c.LastError(); err != nil {
			t.Fatalf("LastError %v after istiod answered", err)
		}
	})
	t.Run("istiod unreachable", func(t *testing.T) {
		c := run(t, istiod.Config{Addr: closed, Plaintext: true})
		waitFor(t, c, "is istiod running, XDS_ADDRESS right and port 15012 open?")
	})
}

func TestHint(t *testing.T) {
	cfg := istiod.Config{TokenFile: "/var/run/secrets/tokens/istio-token", ClusterID: "east"}
	for _, tc := range []struct {
		err  error
		want string
	}{
		{status.Error(codes.Unavailable, "connection refused"), "is istiod running"},
		{status.Error(codes.Unauthenticated, "authentication failure"), `token in /var/run/secrets/tokens/istio-token must be a projected service account token with audience istio-ca`},
		{status.Error(codes.PermissionDenied, "no"), `CLUSTER_ID "east" must be istiod's`},
		{status.Error(codes.Unavailable, "connection error: desc = \"transport: authentication handshake failed: x\""), ""},
		{&istiod.TokenError{File: "f", Err: os.ErrNotExist}, ""},
		{errors.New("not a status"), ""},
	} {
		got := hint(tc.err, cfg)
		if (tc.want == "") != (got == "") || !strings.Contains(got, tc.want) {
			t.Errorf("hint(%v) = %q, want one containing %q", tc.err, got, tc.want)
		}
	}
}
