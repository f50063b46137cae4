package main

import (
	"context"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"kmesh.dev/kmesh/integration/kerneltest"
)

// The README's command as users run it: kmeshctl demo executes the
// simulator found next to it, passes its flags through, and the pods'
// clients (this binary re-executed inside the pods) report back.
func TestPrivilegedKmeshctlDemo(t *testing.T) {
	kerneltest.RequireRoot(t)
	bin := t.TempDir()
	build := exec.Command("go", "build", "-o", bin+"/",
		"kmesh.dev/kmesh/cmd/kmeshctl", "kmesh.dev/kmesh/cmd/kmesh-daemon", "kmesh.dev/kmesh/integration/cmd/kmesh-sim")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, filepath.Join(bin, "kmeshctl"), "demo", "--requests", "60").CombinedOutput()
	if err != nil {
		t.Fatalf("kmeshctl demo: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "Which backends served the 60 requests") {
		t.Errorf("--requests 60 did not reach the simulator:\n%s", out)
	}
	served := regexp.MustCompile(`web-\d\s+on node-\d\s+\d+`).FindAll(out, -1)
	if len(served) != 3 {
		t.Errorf("want three backends reported, got %d:\n%s", len(served), out)
	}
	if !strings.Contains(string(out), "tearing down") {
		t.Errorf("no teardown reported:\n%s", out)
	}
}
