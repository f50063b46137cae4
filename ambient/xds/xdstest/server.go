// Package xdstest is a scriptable Delta ADS server for tests that need a
// control plane to send what a real istiod never would (malformed
// resources) or to observe exactly what a client sends.
package xdstest

import (
	"net"
	"sync"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// Stream is one client connection.
type Stream struct {
	MD       metadata.MD
	Requests chan *discovery.DeltaDiscoveryRequest
	send     chan *discovery.DeltaDiscoveryResponse
	done     chan struct{}
}

// Send sends a response to the client.
func (s *Stream) Send(r *discovery.DeltaDiscoveryResponse) { s.send <- r }

// Close ends the stream from the server side.
func (s *Stream) Close() { close(s.done) }

// Server accepts Delta ADS streams on a loopback port.
type Server struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	Addr    string
	Streams chan *Stream
	srv     *grpc.Server
	once    sync.Once
}

// Start serves on 127.0.0.1 (plaintext).
func Start() (*Server, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &Server{Addr: l.Addr().String(), Streams: make(chan *Stream, 16), srv: grpc.NewServer()}
	discovery.RegisterAggregatedDiscoveryServiceServer(s.srv, s)
	go s.srv.Serve(l)
	return s, nil
}

// Stop stops the server.
func (s *Server) Stop() { s.once.Do(s.srv.Stop) }

// DeltaAggregatedResources hands each stream to the test through Streams.
func (s *Server) DeltaAggregatedResources(st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	md, _ := metadata.FromIncomingContext(st.Context())
	cs := &Stream{MD: md, Requests: make(chan *discovery.DeltaDiscoveryRequest, 64),
		send: make(chan *discovery.DeltaDiscoveryResponse, 64), done: make(chan struct{})}
	s.Streams <- cs
	errc := make(chan error, 1)
	go func() {
		for {
			req, err := st.Recv()
			if err != nil {
				errc <- err
				return
			}
			cs.Requests <- req
		}
	}()
	for {
		select {
		case r := <-cs.send:
			if err := st.Send(r); err != nil {
				return err
			}
		case err := <-errc:
			return err
		case <-cs.done:
			return nil
		}
	}
}
