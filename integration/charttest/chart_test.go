package charttest

import (
	"os"
	"path"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"

	"helm.sh/helm/v4/pkg/chart/v2/lint"
	"helm.sh/helm/v4/pkg/chart/v2/lint/support"

	"kmesh.dev/kmesh/ambient/config"
)

// TestLint is `helm lint --strict` on the chart (what action.Lint runs,
// without the action package, which would link Helm's storage and registry
// clients): templates parse, Chart.yaml is complete, the default values meet
// the schema, the rendered objects are YAML. Warnings fail too.
func TestLint(t *testing.T) {
	linter := lint.RunAll(chartDir(t), nil, namespace)
	for _, m := range linter.Messages {
		t.Logf("lint: %s", m.Error())
		if m.Severity >= support.WarningSev {
			t.Errorf("helm lint --strict: %s", m.Error())
		}
	}
}

// envVar is what one variable of the container holds: a value, or the
// pod field it comes from.
type envVar struct{ value, field string }

func envOf(t testing.TB, c *corev1.Container) map[string]envVar {
	t.Helper()
	m := map[string]envVar{}
	for _, e := range c.Env {
		if _, dup := m[e.Name]; dup {
			t.Errorf("env %s set twice", e.Name)
		}
		v := envVar{value: e.Value}
		if e.ValueFrom != nil {
			switch f := e.ValueFrom; {
			case f.FieldRef != nil:
				v.field = f.FieldRef.FieldPath
			case f.ResourceFieldRef != nil:
				v.field = "resource " + f.ResourceFieldRef.Resource
			default:
				t.Errorf("env %s: only values and field references expected, got %+v", e.Name, e)
				continue
			}
		}
		m[e.Name] = v
	}
	return m
}

// mountOf returns the container's mount of the named volume and the volume.
func mountOf(t testing.TB, o objects, volume string) (corev1.VolumeMount, corev1.Volume) {
	t.Helper()
	var vm *corev1.VolumeMount
	for i, m := range o.proxy(t).VolumeMounts {
		if m.Name == volume {
			vm = &o.proxy(t).VolumeMounts[i]
		}
	}
	for _, v := range o.ds.Spec.Template.Spec.Volumes {
		if v.Name == volume && vm != nil {
			return *vm, v
		}
	}
	t.Fatalf("no volume %q mounted in the container", volume)
	return corev1.VolumeMount{}, corev1.Volume{}
}

// under reports whether p is dir or lies below it.
func under(p, dir string) bool {
	return p == dir || strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/")
}

// daemonConfig is the configuration the daemon resolves from the rendered
// environment, as kmesh-daemon does it (config.Load), with the pod's fields
// filled in as the kubelet would.
func daemonConfig(t testing.TB, env map[string]envVar) *config.Config {
	t.Helper()
	fields := map[string]string{"metadata.name": "ztunnel-abcde", "metadata.namespace": namespace,
		"spec.nodeName": "node-1", "status.podIP": "10.244.0.7"}
	cfg, err := config.Load(nil, func(k string) string {
		v, ok := env[k]
		if !ok {
			return ""
		}
		if v.field != "" {
			return fields[v.field]
		}
		return v.value
	})
	if err != nil {
		t.Fatalf("the daemon refuses the chart's environment: %v", err)
	}
	return cfg
}

