package sim

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
)

func TestExpand(t *testing.T) {
	env := []string{"A=1", "B=two", "A=3"}
	for _, c := range []struct{ in, want string }{
		{"plain", "plain"},
		{"$(A)", "3"}, // the later definition wins
		{"x$(B)y", "xtwoy"},
		{"$(MISSING)", "$(MISSING)"},
		{"$$(A)", "$(A)"},
		{"$$", "$"},
		{"$(A", "$(A"},
		{"$A", "$A"},
		{"cost $", "cost $"},
		{"$(A)$(B)", "3two"},
	} {
		if got := expand(c.in, env); got != c.want {
			t.Errorf("expand(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

func TestResourceField(t *testing.T) {
	ctr := corev1.Container{Resources: corev1.ResourceRequirements{
		Limits:   corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("1500m"), corev1.ResourceMemory: resource.MustParse("1Gi")},
		Requests: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("100Mi")},
	}}
	none := corev1.Container{}
	for _, c := range []struct {
		ctr      corev1.Container
		res, div string
		want     string
	}{
		{ctr, "limits.cpu", "1", "2"},     // rounded up
		{ctr, "limits.cpu", "1m", "1500"}, // in millicores
		{ctr, "limits.memory", "1Mi", "1024"},
		{ctr, "requests.memory", "1", "104857600"},
		{ctr, "requests.cpu", "1", "0"}, // no request
		{none, "limits.cpu", "1", "4"},  // no limit: the node's allocatable
		{none, "limits.memory", "1Gi", "16"},
	} {
		got, err := resourceField(c.ctr, &corev1.ResourceFieldSelector{Resource: c.res, Divisor: resource.MustParse(c.div)})
		if err != nil || got != c.want {
			t.Errorf("%s / %s = %q, %v; want %q", c.res, c.div, got, err, c.want)
		}
	}
	if _, err := resourceField(ctr, &corev1.ResourceFieldSelector{Resource: "cpu"}); err == nil {
		t.Error("a resource without limits./requests. was accepted")
	}
}

func TestHostFile(t *testing.T) {
	x := &extNode{hostDir: "/r/n/host", pinDir: "/sys/fs/bpf/kmesh-sim/id/n", cgroupDir: "/sys/fs/cgroup/kmesh-sim-id/n"}
	for in, want := range map[string]string{
		"/var/run/ztunnel":  "/r/n/host/run/ztunnel",
		"/run/netns":        "/r/n/host/run/netns",
		"/var/runx":         "/r/n/host/var/runx",
		"/etc/cni/net.d":    "/r/n/host/etc/cni/net.d",
		"/sys/fs/bpf":       "/sys/fs/bpf/kmesh-sim/id/n",
		"/sys/fs/bpf/kmesh": "/sys/fs/bpf/kmesh-sim/id/n/kmesh",
		"/sys/fs/cgroup":    "/sys/fs/cgroup/kmesh-sim-id/n",
		"/../../etc/passwd": "/r/n/host/etc/passwd", // never outside the host directory
		"relative/../x":     "/r/n/host/x",
	} {
		if got := x.hostFile(in); got != want {
			t.Errorf("hostFile(%q) = %q, want %q", in, got, want)
		}
	}
}
