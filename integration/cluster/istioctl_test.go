package cluster_test

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	"kmesh.dev/kmesh/integration/cluster/bins"
	"kmesh.dev/kmesh/integration/kerneltest"
)

// TestPrivilegedClusterIstioctl: the cached istioctl, built from Kmesh's
// pinned Istio, works against this API server: `x precheck` reads the
// server's version (the stamped kube-apiserver version must be one Istio
// supports), checks install permissions by SelfSubjectAccessReview, the
// Gateway API CRDs and runs its analyzers, and exits 0 with no issue.
// The hook for `istioctl install --set profile=kmesh` (README.md).
func TestPrivilegedClusterIstioctl(t *testing.T) {
	kerneltest.RequireRoot(t)
	cp := controlPlane(t)
	_, paths := binaries(t)
	istioctl := paths[bins.Istioctl]
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	out, err := exec.CommandContext(ctx, istioctl, "version", "--remote=false").CombinedOutput()
	if err != nil {
		t.Fatalf("istioctl version --remote=false: %v\n%s", err, out)
	}
	t.Logf("istioctl version: %s", strings.TrimSpace(string(out)))

	start := time.Now()
	cmd := exec.CommandContext(ctx, istioctl, "x", "precheck", "--kubeconfig", cp.Kubeconfig, "--istioNamespace", "istio-system")
	cmd.Dir = cp.Dir
	out, err = cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("istioctl x precheck against the API server: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "No issues found") {
		t.Fatalf("istioctl x precheck did not report a clean cluster:\n%s", out)
	}
	t.Logf("istioctl x precheck passed in %s", time.Since(start).Round(time.Millisecond))
}
