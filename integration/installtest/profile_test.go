package installtest

import (
	"encoding/json"
	"net"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"kmesh.dev/kmesh/ambient/config"
	"kmesh.dev/kmesh/integration/installpkg"
)

const (
	ns        = "istio-system"
	ztunnel   = "ztunnel"
	proxyName = "istio-proxy"
)

// notFoundHint is the error istioctl gives for --set profile=kmesh without
// --manifests; profiles/README.md quotes it.
const notFoundHint = `profile "kmesh" not found`

// TestKmeshProfileZtunnelSlot checks that the profile puts Kmesh in
// ztunnel's slot under ztunnel's names (what istioctl ztunnel-config,
// dashboards and istiod's CA_TRUSTED_NODE_ACCOUNTS rely on), with Kmesh's
// image, the args the daemon accepts, BPF/NET_ADMIN/SYS_ADMIN and no more,
// and a surge-first rolling update.
func TestKmeshProfileZtunnelSlot(t *testing.T) {
	ds := renderProfile(t, "kmesh").daemonSet(t, ns, ztunnel)
	pod := &ds.Spec.Template.Spec
	if got := ds.Spec.Template.Labels["app"]; got != "ztunnel" {
		t.Errorf("pod label app = %q, want ztunnel", got)
	}
	if pod.ServiceAccountName != "ztunnel" {
		t.Errorf("service account = %q, want ztunnel (istiod trusts istio-system/ztunnel as node proxy)", pod.ServiceAccountName)
	}
	c := container(t, pod, proxyName)
	if c.Image != installpkg.DefaultImage {
		t.Errorf("image = %q, want %q", c.Image, installpkg.DefaultImage)
	}
	if len(c.Command) != 0 {
		t.Errorf("command = %q: the image's entrypoint (kmesh-daemon) must run", c.Command)
	}
	if want := []string{"proxy", "ztunnel"}; !slices.Equal(c.Args, want) {
		t.Errorf("args = %q, want %q", c.Args, want)
	}

	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Fatal("no securityContext.capabilities")
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Error("container is privileged: Kmesh needs three capabilities, not all of them")
	}
	add := capStrings(sc.Capabilities.Add)
	if want := []string{"BPF", "NET_ADMIN", "SYS_ADMIN"}; !slices.Equal(add, want) {
		t.Errorf("capabilities added = %q, want exactly %q", add, want)
	}
	if drop := capStrings(sc.Capabilities.Drop); !slices.Equal(drop, []string{"ALL"}) {
		t.Errorf("capabilities dropped = %q, want [ALL]", drop)
	}

	us := ds.Spec.UpdateStrategy
	if us.Type != "RollingUpdate" || us.RollingUpdate == nil || us.RollingUpdate.MaxSurge == nil || us.RollingUpdate.MaxUnavailable == nil ||
		us.RollingUpdate.MaxSurge.String() != "1" || us.RollingUpdate.MaxUnavailable.String() != "0" {
		t.Errorf("updateStrategy = %+v, want RollingUpdate maxSurge 1 maxUnavailable 0", us)
	}
}

func capStrings(cs []corev1.Capability) []string {
	var out []string
	for _, c := range cs {
		out = append(out, string(c))
	}
	slices.Sort(out)
	return out
}

