package config

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

func TestPrecedence(t *testing.T) {
	file := filepath.Join(t.TempDir(), "kmesh.yaml")
	if err := os.WriteFile(file, []byte("xds_address: from-file:15012\ncluster_id: file-cluster\nmaps:\n  endpoint: 1000\nnode_name: file-node\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"XDS_ADDRESS": "from-env:15012", "NODE_NAME": "env-node", "TERMINATION_GRACE_PERIOD_SECONDS": "30"}
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
		{"CA defaults to xDS", c.CAAddress, "from-env:15012"},
		{"ztunnel's seconds", c.DrainDuration, 30 * time.Second},
	} {
		if tc.got != tc.want {
			t.Errorf("%s: got %v, want %v", tc.name, tc.got, tc.want)
		}
	}
}

func TestEnvNamesCoverEverySetting(t *testing.T) {
	names := EnvNames()
	if len(names) != len(settings) {
		t.Fatalf("EnvNames has %d names for %d settings", len(names), len(settings))
	}
	seen := map[string]bool{}
	for _, n := range names {
		if n == "" || seen[n] {
			t.Errorf("env name %q is empty or repeated", n)
		}
		seen[n] = true
	}
	for _, want := range []string{"XDS_ADDRESS", "KMESH_PIN_ROOT", "TERMINATION_GRACE_PERIOD_SECONDS"} {
		if !seen[want] {
			t.Errorf("EnvNames lacks %s", want)
		}
	}
}
