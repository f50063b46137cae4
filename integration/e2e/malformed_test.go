package e2e

import (
	"crypto/sha256"
	"fmt"
	"strings"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"istio.io/istio/pkg/workloadapi"

	"kmesh.dev/kmesh/ambient/xds"
	"kmesh.dev/kmesh/ambient/xds/xdstest"
	"kmesh.dev/kmesh/bpf"
)

func address(t *testing.T, name string, a *workloadapi.Address) *discovery.Resource {
	t.Helper()
	body, err := anypb.New(a)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := proto.Marshal(a)
	return &discovery.Resource{Name: name, Version: fmt.Sprintf("%x", sha256.Sum256(b))[:12], Resource: body}
}

func webWorkload(ip []byte) *workloadapi.Address {
	return &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{
		Uid: "c//Pod/demo/web-0", Name: "web-0", Namespace: "demo", Addresses: [][]byte{ip}, Node: "node-1",
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE,
		Services:       map[string]*workloadapi.PortList{"demo/web.demo.svc.cluster.local": {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}},
	}}}
}

func webSvc(vip []byte) *workloadapi.Address {
	return &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{
		Name: "web", Namespace: "demo", Hostname: "web.demo.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: vip}},
		Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}},
	}}}
}

// Resources istiod would never send (they do not parse) are NACKed by name;
// the rest of the response applies, and the last good version of a broken
// resource keeps serving.
func TestPrivilegedXDSMalformedIsNacked(t *testing.T) {
	srv, err := xdstest.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	c := newCluster(t, bpf.MapSizes{})
	c.addPod("web-0", 11, "node-1", "web")
	c.cpAddr, c.plaintext = srv.Addr, true
	c.startAgent()
	s := <-srv.Streams
	<-s.Requests
	<-s.Requests

	web0 := []byte{10, 244, 1, 11}
	s.Send(&discovery.DeltaDiscoveryResponse{TypeUrl: xds.AddressType, Nonce: "1", Resources: []*discovery.Resource{
		address(t, "c//Pod/demo/web-0", webWorkload(web0)),
		address(t, "demo/web.demo.svc.cluster.local", webSvc([]byte{10, 96, 0, 10})),
	}})
	if r := <-s.Requests; r.GetErrorDetail() != nil {
		t.Fatalf("valid resources NACKed: %v", r.GetErrorDetail())
	}
	s.Send(&discovery.DeltaDiscoveryResponse{TypeUrl: xds.AuthorizationType, Nonce: "2"})
	<-s.Requests
	c.waitSynced()
	expectOnly(t, c.run("tcp", "-addr", "10.96.0.10:80", "-n", "20", "-network", "tcp4").Names, "web-0:8080")

	// A broken update of the service and a broken new workload, next to a
	// valid new service.
	other := webSvc([]byte{10, 96, 0, 11})
	other.GetService().Name, other.GetService().Hostname = "other", "other.demo.svc.cluster.local"
	s.Send(&discovery.DeltaDiscoveryResponse{TypeUrl: xds.AddressType, Nonce: "3", Resources: []*discovery.Resource{
		address(t, "demo/web.demo.svc.cluster.local", webSvc([]byte{10, 96, 0})),
		address(t, "c//Pod/demo/web-9", webWorkload([]byte{1, 2, 3, 4, 5})),
		address(t, "demo/other.demo.svc.cluster.local", other),
	}})
	var nack *discovery.DeltaDiscoveryRequest
	select {
	case nack = <-s.Requests:
	case <-time.After(5 * time.Second):
		t.Fatal("no answer to the broken update")
	}
	msg := nack.GetErrorDetail().GetMessage()
	if nack.GetResponseNonce() != "3" || !strings.Contains(msg, "demo/web.demo.svc.cluster.local") || !strings.Contains(msg, "c//Pod/demo/web-9") ||
		strings.Contains(msg, "other") {
		t.Fatalf("want a NACK naming exactly the two broken resources, got %q", msg)
	}
	expectOnly(t, c.run("tcp", "-addr", "10.96.0.10:80", "-n", "20", "-network", "tcp4").Names, "web-0:8080")
	if c.agent.Store.Service("demo/other.demo.svc.cluster.local") == nil {
		t.Fatal("the valid resource of the NACKed response was not applied")
	}
	if n := c.slots("10.96.0.11", 80); n != 0 {
		t.Fatalf("other service: %d slots, want its frontend with no endpoints", n)
	}
}
