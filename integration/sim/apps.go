package sim

import (
	"flag"
	"os"
	"os/signal"
	"syscall"

	"istio.io/istio/pkg/config/protocol"
	"istio.io/istio/pkg/test/echo/common"
	"istio.io/istio/pkg/test/echo/server"

	"kmesh.dev/kmesh/integration/podnet"
)

// Built-in pod apps: a container whose command is one of these names runs
// it (the simulator re-executes its own binary inside the pod).
func init() {
	podnet.RegisterHelper("echo", echoApp)
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