// TestDefaults checks every item of the drop-in contract on the default
// rendering (`helm install ztunnel manifests/charts/kmesh -n istio-system`).
func TestDefaults(t *testing.T) {
	o := mustRender(t, "")
	ds, sa, pod := o.ds, o.sa, &o.ds.Spec.Template.Spec
	c := o.proxy(t)

	// Names Istio's tooling looks for.
	if ds.Name != "ztunnel" || ds.Namespace != namespace || sa.Name != "ztunnel" || sa.Namespace != namespace {
		t.Errorf("DaemonSet %s/%s, ServiceAccount %s/%s; want istio-system/ztunnel for both", ds.Namespace, ds.Name, sa.Namespace, sa.Name)
	}
	if pod.ServiceAccountName != sa.Name {
		t.Errorf("pod runs as %q, not the chart's ServiceAccount %q", pod.ServiceAccountName, sa.Name)
	}
	wantLabels := map[string]string{"app": "ztunnel", "app.kubernetes.io/name": "ztunnel", "app.kubernetes.io/part-of": "kmesh"}
	for what, labels := range map[string]map[string]string{"DaemonSet": ds.Labels, "ServiceAccount": sa.Labels, "pod": ds.Spec.Template.Labels} {
		for k, v := range wantLabels {
			if labels[k] != v {
				t.Errorf("%s label %s = %q, want %q", what, k, labels[k], v)
			}
		}
	}
	// The selector is ztunnel's, so an istio/ztunnel release upgrades in place.
	if got := ds.Spec.Selector.MatchLabels; !reflect.DeepEqual(got, map[string]string{"app": "ztunnel"}) || len(ds.Spec.Selector.MatchExpressions) > 0 {
		t.Errorf("selector %v, want ztunnel's {app: ztunnel}", ds.Spec.Selector)
	}
	if l := ds.Spec.Template.Labels; l["istio.io/dataplane-mode"] != "none" || l["sidecar.istio.io/inject"] != "false" {
		t.Errorf("the daemon's pod must stay out of the mesh: labels %v", l)
	}

	// The container.
	if c.Name != "istio-proxy" {
		t.Errorf("container %q, want istio-proxy", c.Name)
	}
	if c.Image != "localhost:5000/kmesh:latest" {
		t.Errorf("image %q, want {{hub}}/kmesh:{{tag}} = localhost:5000/kmesh:latest", c.Image)
	}
	if len(c.Command) != 0 || !slices.Equal(c.Args, []string{"proxy", "ztunnel"}) {
		t.Errorf("command %q args %q; want the image's entrypoint with args [proxy ztunnel]", c.Command, c.Args)
	}

	// Environment: exactly these, from exactly these sources.
	env := envOf(t, c)
	want := map[string]envVar{
		"CLUSTER_ID":                       {value: "Kubernetes"},
		"XDS_ADDRESS":                      {value: "istiod.istio-system.svc:15012"},
		"CA_ADDRESS":                       {value: "istiod.istio-system.svc:15012"},
		"TRUST_DOMAIN":                     {value: "cluster.local"},
		"KMESH_LOG_LEVEL":                  {value: "info"},
		"TERMINATION_GRACE_PERIOD_SECONDS": {value: "30"},
		"XDS_ROOT_CA":                      {value: "/var/run/secrets/istio/root-cert.pem"},
		"KMESH_TOKEN_FILE":                 {value: "/var/run/secrets/tokens/istio-token"},
		"KMESH_ZDS_SOCKET":                 {value: "/var/run/ztunnel/ztunnel.sock"},
		"KMESH_PIN_ROOT":                   {value: "/run/kmesh/bpffs/kmesh"},
		"KMESH_CGROUP_PATH":                {value: "/run/kmesh/cgroup"},
		"KMESH_LISTENER_HOLDER":            {value: "/var/run/kmesh-holder/holder.sock"},
		"KMESH_REMOVE_WHEN_IDLE":           {value: "true"},
		"POD_NAME":                         {field: "metadata.name"},
		"POD_NAMESPACE":                    {field: "metadata.namespace"},
		"NODE_NAME":                        {field: "spec.nodeName"},
		"INSTANCE_IP":                      {field: "status.podIP"},
	}
	if !reflect.DeepEqual(env, want) {
		for k, v := range want {
			if env[k] != v {
				t.Errorf("env %s = %+v, want %+v", k, env[k], v)
			}
		}
		for k, v := range env {
			if _, ok := want[k]; !ok {
				t.Errorf("unexpected env %s = %+v", k, v)
			}
		}
	}

	// Mounts, each consistent with the setting that points into it.
	cfg := daemonConfig(t, env)
	if got := len(c.VolumeMounts); got != 7 || len(pod.Volumes) != 7 {
		t.Errorf("%d mounts and %d volumes, want 7 each (bpffs, cgroup, ZDS, token, root cert, tmp, listener holder)", got, len(pod.Volumes))
	}
	m, v := mountOf(t, o, "bpffs")
	if v.HostPath == nil || v.HostPath.Path != "/sys/fs/bpf" || v.HostPath.Type == nil || *v.HostPath.Type != corev1.HostPathDirectory {
		t.Errorf("bpffs volume %+v, want hostPath /sys/fs/bpf of type Directory", v.VolumeSource)
	}
	if m.ReadOnly || !under(cfg.PinRoot, m.MountPath) || under(m.MountPath, "/sys") {
		t.Errorf("bpffs at %s (read-only %v), pin root %s: want the pin root under a writable mount outside /sys", m.MountPath, m.ReadOnly, cfg.PinRoot)
	}
	m, v = mountOf(t, o, "cgroup")
	if v.HostPath == nil || v.HostPath.Path != "/sys/fs/cgroup" || v.HostPath.Type == nil || *v.HostPath.Type != corev1.HostPathDirectory {
		t.Errorf("cgroup volume %+v, want hostPath /sys/fs/cgroup of type Directory", v.VolumeSource)
	}
	if !m.ReadOnly || cfg.CgroupPath != m.MountPath {
		t.Errorf("cgroup at %s (read-only %v), daemon attaches at %s: want the host's root, read-only", m.MountPath, m.ReadOnly, cfg.CgroupPath)
	}
	m, v = mountOf(t, o, "cni-ztunnel-sock-dir")
	if v.HostPath == nil || v.HostPath.Path != "/var/run/ztunnel" || m.MountPath != "/var/run/ztunnel" || path.Dir(cfg.ZDSSocket) != m.MountPath {
		t.Errorf("ZDS directory %+v at %s, socket %s: want the host's /var/run/ztunnel", v.VolumeSource, m.MountPath, cfg.ZDSSocket)
	}
	m, v = mountOf(t, o, "istio-token")
	if p := v.Projected; p == nil || len(p.Sources) != 1 || p.Sources[0].ServiceAccountToken == nil {
		t.Errorf("istio-token volume %+v, want one projected service account token", v.VolumeSource)
	} else if tok := p.Sources[0].ServiceAccountToken; tok.Audience != "istio-ca" || tok.ExpirationSeconds == nil || *tok.ExpirationSeconds != 43200 ||
		m.MountPath != "/var/run/secrets/tokens" || cfg.TokenFile != path.Join(m.MountPath, tok.Path) {
		t.Errorf("token %+v at %s, daemon reads %s; want audience istio-ca, 43200 s, read from the mount", tok, m.MountPath, cfg.TokenFile)
	}
	m, v = mountOf(t, o, "istiod-ca-cert")
	if v.ConfigMap == nil || v.ConfigMap.Name != "istio-ca-root-cert" || m.MountPath != "/var/run/secrets/istio" ||
		cfg.RootCertFile != path.Join(m.MountPath, "root-cert.pem") {
		t.Errorf("root cert %+v at %s, daemon reads %s; want ConfigMap istio-ca-root-cert at /var/run/secrets/istio", v.VolumeSource, m.MountPath, cfg.RootCertFile)
	}
	if m, v = mountOf(t, o, "tmp"); v.EmptyDir == nil || m.MountPath != "/tmp" {
		t.Errorf("tmp %+v at %s, want an emptyDir at /tmp", v.VolumeSource, m.MountPath)
	}
	for _, v := range pod.Volumes {
		if strings.HasPrefix(v.Name, "cni-") && v.Name != "cni-ztunnel-sock-dir" {
			t.Errorf("CNI volume %s mounted while cni.enabled is false", v.Name)
		}
	}

	// What the daemon makes of the rest of its environment.
	for _, tc := range []struct {
		name      string
		got, want any
	}{
		{"xDS address", cfg.XDSAddress, "istiod.istio-system.svc:15012"},
		{"CA address", cfg.CAAddress, "istiod.istio-system.svc:15012"},
		{"cluster", cfg.ClusterID, "Kubernetes"},
		{"trust domain", cfg.TrustDomain, "cluster.local"},
		{"node", cfg.NodeName, "node-1"},
		{"pod", cfg.PodName + "." + cfg.PodNamespace, "ztunnel-abcde.istio-system"},
		{"instance IP", cfg.InstanceIP, "10.244.0.7"},
		{"log level", cfg.LogLevel, "info"},
	} {
		if tc.got != tc.want {
			t.Errorf("daemon's %s = %v, want %v", tc.name, tc.got, tc.want)
		}
	}

	// Least privilege.
	sc := c.SecurityContext
	if sc == nil || sc.Privileged == nil || *sc.Privileged || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
		sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem || sc.RunAsUser == nil || *sc.RunAsUser != 0 {
		t.Errorf("security context %+v: want not privileged, no privilege escalation, read-only root, uid 0", sc)
	}
	if sc != nil && sc.Capabilities != nil {
		if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
			t.Errorf("capabilities dropped %v, want [ALL]", sc.Capabilities.Drop)
		}
		add := slices.Clone(sc.Capabilities.Add)
		slices.Sort(add)
		if want := []corev1.Capability{"BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"}; !slices.Equal(add, want) {
			t.Errorf("capabilities added %v, want exactly %v", add, want)
		}
	} else {
		t.Error("no capabilities set")
	}
	if pod.HostNetwork || pod.HostPID || pod.HostIPC {
		t.Error("the pod shares a host namespace; ztunnel's does not")
	}
	if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
		t.Error("the Kubernetes API token is mounted, but the daemon never calls the API")
	}
	if len(o.all) != 2 {
		t.Errorf("%d objects rendered, want the DaemonSet and ServiceAccount only (no RBAC: the daemon does not call the API)", len(o.all))
	}

	// Probe, ports, scraping.
	p := c.ReadinessProbe
	if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/healthz/ready" || p.HTTPGet.Port != intstr.FromInt32(15021) {
		t.Errorf("readiness probe %+v, want GET :15021/healthz/ready", p)
	}
	ports := map[int32]string{}
	for _, p := range c.Ports {
		ports[p.ContainerPort] = p.Name
		if p.HostPort != 0 {
			t.Errorf("port %d has hostPort %d; ztunnel uses none", p.ContainerPort, p.HostPort)
		}
	}
	if ports[15020] != "ztunnel-stats" || len(ports) != 2 {
		t.Errorf("ports %v, want 15020 named ztunnel-stats and 15021", ports)
	}
	a := ds.Spec.Template.Annotations
	if a["prometheus.io/scrape"] != "true" || a["prometheus.io/port"] != "15020" || !servedByDaemon(t, a["prometheus.io/path"]) {
		t.Errorf("scrape annotations %v: want scrape true, port 15020, a path the daemon serves", a)
	}

	// Scheduling and lifecycle.
	s := ds.Spec.UpdateStrategy
	if s.Type != "RollingUpdate" || s.RollingUpdate == nil || s.RollingUpdate.MaxSurge == nil || *s.RollingUpdate.MaxSurge != intstr.FromInt32(1) ||
		s.RollingUpdate.MaxUnavailable == nil || *s.RollingUpdate.MaxUnavailable != intstr.FromInt32(0) {
		t.Errorf("update strategy %+v, want RollingUpdate maxSurge 1 maxUnavailable 0", s)
	}
	if pod.PriorityClassName != "system-node-critical" {
		t.Errorf("priority class %q", pod.PriorityClassName)
	}
	if g := pod.TerminationGracePeriodSeconds; g == nil || *g != 30 {
		t.Errorf("grace period %v, want 30", ptrValue(g))
	} else if grace := time.Duration(*pod.TerminationGracePeriodSeconds) * time.Second; cfg.DrainDuration > grace {
		t.Errorf("the daemon drains %v but Kubernetes kills it after %v", cfg.DrainDuration, grace)
	}
	if !reflect.DeepEqual(pod.NodeSelector, map[string]string{"kubernetes.io/os": "linux"}) {
		t.Errorf("node selector %v", pod.NodeSelector)
	}
	wantTol := []corev1.Toleration{{Effect: "NoSchedule", Operator: "Exists"}, {Key: "CriticalAddonsOnly", Operator: "Exists"}, {Effect: "NoExecute", Operator: "Exists"}}
	if !reflect.DeepEqual(pod.Tolerations, wantTol) {
		t.Errorf("tolerations %+v, want ztunnel's %+v", pod.Tolerations, wantTol)
	}
	r := c.Resources
	if !r.Requests.Cpu().Equal(resource.MustParse("200m")) || !r.Requests.Memory().Equal(resource.MustParse("512Mi")) || len(r.Limits) != 0 {
		t.Errorf("resources %+v, want requests 200m / 512Mi and no limits", r)
	}
}

