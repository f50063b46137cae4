package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"kmesh.dev/kmesh/ambient/sidecar"
)

// maxSidecarPods bounds the sidecar pods spliced at once: kmesh_splice_ns
// (4096 entries) also holds enrolled pods' opt-ins.
const maxSidecarPods = 1024

// startSidecarSplice watches this node's pods and the namespaces for the
// kmesh.dev/splice opt-in (KMESH_SIDECAR_SPLICE) until ctx ends.
func (a *Agent) startSidecarSplice(ctx context.Context) error {
	cfg := a.cfg
	if !cfg.SidecarSplice {
		return nil
	}
	if cfg.NodeName == "" {
		return errors.New("sidecar splicing watches this node's pods: NODE_NAME is needed")
	}
	server := cfg.KubeAPI
	if server == "" {
		host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
		if host == "" || port == "" {
			return errors.New("sidecar splicing: no Kubernetes API (set KMESH_KUBE_API, or run in a pod)")
		}
		server = "https://" + net.JoinHostPort(host, port)
	}
	tlsConf := &tls.Config{MinVersion: tls.VersionTLS12}
	if strings.HasPrefix(server, "https://") {
		pem, err := os.ReadFile(cfg.KubeCAFile)
		if err != nil {
			return fmt.Errorf("sidecar splicing: the Kubernetes API's CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("sidecar splicing: no certificate in %s", cfg.KubeCAFile)
		}
		tlsConf.RootCAs = pool
	}
	r := &sidecar.Reconciler{Node: cfg.NodeName, Map: a.DP.Maps, Finder: sidecar.Finder{Proc: cfg.HostProc, MaxProcs: 1 << 20},
		Max: maxSidecarPods, Log: a.log}
	w := &sidecar.Watch{Server: server, Node: cfg.NodeName, R: r, Log: a.log,
		// No overall timeout: watches are long-lived.
		Client: &http.Client{Transport: &http.Transport{TLSClientConfig: tlsConf, ResponseHeaderTimeout: 30 * time.Second}},
		Token: func() (string, error) {
			b, err := os.ReadFile(cfg.KubeTokenFile)
			return strings.TrimSpace(string(b)), err
		}}
	a.Reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kmesh_sidecar_spliced_pods",
		Help: "Pods that keep an Istio sidecar whose in-pod connections are spliced (kmesh.dev/splice)."},
		func() float64 { return float64(len(r.Spliced())) }))
	a.Reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kmesh_sidecar_captured_pods",
		Help: "Spliced sidecar pods whose default Istio capture the kernel performs at connect, so that every leg of their connections is spliced."},
		func() float64 { return float64(len(r.Captured())) }))
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		w.Run(ctx)
	}()
	a.log.Info("sidecar splicing on: watching this node's pods for kmesh.dev/splice", "api", server)
	return nil
}