// TestKmeshProfileMatchesDaemonConfig resolves the daemon's configuration
// from the environment the rendered container gets (config.Load, as the
// daemon does) and checks every path and port against the pod: pins on the
// host's bpffs, the cgroup on the host's cgroup2, token, root certificate
// and ZDS socket where the chart mounts them, the probe and metrics ports,
// and CLUSTER_ID following the chart's ISTIO_META_CLUSTER_ID.
func TestKmeshProfileMatchesDaemonConfig(t *testing.T) {
	ds := renderProfile(t, "kmesh", "values.global.multiCluster.clusterName=east").daemonSet(t, ns, ztunnel)
	pod := &ds.Spec.Template.Spec
	c := container(t, pod, proxyName)
	env, unresolved := environment(c)
	if len(unresolved) > 0 {
		t.Errorf("$(VAR) references the kubelet would leave unexpanded: %q", unresolved)
	}
	cfg, err := config.Load(nil, func(k string) string { return env[k] })
	if err != nil {
		t.Fatalf("the daemon's configuration from the rendered env: %v", err)
	}

	if cfg.ClusterID != "east" {
		t.Errorf("cluster_id = %q, want east (from values.global.multiCluster.clusterName)", cfg.ClusterID)
	}
	if cfg.XDSAddress != "istiod.istio-system.svc:15012" || cfg.CAAddress != "istiod.istio-system.svc:15012" {
		t.Errorf("xds/ca address = %q/%q, want istiod.istio-system.svc:15012", cfg.XDSAddress, cfg.CAAddress)
	}
	if !strings.HasPrefix(cfg.NodeName, "<") || !strings.HasPrefix(cfg.PodName, "<") || !strings.HasPrefix(cfg.InstanceIP, "<") {
		t.Errorf("node/pod name and instance IP should come from the downward API: %q %q %q", cfg.NodeName, cfg.PodName, cfg.InstanceIP)
	}

	// Pins: a writable hostPath of the host's bpffs.
	m, v := mountFor(t, pod, c, cfg.PinRoot)
	if v.HostPath == nil || v.HostPath.Path != "/sys/fs/bpf" || m.ReadOnly {
		t.Errorf("pin root %s is on volume %+v (mount %+v), want a writable hostPath /sys/fs/bpf", cfg.PinRoot, v.VolumeSource, m)
	}
	// Programs attach to the host's cgroup2 root, not the container's cgroup namespace.
	if cfg.CgroupPath == "" || cfg.CgroupPath == "/sys/fs/cgroup" {
		t.Errorf("cgroup_path = %q: that is the container's cgroup namespace, which holds no pod", cfg.CgroupPath)
	}
	m, v = mountFor(t, pod, c, cfg.CgroupPath)
	if v.HostPath == nil || v.HostPath.Path != "/sys/fs/cgroup" || m.MountPath != cfg.CgroupPath {
		t.Errorf("cgroup path %s is not the mount of hostPath /sys/fs/cgroup (mount %+v, volume %+v)", cfg.CgroupPath, m, v.VolumeSource)
	}
	// Token: the projected service account token for audience istio-ca.
	_, v = mountFor(t, pod, c, cfg.TokenFile)
	if !projectsToken(v, path.Base(cfg.TokenFile), "istio-ca") {
		t.Errorf("token file %s is not a projected istio-ca token (volume %+v)", cfg.TokenFile, v.VolumeSource)
	}
	// Root certificate: istiod's istio-ca-root-cert ConfigMap (key root-cert.pem).
	_, v = mountFor(t, pod, c, cfg.RootCertFile)
	if v.ConfigMap == nil || v.ConfigMap.Name != "istio-ca-root-cert" || path.Base(cfg.RootCertFile) != "root-cert.pem" {
		t.Errorf("root cert %s is not root-cert.pem of ConfigMap istio-ca-root-cert (volume %+v)", cfg.RootCertFile, v.VolumeSource)
	}
	// ZDS: istio-cni's socket directory on the host.
	_, v = mountFor(t, pod, c, cfg.ZDSSocket)
	if v.HostPath == nil || v.HostPath.Path != path.Dir(cfg.ZDSSocket) {
		t.Errorf("ZDS socket %s is not in the hostPath istio-cni serves (volume %+v)", cfg.ZDSSocket, v.VolumeSource)
	}
	// Ports the chart probes and scrapes.
	if p := c.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Port.IntValue() != port(t, cfg.ReadinessAddr) || p.HTTPGet.Path != "/healthz/ready" {
		t.Errorf("readiness probe %+v does not match the daemon's readiness_addr %s", p, cfg.ReadinessAddr)
	}
	if !slices.ContainsFunc(c.Ports, func(p corev1.ContainerPort) bool { return int(p.ContainerPort) == port(t, cfg.StatsAddr) }) {
		t.Errorf("container ports %+v do not include the daemon's stats port %s", c.Ports, cfg.StatsAddr)
	}
}

