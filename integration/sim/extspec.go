package sim

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// What a container sees: environment ($(VAR) expansion, downward API,
// ConfigMaps and Secrets), volumes and probes, as a kubelet computes them.

// expand does Kubernetes' $(VAR) expansion against env (NAME=value
// entries, later ones win): $$ is a literal $, an undefined $(VAR) stays.
func expand(s string, env []string) string {
	lookup := func(name string) (string, bool) {
		for i := len(env) - 1; i >= 0; i-- {
			if k, v, ok := strings.Cut(env[i], "="); ok && k == name {
				return v, true
			}
		}
		return "", false
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '$' || i+1 >= len(s) {
			b.WriteByte(s[i])
			continue
		}
		switch s[i+1] {
		case '$':
			b.WriteByte('$')
			i++
		case '(':
			end := strings.IndexByte(s[i+2:], ')')
			if end < 0 {
				b.WriteString(s[i:])
				return b.String()
			}
			name := s[i+2 : i+2+end]
			if v, ok := lookup(name); ok {
				b.WriteString(v)
			} else {
				b.WriteString(s[i : i+3+end])
			}
			i += 2 + end
		default:
			b.WriteByte('$')
		}
	}
	return b.String()
}

func expandAll(in []string, env []string) []string {
	out := make([]string, len(in))
	for i, s := range in {
		out[i] = expand(s, env)
	}
	return out
}

// containerEnv is the container's environment in Kubernetes' order: the
// service variables for the API server, envFrom, then env (each value
// expanded against what precedes it).
func (p *extPod) containerEnv(pod *corev1.Pod, ctr corev1.Container) ([]string, error) {
	ctx, cancel := context.WithTimeout(p.ctx, 10*time.Second)
	defer cancel()
	k := p.n.cluster.ext
	host, port, _ := net.SplitHostPort(p.n.cluster.opts.External.APIServer)
	env := []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOSTNAME=" + pod.Name,
		"KUBERNETES_SERVICE_HOST=" + host, "KUBERNETES_SERVICE_PORT=" + port, "KUBERNETES_SERVICE_PORT_HTTPS=" + port,
		"KUBERNETES_PORT=tcp://" + net.JoinHostPort(host, port),
	}
	if p.hostNet {
		env[1] = "HOSTNAME=" + p.n.Name
	}
	for _, ef := range ctr.EnvFrom {
		var data map[string]string
		switch {
		case ef.ConfigMapRef != nil:
			cm, err := k.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, ef.ConfigMapRef.Name, metav1.GetOptions{})
			if err != nil {
				if apierrors.IsNotFound(err) && ef.ConfigMapRef.Optional != nil && *ef.ConfigMapRef.Optional {
					continue
				}
				return nil, fmt.Errorf("envFrom ConfigMap %s: %w", ef.ConfigMapRef.Name, err)
			}
			data = cm.Data
		case ef.SecretRef != nil:
			s, err := k.CoreV1().Secrets(pod.Namespace).Get(ctx, ef.SecretRef.Name, metav1.GetOptions{})
			if err != nil {
				if apierrors.IsNotFound(err) && ef.SecretRef.Optional != nil && *ef.SecretRef.Optional {
					continue
				}
				return nil, fmt.Errorf("envFrom Secret %s: %w", ef.SecretRef.Name, err)
			}
			data = map[string]string{}
			for kk, v := range s.Data {
				data[kk] = string(v)
			}
		}
		keys := make([]string, 0, len(data))
		for kk := range data {
			keys = append(keys, kk)
		}
		sort.Strings(keys)
		for _, kk := range keys {
			env = append(env, ef.Prefix+kk+"="+data[kk])
		}
	}
	for _, e := range ctr.Env {
		if e.ValueFrom == nil {
			env = append(env, e.Name+"="+expand(e.Value, env))
			continue
		}
		v, skip, err := p.envValueFrom(ctx, pod, ctr, e.ValueFrom)
		if err != nil {
			return nil, fmt.Errorf("env %s: %w", e.Name, err)
		}
		if !skip {
			env = append(env, e.Name+"="+v)
		}
	}
	return env, nil
}

