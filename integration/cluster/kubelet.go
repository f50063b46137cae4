package cluster

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"k8s.io/streaming/pkg/httpstream"
	"k8s.io/streaming/pkg/httpstream/spdy"
)

// KubeletAPI serves the part of a kubelet's API the API server proxies
// port-forward to (`kubectl port-forward`, istioctl ztunnel-config): the
// SPDY protocol portforward.k8s.io on /portForward/<namespace>/<pod>. It
// listens inside a simulated node's network namespace, at the node's
// address and its kubelet port (Node.Status.DaemonEndpoints), where the
// API server reaches it through the egress proxy; each forwarded stream
// connects to 127.0.0.1:port inside the pod's network namespace, as a
// container runtime does (so a pod's localhost-only admin port, like the
// node proxy's 15000, is reachable). Nothing else of a kubelet's API is
// served (logs, exec, stats: 404).
type KubeletAPI struct {
	// DialPod connects to 127.0.0.1:port inside the pod's network
	// namespace (an error if the pod does not run on this node).
	DialPod func(ctx context.Context, namespace, name string, port uint16) (net.Conn, error)
	Logf    func(string, ...any)

	srv *http.Server
}

// Serve serves on ln (TLS with a self-signed certificate: the API server
// does not verify kubelets without --kubelet-certificate-authority) until
// Close.
func (k *KubeletAPI) Serve(ln net.Listener) error {
	cert, err := selfSignedServing("kubelet")
	if err != nil {
		return err
	}
	k.srv = &http.Server{
		Handler:           http.HandlerFunc(k.handle),
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}},
		ReadHeaderTimeout: 10 * time.Second,
	}
	go func() { _ = k.srv.ServeTLS(ln, "", "") }()
	return nil
}

// Close stops serving.
func (k *KubeletAPI) Close() error {
	if k.srv == nil {
		return nil
	}
	return k.srv.Close()
}

func (k *KubeletAPI) logf(f string, a ...any) {
	if k.Logf != nil {
		k.Logf(f, a...)
	}
}

func (k *KubeletAPI) handle(w http.ResponseWriter, req *http.Request) {
	parts := strings.Split(strings.Trim(req.URL.Path, "/"), "/")
	if len(parts) < 3 || parts[0] != "portForward" {
		http.NotFound(w, req)
		return
	}
	ns, name := parts[1], parts[2]
	if _, err := httpstream.Handshake(req, w, []string{"portforward.k8s.io"}); err != nil {
		return // Handshake wrote the error
	}
	streams := make(chan httpstream.Stream, 8)
	conn := spdy.NewResponseUpgrader().UpgradeResponse(w, req, func(s httpstream.Stream, _ <-chan struct{}) error {
		streams <- s
		return nil
	})
	if conn == nil {
		return
	}
	defer conn.Close()
	conn.SetIdleTimeout(10 * time.Minute)
	type pair struct{ data, errs httpstream.Stream }
	pairs := map[string]*pair{}
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case <-conn.CloseChan():
			return
		case s := <-streams:
			id := s.Headers().Get("requestID")
			p := pairs[id]
			if p == nil {
				p = &pair{}
				pairs[id] = p
			}
			switch s.Headers().Get("streamType") {
			case "data":
				p.data = s
			case "error":
				p.errs = s
			default:
				s.Reset()
				continue
			}
			if p.data == nil || p.errs == nil {
				continue
			}
			delete(pairs, id)
			port, err := strconv.ParseUint(p.data.Headers().Get("port"), 10, 16)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conn.RemoveStreams(p.data, p.errs)
				if err != nil {
					fmt.Fprintf(p.errs, "bad port: %v", err)
					p.errs.Close()
					p.data.Close()
					return
				}
				k.forward(ns, name, uint16(port), p.data, p.errs)
			}()
		}
	}
}

// forward copies between the data stream and a connection to the pod's
// port; a dial failure goes to the error stream.
func (k *KubeletAPI) forward(ns, name string, port uint16, data, errs httpstream.Stream) {
	defer errs.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	up, err := k.DialPod(ctx, ns, name, port)
	cancel()
	if err != nil {
		k.logf("kubelet port-forward to %s/%s:%d: %v", ns, name, port, err)
		fmt.Fprintf(errs, "connecting to %s/%s port %d: %v", ns, name, port, err)
		data.Close()
		return
	}
	defer up.Close()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(up, data); closeWrite(up); done <- struct{}{} }()
	go func() { _, _ = io.Copy(data, up); data.Close(); done <- struct{}{} }()
	<-done
	<-done
}

func selfSignedServing(name string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