// mountFor returns the container's mount that holds p (the longest mount
// path that is p or a parent of it) and its volume.
func mountFor(t *testing.T, pod *corev1.PodSpec, c *corev1.Container, p string) (corev1.VolumeMount, corev1.Volume) {
	t.Helper()
	var best corev1.VolumeMount
	for _, m := range c.VolumeMounts {
		mp := strings.TrimSuffix(m.MountPath, "/")
		if (p == mp || strings.HasPrefix(p, mp+"/")) && len(mp) > len(best.MountPath) {
			best = m
		}
	}
	if best.Name == "" {
		t.Fatalf("%s is on no volume: the container's root file system is read-only and not the host's", p)
	}
	for _, v := range pod.Volumes {
		if v.Name == best.Name {
			return best, v
		}
	}
	t.Fatalf("mount %s names no volume %q", best.MountPath, best.Name)
	return best, corev1.Volume{}
}

func projectsToken(v corev1.Volume, file, audience string) bool {
	if v.Projected == nil {
		return false
	}
	for _, s := range v.Projected.Sources {
		if s.ServiceAccountToken != nil && s.ServiceAccountToken.Path == file && s.ServiceAccountToken.Audience == audience {
			return true
		}
	}
	return false
}

func port(t *testing.T, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("address %q: %v", addr, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("address %q: %v", addr, err)
	}
	return n
}

// TestKmeshProfileEnvAreDaemonSettings fails when the container sets a
// KMESH_* variable the daemon does not read (a typo, or a setting renamed
// in ambient/config): the daemon would silently run with its default.
func TestKmeshProfileEnvAreDaemonSettings(t *testing.T) {
	c := container(t, &renderProfile(t, "kmesh").daemonSet(t, ns, ztunnel).Spec.Template.Spec, proxyName)
	known := config.EnvNames()
	n := 0
	for _, e := range c.Env {
		if !strings.HasPrefix(e.Name, "KMESH_") {
			continue
		}
		n++
		if !slices.Contains(known, e.Name) {
			t.Errorf("the container sets %s, which is no daemon setting (ambient/config: %q)", e.Name, known)
		}
	}
	if n == 0 {
		t.Error("the container sets no KMESH_ variable: the profile's env did not reach the DaemonSet")
	}
}

// TestEnvNames checks config.EnvNames: one name per setting, none empty or
// repeated, and the ones the profile relies on present.
func TestEnvNames(t *testing.T) {
	names := config.EnvNames()
	seen := map[string]bool{}
	for _, n := range names {
		if n == "" || seen[n] {
			t.Errorf("env name %q is empty or repeated in %q", n, names)
		}
		seen[n] = true
	}
	for _, want := range []string{"KMESH_CGROUP_PATH", "KMESH_PIN_ROOT", "CLUSTER_ID", "XDS_ADDRESS", "KMESH_TOKEN_FILE", "XDS_ROOT_CA"} {
		if !seen[want] {
			t.Errorf("EnvNames() lacks %s", want)
		}
	}
}

// TestKmeshProfileKeepsAmbient renders Istio's ambient profile and Kmesh's
// from the same install package: the same objects, all identical except
// DaemonSet ztunnel, so istiod, istio-cni and the rest are ambient's (this
// fails if Istio's ambient profile changes and kmesh.yaml is not updated).
func TestKmeshProfileKeepsAmbient(t *testing.T) {
	kmesh := renderProfile(t, "kmesh")
	ambient := renderProfile(t, "ambient")
	for _, want := range []string{"Deployment/istio-system/istiod", "DaemonSet/istio-system/istio-cni-node", "DaemonSet/istio-system/ztunnel"} {
		if _, ok := kmesh[want]; !ok {
			t.Errorf("kmesh profile renders no %s", want)
		}
	}
	for k, a := range ambient {
		km, ok := kmesh[k]
		switch {
		case !ok:
			t.Errorf("ambient renders %s, kmesh does not", k)
		case k == "DaemonSet/istio-system/ztunnel":
		case k == "ConfigMap/istio-system/values":
			// istiod's record of the Helm values: only values.ztunnel may differ.
			if !equality.Semantic.DeepEqual(withoutZtunnelValues(t, a), withoutZtunnelValues(t, km)) {
				t.Errorf("%s differs from ambient's outside values.ztunnel", k)
			}
		case !equality.Semantic.DeepEqual(a.Object, km.Object):
			t.Errorf("%s differs from ambient's", k)
		}
	}
	for k := range kmesh {
		if _, ok := ambient[k]; !ok {
			t.Errorf("kmesh renders %s, ambient does not", k)
		}
	}
	// Within DaemonSet ztunnel, only the pod template and update strategy change.
	a, k := ambient.daemonSet(t, ns, ztunnel), kmesh.daemonSet(t, ns, ztunnel)
	if !reflect.DeepEqual(a.ObjectMeta, k.ObjectMeta) || !reflect.DeepEqual(a.Spec.Selector, k.Spec.Selector) ||
		!reflect.DeepEqual(a.Spec.Template.ObjectMeta, k.Spec.Template.ObjectMeta) {
		t.Error("DaemonSet ztunnel's metadata, selector or pod labels differ from ambient's")
	}
}

