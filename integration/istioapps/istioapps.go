// Package istioapps runs Istio's own HBONE implementations as pod
// processes, for interoperability tests: Istio's Go HBONE dialer and server
// (istio.io/istio/pkg/hbone) and Istio's echo app forwarding over HBONE
// (its forwarder's HBONE mode). They are podnet helpers: a test binary that
// imports this package can run them inside a pod (Pod.Helper, Pod.Start,
// or a simulator container whose command is the helper's name). Their
// sockets must all live in the pod's namespace, so they get a process
// there rather than a goroutine in the test.
package istioapps

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"istio.io/istio/pkg/hbone"
	istiolog "istio.io/istio/pkg/log"
	"istio.io/istio/pkg/test/echo/proto"
	"istio.io/istio/pkg/test/echo/server/forwarder"

	"kmesh.dev/kmesh/integration/podnet"
)

// Helper names.
const (
	Dial       = "istio-hbone-dial"
	Serve      = "istio-hbone-serve"
	EchoHBONE  = "istio-echo-forward-hbone"
	serveReady = 5 * time.Second
)

func init() {
	podnet.RegisterHelper(Dial, dial)
	podnet.RegisterHelper(Serve, serve)
	podnet.RegisterHelper(EchoHBONE, echoForward)
}

// quiet keeps Istio's logging off a helper's stdout (its result).
func quiet() {
	for _, sc := range istiolog.Scopes() {
		sc.SetOutputLevel(istiolog.NoneLevel)
	}
}

func certFlags(fs *flag.FlagSet) (cert, key *string) {
	return fs.String("cert", "", "certificate chain PEM"), fs.String("key", "", "private key PEM")
}

// dial: -proxy IP:15008 -target IP:PORT -cert F -key F [-send LINE].
// Connects through Istio's HBONE dialer; sends LINE when given; returns
// what the target says until it closes, goes quiet for a second, or has
// said a line with "Hostname=" (Istio's echo server).
func dial(args []string) (any, error) {
	fs := flag.NewFlagSet(Dial, flag.ContinueOnError)
	proxy := fs.String("proxy", "", "HBONE proxy")
	target := fs.String("target", "", "CONNECT target")
	send := fs.String("send", "", "line to send first")
	cert, key := certFlags(fs)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	quiet()
	kp, err := tls.LoadX509KeyPair(*cert, *key)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{kp}, NextProtos: []string{"h2"},
		InsecureSkipVerify: true} // Istio's test dialer checks no SPIFFE identity either
	c, err := hbone.NewDialer(hbone.Config{ProxyAddress: *proxy, TLS: cfg}).Dial("tcp", *target)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if *send != "" {
		if _, err := c.Write([]byte(*send + "\n")); err != nil {
			return nil, err
		}
	}
	var out []string
	r := bufio.NewReader(c)
	for {
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		line, err := r.ReadString('\n')
		if line = strings.TrimSpace(line); line != "" {
			out = append(out, line)
		}
		if err != nil || strings.Contains(line, "Hostname=") {
			if len(out) == 0 && err != nil {
				return nil, err
			}
			return strings.Join(out, "\n"), nil
		}
	}
}

// serve: -listen :15008 -cert F -key F. Runs Istio's HBONE server over TLS
// until killed; it dials CONNECT targets from this pod.
func serve(args []string) (any, error) {
	fs := flag.NewFlagSet(Serve, flag.ContinueOnError)
	listen := fs.String("listen", ":15008", "address")
	cert, key := certFlags(fs)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	quiet()
	srv := hbone.NewServer()
	srv.Protocols.SetHTTP2(true) // NewServer speaks h2c; over TLS it needs h2 too
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return nil, err
	}
	return nil, srv.ServeTLS(l, *cert, *key)
}

// echoForward: -proxy IP:15008 -url URL -cert F -key F [-count N]. Istio's
// echo app forwarding requests over HBONE (its forwarder with the HBONE
// option, as Istio's own ambient tests drive it); returns its output lines.
func echoForward(args []string) (any, error) {
	fs := flag.NewFlagSet(EchoHBONE, flag.ContinueOnError)
	proxy := fs.String("proxy", "", "HBONE proxy")
	url := fs.String("url", "", "URL to request through it")
	count := fs.Int("count", 1, "requests")
	cert, key := certFlags(fs)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	quiet()
	f := forwarder.New()
	defer f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := f.ForwardEcho(ctx, &forwarder.Config{Request: &proto.ForwardEchoRequest{
		Url: *url, Count: int32(*count), TimeoutMicros: int64(5 * time.Second / time.Microsecond),
		Hbone: &proto.HBONE{Address: *proxy, CertFile: *cert, KeyFile: *key, InsecureSkipVerify: true},
	}})
	if err != nil {
		return nil, err
	}
	return resp.GetOutput(), nil
}

// WriteCert stores a certificate chain and its key as PEM files in dir,
// for the helpers' -cert and -key.
func WriteCert(dir string, c *tls.Certificate) (certFile, keyFile string, err error) {
	if c == nil || len(c.Certificate) == 0 {
		return "", "", errors.New("istioapps: no certificate")
	}
	var chain []byte
	for _, der := range c.Certificate {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		return "", "", err
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, chain, 0o600); err != nil {
		return "", "", err
	}
	return certFile, keyFile, os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600)
}

// WaitListening waits until something accepts on 127.0.0.1:port inside
// pod (a server helper started with Pod.Start).
func WaitListening(pod *podnet.Pod, port string) error {
	deadline := time.Now().Add(serveReady)
	for {
		err := pod.NS.Do(func() error {
			c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}