// servedByDaemon reports whether the daemon's stats server registers p
// (ambient/agent/agent.go, read as source: the handler has no exported name).
func servedByDaemon(t testing.TB, p string) bool {
	t.Helper()
	src, err := os.ReadFile(filepath.Join(chartDir(t), "..", "..", "..", "ambient", "agent", "agent.go"))
	if err != nil {
		t.Fatal(err)
	}
	return p != "" && strings.Contains(string(src), `mux.Handle("`+p+`", h)`)
}

// TestValueSets renders the chart with the values users set and checks what
// each changes (and that the rest of the contract holds with it).
func TestValueSets(t *testing.T) {
	for _, tc := range []struct {
		name, values string
		check        func(t *testing.T, o objects, env map[string]envVar)
	}{
		{"revision", "revision: canary", func(t *testing.T, o objects, env map[string]envVar) {
			for _, k := range []string{"XDS_ADDRESS", "CA_ADDRESS"} {
				if env[k].value != "istiod-canary.istio-system.svc:15012" {
					t.Errorf("%s = %q, want istiod-canary.istio-system.svc:15012", k, env[k].value)
				}
			}
			if o.ds.Annotations["istio.io/rev"] != "canary" || o.ds.Spec.Template.Annotations["istio.io/rev"] != "canary" {
				t.Errorf("istio.io/rev not set on the DaemonSet and pod")
			}
		}},
		{"istio namespace", "istioNamespace: mesh", func(t *testing.T, o objects, env map[string]envVar) {
			if env["XDS_ADDRESS"].value != "istiod.mesh.svc:15012" || env["CA_ADDRESS"].value != "istiod.mesh.svc:15012" {
				t.Errorf("addresses %v %v", env["XDS_ADDRESS"], env["CA_ADDRESS"])
			}
		}},
		{"explicit addresses", "xdsAddress: xds.example:15012\ncaAddress: ca.example:15012\nrevision: r1", func(t *testing.T, o objects, env map[string]envVar) {
			if env["XDS_ADDRESS"].value != "xds.example:15012" || env["CA_ADDRESS"].value != "ca.example:15012" {
				t.Errorf("addresses %v %v", env["XDS_ADDRESS"], env["CA_ADDRESS"])
			}
		}},
		{"hub and tag", "hub: registry.example/mesh\ntag: \"1.20\"", func(t *testing.T, o objects, _ map[string]envVar) {
			if img := o.proxy(t).Image; img != "registry.example/mesh/kmesh:1.20" {
				t.Errorf("image %q", img)
			}
		}},
		{"image name", "image: kmesh-debug\ntag: 7", func(t *testing.T, o objects, _ map[string]envVar) {
			if img := o.proxy(t).Image; img != "localhost:5000/kmesh-debug:7" {
				t.Errorf("image %q", img)
			}
		}},
		{"full image", "image: registry.example/team/kmesh@sha256:0123\nhub: ignored\ntag: ignored", func(t *testing.T, o objects, _ map[string]envVar) {
			if img := o.proxy(t).Image; img != "registry.example/team/kmesh@sha256:0123" {
				t.Errorf("image %q, want it as given", img)
			}
		}},
		{"extra env", "env:\n  FOO: bar\n  KMESH_LOG_LEVEL: debug\n  ZTUNNEL_WORKER_THREADS: 4\n  NODE_NAME: fixed", func(t *testing.T, o objects, env map[string]envVar) {
			for k, want := range map[string]envVar{"FOO": {value: "bar"}, "KMESH_LOG_LEVEL": {value: "debug"},
				"ZTUNNEL_WORKER_THREADS": {value: "4"}, "NODE_NAME": {value: "fixed"}, "POD_NAME": {field: "metadata.name"}} {
				if env[k] != want {
					t.Errorf("env %s = %+v, want %+v", k, env[k], want)
				}
			}
			if cfg := daemonConfig(t, env); cfg.LogLevel != "debug" || cfg.WorkerThreads != 4 {
				t.Errorf("daemon sees log level %q, %d threads", cfg.LogLevel, cfg.WorkerThreads)
			}
		}},
		{"resource name", "resourceName: kmesh-node", func(t *testing.T, o objects, _ map[string]envVar) {
			if o.ds.Name != "kmesh-node" || o.sa.Name != "kmesh-node" || o.ds.Spec.Template.Spec.ServiceAccountName != "kmesh-node" {
				t.Errorf("names %s %s %s, want kmesh-node", o.ds.Name, o.sa.Name, o.ds.Spec.Template.Spec.ServiceAccountName)
			}
			if o.ds.Labels["app"] != "ztunnel" || o.ds.Spec.Selector.MatchLabels["app"] != "ztunnel" {
				t.Error("labels must stay app: ztunnel whatever the name")
			}
		}},
		{"network and cluster", "network: net-1\nmultiCluster:\n  clusterName: west\ntrustDomain: example.org", func(t *testing.T, o objects, env map[string]envVar) {
			cfg := daemonConfig(t, env)
			if cfg.Network != "net-1" || cfg.ClusterID != "west" || cfg.TrustDomain != "example.org" {
				t.Errorf("daemon sees network %q cluster %q trust domain %q", cfg.Network, cfg.ClusterID, cfg.TrustDomain)
			}
		}},
		{"grace period", "terminationGracePeriodSeconds: 60", func(t *testing.T, o objects, env map[string]envVar) {
			g := o.ds.Spec.Template.Spec.TerminationGracePeriodSeconds
			if g == nil || *g != 60 || env["TERMINATION_GRACE_PERIOD_SECONDS"].value != "60" {
				t.Errorf("grace %v, env %v; want 60 in both", g, env["TERMINATION_GRACE_PERIOD_SECONDS"])
			}
			if d := daemonConfig(t, env).DrainDuration; d > 60*time.Second {
				t.Errorf("drain %v exceeds the grace period", d)
			}
		}},
		{"cni", "cni:\n  enabled: true", func(t *testing.T, o objects, _ map[string]envVar) {
			for vol, want := range map[string][2]string{"cni-bin-dir": {"/opt/cni/bin", "/host/opt/cni/bin"}, "cni-net-dir": {"/etc/cni/net.d", "/host/etc/cni/net.d"}} {
				m, v := mountOf(t, o, vol)
				if v.HostPath == nil || v.HostPath.Path != want[0] || m.MountPath != want[1] {
					t.Errorf("%s: %+v at %s, want hostPath %s at %s", vol, v.VolumeSource, m.MountPath, want[0], want[1])
				}
			}
		}},
		{"host paths", "bpffsHostPath: /run/bpf\ncgroupHostPath: /sys/fs/cgroup/unified", func(t *testing.T, o objects, _ map[string]envVar) {
			if _, v := mountOf(t, o, "bpffs"); v.HostPath.Path != "/run/bpf" {
				t.Errorf("bpffs from %s", v.HostPath.Path)
			}
			if _, v := mountOf(t, o, "cgroup"); v.HostPath.Path != "/sys/fs/cgroup/unified" {
				t.Errorf("cgroup from %s", v.HostPath.Path)
			}
		}},
		{"pod metadata, secrets, limits", `
podLabels: {team: mesh}
podAnnotations: {example.com/a: "b"}
labels: {owner: platform}
imagePullSecrets: [regcred]
imagePullPolicy: Always
resources: {requests: {cpu: 100m}, limits: {memory: 1Gi}}
nodeSelector: {pool: system}
`, func(t *testing.T, o objects, _ map[string]envVar) {
			tpl := o.ds.Spec.Template
			if tpl.Labels["team"] != "mesh" || tpl.Labels["app"] != "ztunnel" || tpl.Annotations["example.com/a"] != "b" {
				t.Errorf("pod labels %v annotations %v", tpl.Labels, tpl.Annotations)
			}
			if tpl.Annotations["prometheus.io/scrape"] != "true" {
				t.Error("podAnnotations given by the user drop the scrape defaults (Helm merges maps)")
			}
			if o.ds.Labels["owner"] != "platform" || o.sa.Labels["owner"] != "platform" {
				t.Error("labels not on the DaemonSet and ServiceAccount")
			}
			if len(o.sa.ImagePullSecrets) != 1 || o.sa.ImagePullSecrets[0].Name != "regcred" {
				t.Errorf("pull secrets %v", o.sa.ImagePullSecrets)
			}
			c := o.proxy(t)
			if c.ImagePullPolicy != corev1.PullAlways || !c.Resources.Limits.Memory().Equal(resource.MustParse("1Gi")) ||
				!c.Resources.Requests.Cpu().Equal(resource.MustParse("100m")) {
				t.Errorf("pull policy %q resources %+v", c.ImagePullPolicy, c.Resources)
			}
			if tpl.Spec.NodeSelector["pool"] != "system" || tpl.Spec.NodeSelector["kubernetes.io/os"] != "linux" {
				t.Errorf("node selector %v", tpl.Spec.NodeSelector)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := mustRender(t, tc.values)
			tc.check(t, o, envOf(t, o.proxy(t)))
			// The contract that no value changes.
			c := o.proxy(t)
			if c.Name != "istio-proxy" || !slices.Equal(c.Args, []string{"proxy", "ztunnel"}) || o.ds.Spec.Template.Spec.PriorityClassName != "system-node-critical" {
				t.Errorf("contract broken: container %q args %q", c.Name, c.Args)
			}
		})
	}
}

// TestSchemaRejects: a mistyped or unknown value fails the install, and the
// error names it.
func TestSchemaRejects(t *testing.T) {
	for _, tc := range []struct{ values, names string }{
		{"tag: {}", "tag"},
		{"tag: 1.20", "tag"}, // YAML's 1.2: quote it
		{`resources: "big"`, "resources"},
		{"resourcesX: {}", "resourcesX"},
		{"resources: {requests: {cpu: {}}}", "cpu"},
		{"resources: {request: {cpu: 1}}", "request"},
		{`terminationGracePeriodSeconds: "30"`, "terminationGracePeriodSeconds"},
		{"terminationGracePeriodSeconds: 0", "terminationGracePeriodSeconds"},
		{"logLevel: verbose", "logLevel"},
		{`cni: {enabled: "yes"}`, "enabled"},
		{"cni: {enable: true}", "enable"},
		{"env: {FOO: {a: b}}", "FOO"},
		{"env: {\"bad-name\": x}", "bad-name"},
		{"podAnnotations: {a: 1}", "podAnnotations/a"},
		{"multiCluster: {clustername: x}", "clustername"},
		{"bpffsHostPath: sys/fs/bpf", "bpffsHostPath"},
		{"resourceName: Ztunnel", "resourceName"},
		{"updateStrategy: {rollingUpdate: {maxsurge: 1}}", "maxsurge"},
		{"imagePullSecrets: regcred", "imagePullSecrets"},
	} {
		_, err := render(t, tc.values)
		if err == nil {
			t.Errorf("values %q accepted", tc.values)
			continue
		}
		// The validator says "at '/resources/requests/cpu'" for a bad value
		// and "additional properties 'resourcesX'" for an unknown one.
		msg := err.Error()
		if !strings.Contains(msg, "schema") || !strings.Contains(msg, "/"+tc.names+"'") && !strings.Contains(msg, "'"+tc.names+"'") {
			t.Errorf("values %q: error does not name %q:\n%v", tc.values, tc.names, err)
		}
	}
}

// notForDaemon are variables a rendering may set that are not in the
// daemon's settings table, each with the reason it is there.
var notForDaemon = map[string]string{
	"GOMAXPROCS": "Go runtime; kmesh-daemon lets it win over ZTUNNEL_WORKER_THREADS (cmd/kmesh-daemon)",
	"GOGC":       "Go runtime; the daemon keeps it over its own default (agent.SetMemoryPolicy)",
	"GOMEMLIMIT": "Go runtime; the daemon keeps it over the cgroup-derived limit (agent.SetMemoryPolicy)",
}

// TestEnvIsReadByDaemon: every variable the chart sets (with every optional
// one switched on) is one the daemon reads, so none is silently ignored.
func TestEnvIsReadByDaemon(t *testing.T) {
	reads := map[string]bool{}
	for _, n := range config.EnvNames() {
		reads[n] = true
	}
	o := mustRender(t, "network: n1\nmultiCluster: {clusterName: c1}\nrevision: r\ncni: {enabled: true}")
	var unread []string
	for _, e := range o.proxy(t).Env {
		if !reads[e.Name] && notForDaemon[e.Name] == "" {
			unread = append(unread, e.Name)
		}
	}
	sort.Strings(unread)
	if len(unread) > 0 {
		t.Errorf("the chart sets %v, which the daemon does not read (ambient/config settings)", unread)
	}
	for n := range notForDaemon {
		if reads[n] {
			t.Errorf("%s is listed as not the daemon's but is in its settings table: drop it from notForDaemon", n)
		}
	}
}

func ptrValue[T any](p *T) any {
	if p == nil {
		return "unset"
	}
	return *p
}

// TestListenerHolder: the holder is a second container after the daemon's,
// with no capabilities, the daemon's image and user, and the daemon's
// KMESH_LISTENER_HOLDER pointing into an emptyDir both mount; disabled, it
// and the variable are gone.
func TestListenerHolder(t *testing.T) {
	o := mustRender(t, "")
	c, h := o.proxy(t), o.holder(t)
	if c.Name != "istio-proxy" || h == nil {
		t.Fatalf("containers %v: want istio-proxy first, then listener-holder", o.ds.Spec.Template.Spec.Containers)
	}
	if h.Image != c.Image || !slices.Equal(h.Args, []string{"hold"}) || len(h.Command) != 0 {
		t.Errorf("holder image %q args %q, want the daemon's image with args [hold]", h.Image, h.Args)
	}
	sock := envOf(t, c)["KMESH_LISTENER_HOLDER"].value
	if got := envOf(t, h)["KMESH_LISTENER_HOLDER"].value; got == "" || got != sock {
		t.Errorf("holder listens on %q, daemon connects to %q", got, sock)
	}
	dm, v := mountOf(t, o, "listener-holder")
	if v.EmptyDir == nil || path.Dir(sock) != dm.MountPath {
		t.Errorf("holder volume %+v at %s, socket %s: want an emptyDir holding the socket", v.VolumeSource, dm.MountPath, sock)
	}
	if len(h.VolumeMounts) != 1 || h.VolumeMounts[0].Name != "listener-holder" || h.VolumeMounts[0].MountPath != dm.MountPath {
		t.Errorf("holder mounts %+v, want only the shared emptyDir at %s", h.VolumeMounts, dm.MountPath)
	}
	sc := h.SecurityContext
	if sc == nil || sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) != 0 ||
		sc.RunAsUser == nil || c.SecurityContext.RunAsUser == nil || *sc.RunAsUser != *c.SecurityContext.RunAsUser ||
		sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("holder security context %+v: want no capabilities, the daemon's user, no escalation, read-only root", sc)
	}
	if h.ReadinessProbe != nil || len(h.Ports) != 0 {
		t.Error("the holder serves nothing over the network")
	}

	o = mustRender(t, "listenerHolder: {enabled: false}")
	if o.holder(t) != nil || len(o.ds.Spec.Template.Spec.Containers) != 1 {
		t.Error("listenerHolder.enabled=false still renders the holder")
	}
	if _, ok := envOf(t, o.proxy(t))["KMESH_LISTENER_HOLDER"]; ok {
		t.Error("listenerHolder.enabled=false still points the daemon at a holder")
	}
	for _, v := range o.ds.Spec.Template.Spec.Volumes {
		if v.Name == "listener-holder" {
			t.Error("listenerHolder.enabled=false still mounts its emptyDir")
		}
	}
	if _, err := render(t, "listenerHolder: {enable: true}"); err == nil {
		t.Error("a mistyped listenerHolder key was accepted")
	}
}