// withoutZtunnelValues decodes the JSON documents of istiod's values
// ConfigMap and drops their ztunnel section.
func withoutZtunnelValues(t *testing.T, cm *unstructured.Unstructured) map[string]any {
	t.Helper()
	data, _, _ := unstructured.NestedStringMap(cm.Object, "data")
	if len(data) == 0 {
		t.Fatal("values ConfigMap has no data")
	}
	out := map[string]any{}
	for k, v := range data {
		var m map[string]any
		if err := json.Unmarshal([]byte(v), &m); err != nil {
			t.Fatalf("values ConfigMap %s: %v", k, err)
		}
		delete(m, "ztunnel")
		out[k] = m
	}
	return out
}

// TestKmeshProfileImageOverride checks the override profiles/README.md
// documents.
func TestKmeshProfileImageOverride(t *testing.T) {
	const img = "example.com/kmesh:dev"
	c := container(t, &renderProfile(t, "kmesh", "values.ztunnel.image="+img).daemonSet(t, ns, ztunnel).Spec.Template.Spec, proxyName)
	if c.Image != img {
		t.Errorf("image = %q, want %q", c.Image, img)
	}
}

// TestKmeshProfileNeedsManifests: istioctl's built-in install package has
// no kmesh profile; the error is the one profiles/README.md explains.
func TestKmeshProfileNeedsManifests(t *testing.T) {
	_, err := renderSets("profile=kmesh")
	if err == nil {
		t.Fatal("profile=kmesh rendered without --manifests")
	}
	if !strings.Contains(err.Error(), notFoundHint) {
		t.Errorf("error %q does not say %q", err, notFoundHint)
	}
	readme, rerr := os.ReadFile(filepath.Join(repo, "profiles", "README.md"))
	if rerr != nil {
		t.Fatal(rerr)
	}
	if !strings.Contains(string(readme), notFoundHint) {
		t.Errorf("profiles/README.md does not explain the error %q", notFoundHint)
	}
}

// TestAssembleImageFlag checks `make manifests IMAGE=...`: the assembled
// profile names the given image.
func TestAssembleImageFlag(t *testing.T) {
	istio, err := installpkg.IstioManifestsDir(repo)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "m")
	const img = "registry.example.com/kmesh:v9"
	if _, err := installpkg.Assemble(installpkg.Options{IstioManifests: istio, Profiles: filepath.Join(repo, "profiles"), Out: out, Image: img}); err != nil {
		t.Fatal(err)
	}
	objs, err := renderSets("installPackagePath="+out, "profile=kmesh")
	if err != nil {
		t.Fatal(err)
	}
	if c := container(t, &objs.daemonSet(t, ns, ztunnel).Spec.Template.Spec, proxyName); c.Image != img {
		t.Errorf("image = %q, want %q", c.Image, img)
	}
	// A second run replaces the package; a directory that is not one is kept.
	if _, err := installpkg.Assemble(installpkg.Options{IstioManifests: istio, Profiles: filepath.Join(repo, "profiles"), Out: out}); err != nil {
		t.Errorf("re-assembling over a package: %v", err)
	}
	other := t.TempDir()
	if err := os.WriteFile(filepath.Join(other, "precious"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := installpkg.Assemble(installpkg.Options{IstioManifests: istio, Profiles: filepath.Join(repo, "profiles"), Out: other}); err == nil {
		t.Error("Assemble replaced a directory that is not an install package")
	}
	if _, err := os.Stat(filepath.Join(other, "precious")); err != nil {
		t.Errorf("Assemble removed a file it does not own: %v", err)
	}
}
