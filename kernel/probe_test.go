package kernel

import (
	"errors"
	"os"
	"strings"
	"testing"
)

func TestCheckNamesMissingFeatures(t *testing.T) {
	fs := []Feature{
		{Name: "helper:set_retval", Required: true, Need: "refusing a VIP", Err: errors.New("not supported")},
		{Name: "map:ringbuf", Required: false, Need: "events", Err: errors.New("not supported")},
		{Name: "map:hash", Required: true, Need: "maps"},
	}
	err := Check(fs)
	var me *MissingError
	if !errors.As(err, &me) || len(me.Missing) != 1 || me.Missing[0].Name != "helper:set_retval" {
		t.Fatalf("Check = %v, want exactly the missing required feature", err)
	}
	if !strings.Contains(err.Error(), "helper:set_retval (needed for refusing a VIP)") {
		t.Fatalf("message does not say what is missing and why: %q", err)
	}
	perm := []Feature{{Name: "prog:x", Required: true, Err: os.ErrPermission}}
	if err := Check(perm); !strings.Contains(err.Error(), "run as root") {
		t.Fatalf("permission failure not explained: %q", err)
	}
	if err := Check(fs[1:]); err != nil {
		t.Fatalf("optional feature missing must not fail: %v", err)
	}
}

// TestPrivilegedProbeThisKernel: the machines Kmesh is tested on must run it.
func TestPrivilegedProbeThisKernel(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("KMESH_REQUIRE_PRIVILEGED") != "" {
			t.Fatal("KMESH_REQUIRE_PRIVILEGED is set but the test runs without root")
		}
		t.Skip("needs root")
	}
	fs := Probe()
	if err := Check(fs); err != nil {
		t.Fatal(err)
	}
	if len(fs) != len(probes) {
		t.Fatalf("%d results for %d probes", len(fs), len(probes))
	}
}
