package tunnel

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"istio.io/istio/pkg/hbone"
	istiolog "istio.io/istio/pkg/log"

	"kmesh.dev/kmesh/ambient/identity"
	"kmesh.dev/kmesh/integration/podnet"
)

// Istio's HBONE implementation (istio.io/istio/pkg/hbone) runs as a pod
// process: its dialer and server open sockets on goroutines of their own,
// which must all live in the pod's namespace, so they get a process there.
func init() {
	podnet.RegisterHelper("istio-hbone-dial", istioHBONEDial)
	podnet.RegisterHelper("istio-hbone-serve", istioHBONEServe)
}

// quietIstio keeps Istio's logging off the helper's stdout (the result).
func quietIstio() {
	for _, sc := range istiolog.Scopes() {
		sc.SetOutputLevel(istiolog.NoneLevel)
	}
}

func certFlags(fs *flag.FlagSet) (cert, key *string) {
	return fs.String("cert", "", "certificate chain PEM"), fs.String("key", "", "private key PEM")
}

// istioHBONEDial: -proxy IP:15008 -target IP:PORT -cert F -key F. Connects
// through Istio's HBONE dialer and returns the first line the target says.
func istioHBONEDial(args []string) (any, error) {
	fs := flag.NewFlagSet("istio-hbone-dial", flag.ContinueOnError)
	proxy := fs.String("proxy", "", "HBONE proxy")
	target := fs.String("target", "", "CONNECT target")
	cert, key := certFlags(fs)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	quietIstio()
	kp, err := tls.LoadX509KeyPair(*cert, *key)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{kp}, NextProtos: []string{"h2"},
		InsecureSkipVerify: true} // Istio's test dialer checks no SPIFFE identity
	d := hbone.NewDialer(hbone.Config{ProxyAddress: *proxy, TLS: cfg})
	c, err := d.Dial("tcp", *target)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil && line == "" {
		return nil, err
	}
	return strings.TrimSpace(line), nil
}

// istioHBONEServe: -listen :15008 -cert F -key F. Runs Istio's HBONE server
// over TLS until killed.
func istioHBONEServe(args []string) (any, error) {
	fs := flag.NewFlagSet("istio-hbone-serve", flag.ContinueOnError)
	listen := fs.String("listen", ":15008", "address")
	cert, key := certFlags(fs)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	quietIstio()
	srv := hbone.NewServer()
	srv.Protocols.SetHTTP2(true)
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return nil, err
	}
	return nil, srv.ServeTLS(l, *cert, *key)
}

// writeCert stores a certificate and its key as PEM files for a helper.
func writeCert(t *testing.T, c *identity.Certificate) (certFile, keyFile string) {
	t.Helper()
	dir := t.TempDir()
	var chain []byte
	for _, der := range c.TLS.Certificate {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(c.TLS.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, chain, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

// startIstioHBONEServer runs Istio's HBONE server in pod on :15008.
func startIstioHBONEServer(t *testing.T, pod *podnet.Pod, c *identity.Certificate) {
	t.Helper()
	cf, kf := writeCert(t, c)
	cmd := exec.Command("/proc/self/exe", "-cert", cf, "-key", kf)
	cmd.Env = append(os.Environ(), podnet.HelperEnv("istio-hbone-serve"))
	cmd.Stderr = os.Stderr
	if err := pod.Start(cmd, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	// Ready when it accepts (probed from inside the pod).
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		err := pod.NS.Do(func() error {
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", 15008), time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("Istio's HBONE server did not start: %v", err)
		}
	}
}
