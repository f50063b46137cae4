package charttest

import (
	corev1 "k8s.io/api/core/v1"

	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"helm.sh/helm/v4/pkg/chart/common"
	"helm.sh/helm/v4/pkg/chart/common/util"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	"helm.sh/helm/v4/pkg/engine"
)

// ztunnelOnly are the variables Istio's ztunnel chart sets that this chart
// does not, each with the reason.
var ztunnelOnly = map[string]string{
	"RUST_LOG":                     "ztunnel's log filter; the daemon's is KMESH_LOG_LEVEL, from the same logLevel value",
	"RUST_BACKTRACE":               "Rust runtime",
	"ISTIO_META_CLUSTER_ID":        "the daemon reads it too (over CLUSTER_ID, as ztunnel does); this chart sets CLUSTER_ID from the same multiCluster.clusterName",
	"INPOD_ENABLED":                "ztunnel's switch for in-pod mode; the daemon always works in the pods' namespaces (ZDS)",
	"SERVICE_ACCOUNT":              "ztunnel's own service account; the daemon's identity towards istiod is its token's",
	"ZTUNNEL_CPU_LIMIT":            "ztunnel sizes its worker threads from it; the daemon's are ZTUNNEL_WORKER_THREADS (default 2, settable with env)",
	"ZTUNNEL_RESOURCE_CPU_REQUEST": "same as ZTUNNEL_CPU_LIMIT",
	"ZTUNNEL_RESOURCE_CPU_LIMIT":   "same as ZTUNNEL_CPU_LIMIT",
}

// istioChart is Istio's ztunnel chart in the module cache: the chart this
// one stands in for, at the Istio version the module builds against.
func istioChart(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/istio").Output()
	dir := strings.TrimSpace(string(out))
	if err != nil || dir == "" {
		t.Fatalf("locating istio.io/istio in the module cache (go mod download istio.io/istio): %v", err)
	}
	return filepath.Join(dir, "manifests", "charts", "ztunnel")
}

// TestMatchesIstioZtunnelChart renders Istio's ztunnel chart and this one
// with the same values and checks that what Istio's tooling and istio-cni
// rely on is the same: names, selector, container, args, the paths mounted,
// the readiness probe and metrics port, the update strategy; and that every
// variable ztunnel's chart sets is set here too or has a reason not to be.
func TestMatchesIstioZtunnelChart(t *testing.T) {
	c, err := loader.Load(istioChart(t))
	if err != nil {
		t.Fatalf("loading Istio's ztunnel chart: %v", err)
	}
	const values = "network: net-1\nrevision: canary\n"
	vals := map[string]any{"network": "net-1", "revision": "canary"}
	top, err := util.ToRenderValues(c, vals, common.ReleaseOptions{Name: releaseName, Namespace: namespace, IsInstall: true, Revision: 1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	files, err := engine.Render(c, top)
	if err != nil {
		t.Fatalf("rendering Istio's ztunnel chart: %v", err)
	}
	zt := decode(t, files)
	km := mustRender(t, values)

	if zt.ds.Name != km.ds.Name || zt.sa.Name != km.sa.Name || zt.ds.Namespace != km.ds.Namespace {
		t.Errorf("names: ztunnel %s/%s SA %s, kmesh %s/%s SA %s", zt.ds.Namespace, zt.ds.Name, zt.sa.Name, km.ds.Namespace, km.ds.Name, km.sa.Name)
	}
	if !slices.Equal(mapPairs(zt.ds.Spec.Selector.MatchLabels), mapPairs(km.ds.Spec.Selector.MatchLabels)) {
		t.Errorf("selector: ztunnel %v, kmesh %v (immutable: an in-place upgrade would fail)", zt.ds.Spec.Selector.MatchLabels, km.ds.Spec.Selector.MatchLabels)
	}
	for k, v := range zt.ds.Spec.Template.Labels {
		if strings.HasPrefix(k, "app.kubernetes.io/") && k != "app.kubernetes.io/name" || k == "helm.sh/chart" {
			continue // part-of, version, chart: say which product it is
		}
		if km.ds.Spec.Template.Labels[k] != v {
			t.Errorf("pod label %s: ztunnel %q, kmesh %q", k, v, km.ds.Spec.Template.Labels[k])
		}
	}
	zc, kc := zt.proxy(t), km.proxy(t)
	if zc.Name != kc.Name || !slices.Equal(zc.Args, kc.Args) {
		t.Errorf("container: ztunnel %s %q, kmesh %s %q", zc.Name, zc.Args, kc.Name, kc.Args)
	}
	kmounts := map[string]bool{}
	for _, m := range kc.VolumeMounts {
		kmounts[m.MountPath] = true
	}
	for _, m := range zc.VolumeMounts {
		if !kmounts[m.MountPath] {
			t.Errorf("ztunnel mounts %s (%s), kmesh does not", m.MountPath, m.Name)
		}
	}
	if zp, kp := zc.ReadinessProbe.HTTPGet, kc.ReadinessProbe.HTTPGet; zp.Path != kp.Path || zp.Port != kp.Port {
		t.Errorf("readiness: ztunnel %s %s, kmesh %s %s", zp.Port.String(), zp.Path, kp.Port.String(), kp.Path)
	}
	for _, zport := range zc.Ports {
		if !slices.ContainsFunc(kc.Ports, func(p corev1.ContainerPort) bool {
			return p.ContainerPort == zport.ContainerPort && p.Name == zport.Name
		}) {
			t.Errorf("ztunnel declares port %d %s, kmesh does not", zport.ContainerPort, zport.Name)
		}
	}
	if zs, ks := zt.ds.Spec.UpdateStrategy, km.ds.Spec.UpdateStrategy; zs.String() != ks.String() {
		t.Errorf("update strategy: ztunnel %s, kmesh %s", zs.String(), ks.String())
	}
	zg, kg := zt.ds.Spec.Template.Spec, km.ds.Spec.Template.Spec
	if *zg.TerminationGracePeriodSeconds != *kg.TerminationGracePeriodSeconds || zg.PriorityClassName != kg.PriorityClassName {
		t.Errorf("grace %d / %d, priority %q / %q", *zg.TerminationGracePeriodSeconds, *kg.TerminationGracePeriodSeconds, zg.PriorityClassName, kg.PriorityClassName)
	}

	zenv, kenv := envOf(t, zc), envOf(t, kc)
	for name, zv := range zenv {
		kv, ok := kenv[name]
		switch {
		case ztunnelOnly[name] != "":
			if ok {
				t.Errorf("%s is listed as ztunnel-only but kmesh sets it: drop it from ztunnelOnly", name)
			}
		case !ok:
			t.Errorf("ztunnel's chart sets %s=%+v; kmesh neither sets it nor says why not (ztunnelOnly)", name, zv)
		case kv != zv:
			t.Errorf("%s: ztunnel %+v, kmesh %+v", name, zv, kv)
		}
	}
}

func mapPairs(m map[string]string) []string {
	var s []string
	for k, v := range m {
		s = append(s, k+"="+v)
	}
	slices.Sort(s)
	return s
}
