package charttest

import (
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"

	"kmesh.dev/kmesh/ambient/config"
)

// TestSidecarSplice: off by default (no RBAC, no API token, no host /proc,
// no SYS_PTRACE); sidecarSplice.enabled turns on exactly what the daemon's
// watch and netns lookup need: read-only pods and namespaces, the token,
// the host's /proc read-only, SYS_PTRACE, and the two settings it reads.
func TestSidecarSplice(t *testing.T) {
	caps := func(o objects) []corev1.Capability { return o.proxy(t).SecurityContext.Capabilities.Add }
	off := mustRender(t, "")
	if slices.Contains(caps(off), "SYS_PTRACE") {
		t.Error("SYS_PTRACE by default")
	}
	if _, ok := envOf(t, off.proxy(t))["KMESH_SIDECAR_SPLICE"]; ok {
		t.Error("KMESH_SIDECAR_SPLICE set by default")
	}

	o := mustRender(t, "sidecarSplice: {enabled: true}")
	env := envOf(t, o.proxy(t))
	if env["KMESH_SIDECAR_SPLICE"].value != "true" || env["KMESH_HOST_PROC"].value != "/host/proc" {
		t.Errorf("env %v %v", env["KMESH_SIDECAR_SPLICE"], env["KMESH_HOST_PROC"])
	}
	known := config.EnvNames()
	for _, k := range []string{"KMESH_SIDECAR_SPLICE", "KMESH_HOST_PROC"} {
		if !slices.Contains(known, k) {
			t.Errorf("%s is not a setting the daemon reads", k)
		}
	}
	if a := o.ds.Spec.Template.Spec.AutomountServiceAccountToken; a == nil || !*a {
		t.Error("no API token mounted")
	}
	if !slices.Contains(caps(o), "SYS_PTRACE") {
		t.Error("no SYS_PTRACE")
	}
	m, v := mountOf(t, o, "host-proc")
	if m.MountPath != "/host/proc" || !m.ReadOnly || v.HostPath == nil || v.HostPath.Path != "/proc" {
		t.Errorf("host /proc mount %+v volume %+v", m, v)
	}
	var role *rbacv1.ClusterRole
	var binding *rbacv1.ClusterRoleBinding
	for _, obj := range o.all {
		switch x := obj.(type) {
		case *rbacv1.ClusterRole:
			role = x
		case *rbacv1.ClusterRoleBinding:
			binding = x
		}
	}
	if role == nil || binding == nil {
		t.Fatalf("no ClusterRole and binding rendered:\n%s", o.raw)
	}
	for _, r := range role.Rules {
		if !slices.Equal(r.APIGroups, []string{""}) || !slices.Equal(r.Verbs, []string{"get", "list", "watch"}) {
			t.Errorf("rule %+v: want read-only on the core group", r)
		}
		for _, res := range r.Resources {
			if res != "pods" && res != "namespaces" {
				t.Errorf("rule grants %s", res)
			}
		}
	}
	if binding.RoleRef.Name != role.Name || len(binding.Subjects) != 1 || binding.Subjects[0].Name != o.sa.Name || binding.Subjects[0].Namespace != o.sa.Namespace {
		t.Errorf("binding %+v does not bind the role to the daemon's ServiceAccount", binding)
	}
}