func (p *extPod) envValueFrom(ctx context.Context, pod *corev1.Pod, ctr corev1.Container, vf *corev1.EnvVarSource) (string, bool, error) {
	k := p.n.cluster.ext
	switch {
	case vf.FieldRef != nil:
		v, err := p.fieldRef(pod, vf.FieldRef.FieldPath)
		return v, false, err
	case vf.ResourceFieldRef != nil:
		c := ctr
		if vf.ResourceFieldRef.ContainerName != "" {
			for _, o := range append(append([]corev1.Container(nil), pod.Spec.Containers...), pod.Spec.InitContainers...) {
				if o.Name == vf.ResourceFieldRef.ContainerName {
					c = o
				}
			}
		}
		v, err := resourceField(c, vf.ResourceFieldRef)
		return v, false, err
	case vf.ConfigMapKeyRef != nil:
		r := vf.ConfigMapKeyRef
		optional := r.Optional != nil && *r.Optional
		cm, err := k.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, r.Name, metav1.GetOptions{})
		if err != nil {
			if apierrors.IsNotFound(err) && optional {
				return "", true, nil
			}
			return "", false, err
		}
		v, ok := cm.Data[r.Key]
		if !ok && !optional {
			return "", false, fmt.Errorf("ConfigMap %s has no key %s", r.Name, r.Key)
		}
		return v, !ok, nil
	case vf.SecretKeyRef != nil:
		r := vf.SecretKeyRef
		optional := r.Optional != nil && *r.Optional
		s, err := k.CoreV1().Secrets(pod.Namespace).Get(ctx, r.Name, metav1.GetOptions{})
		if err != nil {
			if apierrors.IsNotFound(err) && optional {
				return "", true, nil
			}
			return "", false, err
		}
		v, ok := s.Data[r.Key]
		if !ok && !optional {
			return "", false, fmt.Errorf("Secret %s has no key %s", r.Name, r.Key)
		}
		return string(v), !ok, nil
	}
	return "", false, fmt.Errorf("unsupported valueFrom")
}

// fieldRef resolves a downward API field path.
func (p *extPod) fieldRef(pod *corev1.Pod, path string) (string, error) {
	switch path {
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "spec.nodeName":
		return pod.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.podIP":
		return p.podIP.String(), nil
	case "status.podIPs":
		ips := []string{p.podIP.String()}
		if p.net != nil && p.net.IPv6.IsValid() {
			ips = append(ips, p.net.IPv6.String())
		}
		return strings.Join(ips, ","), nil
	case "status.hostIP", "status.hostIPs":
		return p.n.Net.Uplink4().String(), nil
	}
	if rest, ok := strings.CutPrefix(path, "metadata.labels['"); ok {
		return pod.Labels[strings.TrimSuffix(rest, "']")], nil
	}
	if rest, ok := strings.CutPrefix(path, "metadata.annotations['"); ok {
		return pod.Annotations[strings.TrimSuffix(rest, "']")], nil
	}
	return "", fmt.Errorf("unsupported fieldPath %q", path)
}

// resourceField resolves limits.*/requests.*; a missing limit is the
// node's allocatable amount, as in Kubernetes. Values round up to the
// divisor.
func resourceField(c corev1.Container, r *corev1.ResourceFieldSelector) (string, error) {
	kind, name, ok := strings.Cut(r.Resource, ".")
	if !ok {
		return "", fmt.Errorf("unsupported resource %q", r.Resource)
	}
	rn := corev1.ResourceName(name)
	var q resource.Quantity
	var have bool
	switch kind {
	case "limits":
		q, have = c.Resources.Limits[rn]
		if !have {
			q, have = nodeAllocatable[rn]
		}
	case "requests":
		q, have = c.Resources.Requests[rn]
		if !have && rn == corev1.ResourceCPU {
			q, have = resource.MustParse("0"), true
		}
	}
	if !have {
		q = resource.MustParse("0")
	}
	div := r.Divisor
	if div.IsZero() {
		div = resource.MustParse("1")
	}
	if rn == corev1.ResourceCPU {
		v := int64(math.Ceil(float64(q.MilliValue()) / float64(div.MilliValue())))
		if kind == "limits" || v > 0 {
			v = max(v, 1) // Kubernetes reports at least 1 for a CPU limit
		}
		return strconv.FormatInt(v, 10), nil
	}
	return strconv.FormatInt(int64(math.Ceil(float64(q.Value())/float64(div.Value()))), 10), nil
}

// volumeSource is a pod volume's host side.
type volumeSource struct {
	kind mountKind
	path string
}

