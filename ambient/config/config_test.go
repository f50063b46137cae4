package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

func TestPrecedence(t *testing.T) {
	file := filepath.Join(t.TempDir(), "kmesh.yaml")
	if err := os.WriteFile(file, []byte("xds_address: from-file:15012\ncluster_id: file-cluster\nmaps:\n  endpoint: 1000\nnode_name: file-node\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"XDS_ADDRESS": "from-env:15012", "NODE_NAME": "env-node", "TERMINATION_GRACE_PERIOD_SECONDS": "30",
		"KMESH_SPLICE_BUDGET": "1048576"}
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	Flags(fs)
	if err := fs.Parse([]string{"--config", file, "--node-name", "flag-node", "--maps-frontend", "77"}); err != nil {
		t.Fatal(err)
	}
	c, err := Load(fs, func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name      string
		got, want any
	}{
		{"env beats file", c.XDSAddress, "from-env:15012"},
		{"file beats default", c.ClusterID, "file-cluster"},
		{"flag beats env", c.NodeName, "flag-node"},
		{"nested from file", c.Maps.Endpoint, uint32(1000)},
		{"nested from flag", c.Maps.Frontend, uint32(77)},
		{"default", c.Maps.Backend, uint32(131072)},
		{"uint64 from env", c.SpliceBudget, uint64(1 << 20)},
		{"CA defaults to xDS", c.CAAddress, "from-env:15012"},
		{"ztunnel's seconds, drained as ztunnel: all but 5 s", c.DrainDuration, 25 * time.Second},
	} {
		if tc.got != tc.want {
			t.Errorf("%s: got %v, want %v", tc.name, tc.got, tc.want)
		}
	}
}

func TestEnvNamesCoverEverySetting(t *testing.T) {
	names := EnvNames()
	if len(names) != len(settings)+len(envOverrides) {
		t.Fatalf("EnvNames has %d names for %d settings and %d overrides", len(names), len(settings), len(envOverrides))
	}
	seen := map[string]bool{}
	for _, n := range names {
		if n == "" || seen[n] {
			t.Errorf("env name %q is empty or repeated", n)
		}
		seen[n] = true
	}
	for _, want := range []string{"XDS_ADDRESS", "KMESH_PIN_ROOT", "TERMINATION_GRACE_PERIOD_SECONDS", "ISTIO_META_CLUSTER_ID"} {
		if !seen[want] {
			t.Errorf("EnvNames lacks %s", want)
		}
	}
}

func TestDrainFor(t *testing.T) {
	for _, tc := range []struct{ grace, drain time.Duration }{
		{30 * time.Second, 25 * time.Second},
		{11 * time.Second, 6 * time.Second},
		{10 * time.Second, 9 * time.Second},
		{2 * time.Second, time.Second},
		{time.Second, time.Second},
		{0, 0},
	} {
		if got := DrainFor(tc.grace); got != tc.drain {
			t.Errorf("DrainFor(%v) = %v, want %v", tc.grace, got, tc.drain)
		}
	}
}

// ztunnel's chart sets ISTIO_META_CLUSTER_ID; ztunnel prefers it to
// CLUSTER_ID, and so does the daemon.
func TestClusterIDFromIstioMeta(t *testing.T) {
	for _, tc := range []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{}, "Kubernetes"},
		{map[string]string{"CLUSTER_ID": "east"}, "east"},
		{map[string]string{"ISTIO_META_CLUSTER_ID": "west"}, "west"},
		{map[string]string{"CLUSTER_ID": "east", "ISTIO_META_CLUSTER_ID": "west"}, "west"},
	} {
		c, err := Load(nil, func(k string) string { return tc.env[k] })
		if err != nil {
			t.Fatal(err)
		}
		if c.ClusterID != tc.want {
			t.Errorf("env %v: cluster %q, want %q", tc.env, c.ClusterID, tc.want)
		}
	}
}

func TestBadGracePeriod(t *testing.T) {
	_, err := Load(nil, func(k string) string { return map[string]string{"TERMINATION_GRACE_PERIOD_SECONDS": "thirty"}[k] })
	if err == nil || !strings.Contains(err.Error(), "TERMINATION_GRACE_PERIOD_SECONDS") {
		t.Fatalf("err %v, want one naming TERMINATION_GRACE_PERIOD_SECONDS", err)
	}
}

// The DNS proxy is switched as ztunnel reads its DNS_CAPTURE metadata
// (ISTIO_META_DNS_CAPTURE): on when unset or "true" in any case; the port
// comes from DNS_PROXY_ADDR; a flag beats the environment.
func TestDNSSettings(t *testing.T) {
	for _, tc := range []struct {
		env   map[string]string
		flags []string
		on    bool
		port  uint16
	}{
		{map[string]string{}, nil, true, 15053},
		{map[string]string{"ISTIO_META_DNS_CAPTURE": "true"}, nil, true, 15053},
		{map[string]string{"ISTIO_META_DNS_CAPTURE": "TRUE"}, nil, true, 15053},
		{map[string]string{"ISTIO_META_DNS_CAPTURE": "false"}, nil, false, 15053},
		{map[string]string{"ISTIO_META_DNS_CAPTURE": "1"}, nil, false, 15053}, // ztunnel: only "true"
		{map[string]string{"ISTIO_META_DNS_CAPTURE": "false"}, []string{"--dns-capture", "true"}, true, 15053},
		{map[string]string{"ISTIO_META_DNS_PROXY_ADDR": "127.0.0.1:15054"}, nil, true, 15054},
		{map[string]string{"ISTIO_META_DNS_PROXY_ADDR": "[::]:15055"}, nil, true, 15055},
	} {
		fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
		Flags(fs)
		if err := fs.Parse(tc.flags); err != nil {
			t.Fatal(err)
		}
		c, err := Load(fs, func(k string) string { return tc.env[k] })
		if err != nil {
			t.Fatal(err)
		}
		port, err := c.DNSPort()
		if c.DNSEnabled() != tc.on || err != nil || port != tc.port {
			t.Errorf("env %v flags %v: on %v port %d (%v), want %v %d", tc.env, tc.flags, c.DNSEnabled(), port, err, tc.on, tc.port)
		}
		if !c.DNSKernelCapture || c.DNSResolvConf != "/etc/resolv.conf" || c.ClusterDomain != "cluster.local" {
			t.Errorf("defaults: %v %q %q", c.DNSKernelCapture, c.DNSResolvConf, c.ClusterDomain)
		}
	}
	c, _ := Load(nil, func(k string) string { return map[string]string{"ISTIO_META_DNS_PROXY_ADDR": "nonsense"}[k] })
	if _, err := c.DNSPort(); err == nil || !strings.Contains(err.Error(), "ISTIO_META_DNS_PROXY_ADDR") {
		t.Fatalf("bad DNS_PROXY_ADDR: %v", err)
	}
}
