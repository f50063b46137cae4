package sim

import (
	"flag"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/miekg/dns"
	"istio.io/istio/pkg/config/protocol"
	"istio.io/istio/pkg/test/echo/common"
	"istio.io/istio/pkg/test/echo/server"

	"kmesh.dev/kmesh/integration/podnet"
)

// Built-in pod apps: a container whose command is one of these names runs
// it (the simulator re-executes its own binary inside the pod).
func init() {
	podnet.RegisterHelper("echo", echoApp)
	podnet.RegisterHelper("dnsresolver", dnsResolverApp)
	podnet.RegisterHelper("sleep", func([]string) (any, error) {
		waitForSignal()
		return nil, nil
	})
}

func waitForSignal() {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT)
	<-ch
}

// echoApp runs Istio's echo server: -http PORT, -tcp PORT, -grpc PORT.
func echoApp(args []string) (any, error) {
	fs := flag.NewFlagSet("echo", flag.ContinueOnError)
	httpPort := fs.Int("http", 8080, "HTTP port (0: none)")
	tcpPort := fs.Int("tcp", 9090, "TCP port (0: none)")
	grpcPort := fs.Int("grpc", 0, "gRPC port (0: none)")
	version := fs.String("version", "v1", "version reported")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	var ports common.PortList
	if *httpPort > 0 {
		ports = append(ports, &common.Port{Name: "http", Protocol: protocol.HTTP, Port: *httpPort})
	}
	if *tcpPort > 0 {
		ports = append(ports, &common.Port{Name: "tcp", Protocol: protocol.TCP, Port: *tcpPort})
	}
	if *grpcPort > 0 {
		ports = append(ports, &common.Port{Name: "grpc", Protocol: protocol.GRPC, Port: *grpcPort})
	}
	s := server.New(server.Config{Ports: ports, Version: *version, Cluster: ClusterID, Namespace: os.Getenv("POD_NAMESPACE"),
		ReportRequest: func() {}})
	if err := s.Start(); err != nil {
		return nil, err
	}
	defer s.Close()
	waitForSignal()
	return nil, nil
}

// dnsResolverApp is the cluster's resolver in the simulator (what kube-dns
// is to a cluster): a miekg/dns server on port 53, UDP and TCP, answering
// A questions for names under example.org. with 192.0.2.7 and everything
// else with NXDOMAIN. It knows nothing of the mesh: an answer for a mesh
// name can only come from the node proxy.
func dnsResolverApp([]string) (any, error) {
	h := dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(q)
		m.RecursionAvailable = true
		if len(q.Question) == 1 && dns.IsSubDomain("example.org.", strings.ToLower(q.Question[0].Name)) {
			if q.Question[0].Qtype == dns.TypeA {
				m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 30},
					A: net.IPv4(192, 0, 2, 7)})
			}
		} else {
			m.Rcode = dns.RcodeNameError
		}
		_ = w.WriteMsg(m)
	})
	errc := make(chan error, 2)
	for _, network := range []string{"udp", "tcp"} {
		srv := &dns.Server{Addr: ":53", Net: network, Handler: h}
		go func() { errc <- srv.ListenAndServe() }()
	}
	sig := make(chan struct{})
	go func() { waitForSignal(); close(sig) }()
	select {
	case err := <-errc:
		return nil, err
	case <-sig:
		return nil, nil
	}
}