// prepareVolumes materialises the pod's volumes under its directory (or
// maps hostPaths into the node's host directory).
func (p *extPod) prepareVolumes(pod *corev1.Pod) error {
	ctx, cancel := context.WithTimeout(p.ctx, 20*time.Second)
	defer cancel()
	p.mounts = map[string]volumeSource{}
	if err := p.writeEtcFiles(pod); err != nil {
		return err
	}
	for _, v := range pod.Spec.Volumes {
		dir := filepath.Join(p.dir, "volumes", v.Name)
		var err error
		src := volumeSource{kind: mountBind, path: dir}
		switch {
		case v.HostPath != nil:
			src, err = p.hostPath(v.HostPath)
		case v.EmptyDir != nil:
			err = os.MkdirAll(dir, 0o777)
		case v.ConfigMap != nil:
			err = p.writeConfigMap(ctx, pod, dir, v.ConfigMap.Name, v.ConfigMap.Items, v.ConfigMap.Optional)
		case v.Secret != nil:
			err = p.writeSecret(ctx, pod, dir, v.Secret.SecretName, v.Secret.Items, v.Secret.Optional)
		case v.Projected != nil:
			err = os.MkdirAll(dir, 0o755)
			for _, s := range v.Projected.Sources {
				if err != nil {
					break
				}
				switch {
				case s.ServiceAccountToken != nil:
					err = p.writeToken(ctx, pod, dir, s.ServiceAccountToken)
				case s.ConfigMap != nil:
					err = p.writeConfigMap(ctx, pod, dir, s.ConfigMap.Name, s.ConfigMap.Items, s.ConfigMap.Optional)
				case s.Secret != nil:
					err = p.writeSecret(ctx, pod, dir, s.Secret.Name, s.Secret.Items, s.Secret.Optional)
				case s.DownwardAPI != nil:
					err = p.writeDownward(pod, dir, s.DownwardAPI.Items)
				default:
					err = fmt.Errorf("unsupported projected source")
				}
			}
		case v.DownwardAPI != nil:
			if err = os.MkdirAll(dir, 0o755); err == nil {
				err = p.writeDownward(pod, dir, v.DownwardAPI.Items)
			}
		default:
			err = fmt.Errorf("unsupported volume type")
		}
		if err != nil {
			return fmt.Errorf("volume %s: %w", v.Name, err)
		}
		p.mounts[v.Name] = src
	}
	return nil
}

// hostPath maps a hostPath into the node: its bpffs directory, its cgroup,
// its /proc (the node's PID namespace), or <run>/<node>/host/<path>.
func (p *extPod) hostPath(h *corev1.HostPathVolumeSource) (volumeSource, error) {
	n := p.n
	path := filepath.Clean("/" + h.Path)
	under := func(prefix string) (string, bool) {
		if path == prefix {
			return "", true
		}
		rest, ok := strings.CutPrefix(path, prefix+"/")
		return rest, ok
	}
	if _, ok := under("/sys/fs/bpf"); ok {
		d := n.ext.hostFile(path)
		return volumeSource{kind: mountBind, path: d}, os.MkdirAll(d, 0o700)
	}
	if _, ok := under("/sys/fs/cgroup"); ok {
		return volumeSource{kind: mountBind, path: n.ext.hostFile(path)}, nil
	}
	if path == "/proc" {
		return volumeSource{kind: mountProc}, nil
	}
	d := n.ext.hostFile(path)
	typ := corev1.HostPathUnset
	if h.Type != nil {
		typ = *h.Type
	}
	switch typ {
	case corev1.HostPathFileOrCreate:
		if err := os.MkdirAll(filepath.Dir(d), 0o755); err != nil {
			return volumeSource{}, err
		}
		f, err := os.OpenFile(d, os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			return volumeSource{}, err
		}
		f.Close()
	case corev1.HostPathFile, corev1.HostPathSocket, corev1.HostPathCharDev, corev1.HostPathBlockDev:
		if _, err := os.Stat(d); err != nil {
			return volumeSource{}, err
		}
	default:
		// Directory, DirectoryOrCreate and unset: a node has these
		// directories (CNI's, /var/run/...); the simulated node makes them.
		if err := os.MkdirAll(d, 0o755); err != nil {
			return volumeSource{}, err
		}
	}
	return volumeSource{kind: mountBind, path: d}, nil
}

func writeFile(dir, rel string, data []byte, mode *int32) error {
	f := filepath.Join(dir, filepath.Clean("/"+rel))
	if err := os.MkdirAll(filepath.Dir(f), 0o755); err != nil {
		return err
	}
	m := os.FileMode(0o644)
	if mode != nil {
		m = os.FileMode(*mode)
	}
	return os.WriteFile(f, data, m)
}

