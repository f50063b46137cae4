package bench

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"kmesh.dev/kmesh/integration/sim"
)

// The user-space anchor: haproxy 2.6 (one thread each) next to each end,
// client side in the client pod on the client's CPU, server side in the
// server pod on the server's CPU, as sidecars or per-node proxies sit.
// Per port, client side listens on 15000+port (TCP) and 25000+port (TLS),
// server side on 16000+port and 26000+port.

func clientPort(tls bool, p int) int {
	if tls {
		return 25000 + p%1000*10 + p/1000
	}
	return 15000 + p%1000*10 + p/1000
}

func serverPort(tls bool, p int) int { return clientPort(tls, p) + 1000 }

func haproxyHeader() string {
	return `global
    nbthread 1
    maxconn 8000
    tune.ssl.default-dh-param 2048
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
`
}

func clientConfig(serverIP, dir string) string {
	var b strings.Builder
	b.WriteString(haproxyHeader())
	for _, tls := range []bool{false, true} {
		for _, p := range ports {
			opts := "send-proxy-v2"
			if tls {
				opts += fmt.Sprintf(" ssl verify required ca-file %s/ca.pem crt %s/client.pem ssl-min-ver TLSv1.3 sni str(server.bench)", dir, dir)
			}
			fmt.Fprintf(&b, "frontend c%d_%v\n    bind 127.0.0.1:%d\n    default_backend s%d_%v\n", p, tls, clientPort(tls, p), p, tls)
			fmt.Fprintf(&b, "backend s%d_%v\n    server s %s:%d %s\n", p, tls, serverIP, serverPort(tls, p), opts)
		}
	}
	return b.String()
}

func serverConfig(dir string) string {
	var b strings.Builder
	b.WriteString(haproxyHeader())
	for _, tls := range []bool{false, true} {
		for _, p := range ports {
			opts := "accept-proxy"
			if tls {
				opts += fmt.Sprintf(" ssl crt %s/server.pem ca-file %s/ca.pem verify required ssl-min-ver TLSv1.3", dir, dir)
			}
			fmt.Fprintf(&b, "frontend p%d_%v\n    bind :%d %s\n    default_backend l%d_%v\n", p, tls, serverPort(tls, p), opts, p, tls)
			fmt.Fprintf(&b, "backend l%d_%v\n    server l 127.0.0.1:%d\n", p, tls, p)
		}
	}
	return b.String()
}

func (e *Env) startProxies(client *sim.Pod, tcpArm, tlsArm *Arm, serverIP string) error {
	if err := writeCerts(e.dir); err != nil {
		return err
	}
	cc, sc := filepath.Join(e.dir, "client.cfg"), filepath.Join(e.dir, "server.cfg")
	if err := os.WriteFile(cc, []byte(clientConfig(serverIP, e.dir)), 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(sc, []byte(serverConfig(e.dir)), 0o600); err != nil {
		return err
	}
	start := func(p *sim.Pod, cpu int, cfg string) (int, error) {
		cmd := exec.Command("taskset", "-c", fmt.Sprint(cpu), "haproxy", "-db", "-f", cfg)
		logf, err := os.Create(cfg + ".log")
		if err != nil {
			return 0, err
		}
		defer logf.Close()
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := p.Start(cmd); err != nil {
			return 0, err
		}
		return cmd.Process.Pid, nil
	}
	cpid, err := start(client, 0, cc)
	if err != nil {
		return err
	}
	spid, err := start(e.server, 1, sc)
	if err != nil {
		return err
	}
	tcpArm.proxies = []int{cpid, spid}
	tlsArm.proxies = []int{cpid, spid}
	for _, a := range []struct {
		vip string
		tls bool
	}{{vipProxy, false}, {vipProxyTLS, true}} {
		for _, p := range ports {
			if err := e.iptables(client, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", a.vip, "--dport", fmt.Sprint(p),
				"-j", "REDIRECT", "--to-ports", fmt.Sprint(clientPort(a.tls, p))); err != nil {
				return err
			}
		}
	}
	return nil
}

// writeCerts makes a CA and ECDSA P-256 server and client certificates, as
// the mesh's identities would be.
func writeCerts(dir string) error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "bench-ca"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(48 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	ca, _ := x509.ParseCertificate(caDER)
	if err := os.WriteFile(filepath.Join(dir, "ca.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o600); err != nil {
		return err
	}
	for i, name := range []string{"server", "client"} {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(i + 2)), Subject: pkix.Name{CommonName: name + ".bench"},
			DNSNames: []string{name + ".bench"}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(48 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return err
		}
		kb, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			return err
		}
		pemBytes := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})...)
		if err := os.WriteFile(filepath.Join(dir, name+".pem"), pemBytes, 0o600); err != nil {
			return err
		}
	}
	return nil
}