func writeItems(dir string, data map[string][]byte, items []corev1.KeyToPath) error {
	if len(items) == 0 {
		for k, v := range data {
			if err := writeFile(dir, k, v, nil); err != nil {
				return err
			}
		}
		return nil
	}
	for _, it := range items {
		v, ok := data[it.Key]
		if !ok {
			return fmt.Errorf("no key %s", it.Key)
		}
		if err := writeFile(dir, it.Path, v, it.Mode); err != nil {
			return err
		}
	}
	return nil
}

func (p *extPod) writeConfigMap(ctx context.Context, pod *corev1.Pod, dir, name string, items []corev1.KeyToPath, optional *bool) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	cm, err := p.n.cluster.ext.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		if apierrors.IsNotFound(err) && optional != nil && *optional {
			return nil
		}
		return fmt.Errorf("ConfigMap %s: %w", name, err)
	}
	data := map[string][]byte{}
	for k, v := range cm.Data {
		data[k] = []byte(v)
	}
	for k, v := range cm.BinaryData {
		data[k] = v
	}
	return writeItems(dir, data, items)
}

func (p *extPod) writeSecret(ctx context.Context, pod *corev1.Pod, dir, name string, items []corev1.KeyToPath, optional *bool) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	s, err := p.n.cluster.ext.CoreV1().Secrets(pod.Namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		if apierrors.IsNotFound(err) && optional != nil && *optional {
			return nil
		}
		return fmt.Errorf("Secret %s: %w", name, err)
	}
	return writeItems(dir, s.Data, items)
}

// writeToken asks the API server for a token bound to the pod, with the
// projection's audience and lifetime (TokenRequest), as a kubelet does.
func (p *extPod) writeToken(ctx context.Context, pod *corev1.Pod, dir string, s *corev1.ServiceAccountTokenProjection) error {
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	exp := int64(3600)
	if s.ExpirationSeconds != nil {
		exp = *s.ExpirationSeconds
	}
	req := &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{ExpirationSeconds: &exp,
		BoundObjectRef: &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}}}
	if s.Audience != "" {
		req.Spec.Audiences = []string{s.Audience}
	}
	tr, err := p.n.cluster.ext.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("token for %s/%s: %w", pod.Namespace, sa, err)
	}
	mode := int32(0o600)
	return writeFile(dir, s.Path, []byte(tr.Status.Token), &mode)
}

func (p *extPod) writeDownward(pod *corev1.Pod, dir string, items []corev1.DownwardAPIVolumeFile) error {
	for _, it := range items {
		var v string
		var err error
		switch {
		case it.FieldRef != nil && it.FieldRef.FieldPath == "metadata.labels":
			v = formatMap(pod.Labels)
		case it.FieldRef != nil && it.FieldRef.FieldPath == "metadata.annotations":
			v = formatMap(pod.Annotations)
		case it.FieldRef != nil:
			v, err = p.fieldRef(pod, it.FieldRef.FieldPath)
		case it.ResourceFieldRef != nil:
			c := corev1.Container{}
			for _, o := range pod.Spec.Containers {
				if o.Name == it.ResourceFieldRef.ContainerName {
					c = o
				}
			}
			v, err = resourceField(c, it.ResourceFieldRef)
		}
		if err != nil {
			return err
		}
		if err := writeFile(dir, it.Path, []byte(v), it.Mode); err != nil {
			return err
		}
	}
	return nil
}

func formatMap(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%q\n", k, m[k])
	}
	return strings.TrimSuffix(b.String(), "\n")
}

// writeEtcFiles writes the pod's /etc/resolv.conf, /etc/hosts and
// /etc/hostname as a kubelet does (dnsPolicy, dnsConfig, hostAliases).
func (p *extPod) writeEtcFiles(pod *corev1.Pod) error {
	dir := filepath.Join(p.dir, "etc")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	hostname := pod.Name
	if pod.Spec.Hostname != "" {
		hostname = pod.Spec.Hostname
	}
	if p.hostNet {
		hostname = p.n.Name
	}
	policy := pod.Spec.DNSPolicy
	if policy == "" {
		policy = corev1.DNSClusterFirst
	}
	if p.hostNet && policy == corev1.DNSClusterFirst {
		policy = corev1.DNSDefault // as a kubelet does: only ClusterFirstWithHostNet gets cluster DNS
	}
	var servers, searches, options []string
	switch policy {
	case corev1.DNSClusterFirst, corev1.DNSClusterFirstWithHostNet:
		if dns := p.n.cluster.opts.External.ClusterDNS; dns.IsValid() {
			servers = []string{dns.String()}
		}
		searches = []string{pod.Namespace + ".svc.cluster.local", "svc.cluster.local", "cluster.local"}
		options = []string{"ndots:5"}
	case corev1.DNSDefault:
		// The node's resolver: the simulator's nodes have none.
	}
	if dc := pod.Spec.DNSConfig; dc != nil {
		servers = append(servers, dc.Nameservers...)
		searches = append(searches, dc.Searches...)
		for _, o := range dc.Options {
			if o.Value != nil {
				options = append(options, o.Name+":"+*o.Value)
			} else {
				options = append(options, o.Name)
			}
		}
	}
	var rc strings.Builder
	rc.WriteString("# written by the kmesh simulator's kubelet\n")
	for _, s := range servers {
		fmt.Fprintf(&rc, "nameserver %s\n", s)
	}
	if len(searches) > 0 {
		fmt.Fprintf(&rc, "search %s\n", strings.Join(searches, " "))
	}
	if len(options) > 0 {
		fmt.Fprintf(&rc, "options %s\n", strings.Join(options, " "))
	}
	hosts := "# written by the kmesh simulator's kubelet\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
	if !p.hostNet {
		hosts += fmt.Sprintf("%s\t%s\n", p.podIP, hostname)
	}
	for _, ha := range pod.Spec.HostAliases {
		hosts += fmt.Sprintf("%s\t%s\n", ha.IP, strings.Join(ha.Hostnames, "\t"))
	}
	if h := p.n.cluster.opts.External.Hosts; h != nil {
		hosts += h()
	}
	for name, data := range map[string]string{"resolv.conf": rc.String(), "hosts": hosts, "hostname": hostname + "\n"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// containerMounts lists the container's volume mounts, after the pod's
// /etc files (a volume at one of those paths wins, mounted later).
func (p *extPod) containerMounts(pod *corev1.Pod, ctr corev1.Container) ([]containerMount, error) {
	var out []containerMount
	for _, f := range []string{"resolv.conf", "hosts", "hostname"} {
		out = append(out, containerMount{Kind: mountBind, Source: filepath.Join(p.dir, "etc", f), Target: "/etc/" + f})
	}
	for _, vm := range ctr.VolumeMounts {
		src, ok := p.mounts[vm.Name]
		if !ok {
			return nil, fmt.Errorf("volume mount %s: no such volume", vm.Name)
		}
		m := containerMount{Kind: src.kind, Target: vm.MountPath, ReadOnly: vm.ReadOnly}
		if src.kind == mountBind {
			m.Source = src.path
			if vm.SubPath != "" {
				m.Source = filepath.Join(src.path, filepath.Clean("/"+vm.SubPath))
			}
		}
		out = append(out, m)
	}
	return out, nil
}

// probeLoop runs the readiness probe (from the pod's network namespace or
// inside the container for exec) and sets the container's readiness.
// Until the first success it probes every second (a kubelet waits a full
// period); then every periodSeconds.
func (p *extPod) probeLoop(ec *extContainer) {
	pr := ec.spec.ReadinessProbe
	if pr == nil {
		return
	}
	period := time.Duration(max(pr.PeriodSeconds, 10)) * time.Second
	if pr.PeriodSeconds > 0 {
		period = time.Duration(pr.PeriodSeconds) * time.Second
	}
	timeout := time.Duration(max(pr.TimeoutSeconds, 1)) * time.Second
	success, failure := max(pr.SuccessThreshold, 1), max(pr.FailureThreshold, 3)
	for {
		p.mu.Lock()
		running, started, ready := ec.running, ec.started, ec.ready
		p.mu.Unlock()
		wait := period
		if !ready {
			wait = min(period, time.Second)
		}
		if running && time.Since(started.Time) >= time.Duration(pr.InitialDelaySeconds)*time.Second {
			ctx, cancel := context.WithTimeout(p.ctx, timeout)
			err := p.runHandler(ctx, ec, &pr.ProbeHandler)
			cancel()
			p.mu.Lock()
			changed := false
			if err == nil {
				ec.probeOK++
				ec.probeBad = 0
				if !ec.ready && int32(ec.probeOK) >= success && ec.running {
					ec.ready, changed = true, true
				}
			} else {
				ec.probeBad++
				ec.probeOK = 0
				if ec.ready && int32(ec.probeBad) >= failure {
					ec.ready, changed = false, true
				}
			}
			p.mu.Unlock()
			if changed {
				p.markDirty()
			}
		}
		select {
		case <-p.ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// livenessLoop runs the liveness probe: after failureThreshold failures in
// a row the container is killed (SIGKILL; a kubelet stops it with its
// grace period) and its supervisor restarts it.
func (p *extPod) livenessLoop(ec *extContainer) {
	pr := ec.spec.LivenessProbe
	if pr == nil {
		return
	}
	period := 10 * time.Second
	if pr.PeriodSeconds > 0 {
		period = time.Duration(pr.PeriodSeconds) * time.Second
	}
	timeout := time.Duration(max(pr.TimeoutSeconds, 1)) * time.Second
	failure := max(pr.FailureThreshold, 3)
	bad, lastID := int32(0), ""
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-time.After(period):
		}
		p.mu.Lock()
		running, started, proc, id := ec.running, ec.started, ec.proc, ec.id
		p.mu.Unlock()
		if id != lastID {
			bad, lastID = 0, id
		}
		if !running || time.Since(started.Time) < time.Duration(pr.InitialDelaySeconds)*time.Second {
			continue
		}
		ctx, cancel := context.WithTimeout(p.ctx, timeout)
		err := p.runHandler(ctx, ec, &pr.ProbeHandler)
		cancel()
		if err == nil {
			bad = 0
			continue
		}
		if bad++; bad >= failure && proc != nil {
			p.logf("liveness probe failed: restarting", "container", ec.spec.Name, "err", err)
			_ = proc.Kill()
			bad = 0
		}
	}
}

// runHandler runs a probe or lifecycle handler: httpGet and tcpSocket
// from the pod's network namespace to the pod's address, exec inside the
// container.
func (p *extPod) runHandler(ctx context.Context, ec *extContainer, h any) error {
	var exe *corev1.ExecAction
	var get *corev1.HTTPGetAction
	var tcp *corev1.TCPSocketAction
	switch h := h.(type) {
	case *corev1.ProbeHandler:
		exe, get, tcp = h.Exec, h.HTTPGet, h.TCPSocket
		if h.GRPC != nil {
			return fmt.Errorf("gRPC probes are not simulated")
		}
	case *corev1.LifecycleHandler:
		exe, get, tcp = h.Exec, h.HTTPGet, h.TCPSocket
		if h.Sleep != nil {
			select {
			case <-ctx.Done():
			case <-time.After(time.Duration(h.Sleep.Seconds) * time.Second):
			}
			return nil
		}
	}
	port := func(ip intstr.IntOrString) (string, error) {
		if ip.Type == intstr.Int {
			return strconv.Itoa(ip.IntValue()), nil
		}
		for _, cp := range ec.spec.Ports {
			if cp.Name == ip.StrVal {
				return strconv.Itoa(int(cp.ContainerPort)), nil
			}
		}
		return "", fmt.Errorf("no port named %s", ip.StrVal)
	}
	switch {
	case exe != nil:
		out, err := p.execIn(ctx, ec, exe.Command)
		if err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
		return nil
	case tcp != nil:
		pt, err := port(tcp.Port)
		if err != nil {
			return err
		}
		host := tcp.Host
		if host == "" {
			host = p.podIP.String()
		}
		c, err := p.dialIn(ctx, "tcp", net.JoinHostPort(host, pt))
		if err != nil {
			return err
		}
		return c.Close()
	case get != nil:
		pt, err := port(get.Port)
		if err != nil {
			return err
		}
		host := get.Host
		if host == "" {
			host = p.podIP.String()
		}
		scheme := strings.ToLower(string(get.Scheme))
		if scheme == "" {
			scheme = "http"
		}
		tr := &http.Transport{DialContext: p.dialIn, TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, DisableKeepAlives: true} //nolint:gosec // a kubelet does not verify probe certificates
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, scheme+"://"+net.JoinHostPort(host, pt)+get.Path, nil)
		if err != nil {
			return err
		}
		for _, hh := range get.HTTPHeaders {
			req.Header.Set(hh.Name, hh.Value)
		}
		resp, err := (&http.Client{Transport: tr}).Do(req)
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 10<<10))
		resp.Body.Close()
		if resp.StatusCode < 200 || resp.StatusCode >= 400 {
			return fmt.Errorf("HTTP probe: %s", resp.Status)
		}
		return nil
	}
	return fmt.Errorf("no handler")
}
