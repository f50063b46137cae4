package installtest

import (
	"fmt"
	"regexp"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"

	"istio.io/istio/operator/pkg/render"
)

// objects are rendered manifests by "Kind/namespace/name".
type objects map[string]*unstructured.Unstructured

// renderProfile renders profile from the assembled install package, with
// extra --set flags.
func renderProfile(t *testing.T, profile string, sets ...string) objects {
	t.Helper()
	objs, err := renderSets(append([]string{"installPackagePath=" + installPackage(t), "profile=" + profile}, sets...)...)
	if err != nil {
		t.Fatalf("rendering profile %s: %v", profile, err)
	}
	return objs
}

// renderSets renders like `istioctl manifest generate --set <sets>...`
// (istioctl's --manifests <dir> is an alias for --set installPackagePath=<dir>)
// and indexes the objects by "Kind/namespace/name".
func renderSets(sets ...string) (objects, error) {
	mss, _, err := render.GenerateManifest(nil, sets, false, nil, nil)
	if err != nil {
		return nil, err
	}
	objs := objects{}
	for _, ms := range mss {
		for _, m := range ms.Manifests {
			key := fmt.Sprintf("%s/%s/%s", m.GetKind(), m.GetNamespace(), m.GetName())
			if _, dup := objs[key]; dup {
				return nil, fmt.Errorf("%s rendered twice", key)
			}
			objs[key] = m.Unstructured
		}
	}
	return objs, nil
}

// daemonSet decodes the DaemonSet ns/name.
func (o objects) daemonSet(t *testing.T, ns, name string) *appsv1.DaemonSet {
	t.Helper()
	u, ok := o["DaemonSet/"+ns+"/"+name]
	if !ok {
		t.Fatalf("no DaemonSet %s/%s rendered (have %s)", ns, name, o.keys())
	}
	var ds appsv1.DaemonSet
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &ds); err != nil {
		t.Fatalf("decoding DaemonSet %s/%s: %v", ns, name, err)
	}
	return &ds
}

func (o objects) keys() string {
	var ks []string
	for k := range o {
		ks = append(ks, k)
	}
	return strings.Join(ks, ", ")
}

// container returns the named container of a pod template.
func container(t *testing.T, spec *corev1.PodSpec, name string) *corev1.Container {
	t.Helper()
	for i := range spec.Containers {
		if spec.Containers[i].Name == name {
			return &spec.Containers[i]
		}
	}
	t.Fatalf("no container %q in the pod template", name)
	return nil
}

var envRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)`)

// environment is what the container's process sees, as the kubelet builds
// it: literal values with $(VAR) expanded from variables defined earlier in
// the list (a reference to a later or missing one stays literal, which is
// reported in unresolved); valueFrom variables get a placeholder naming
// their source.
func environment(c *corev1.Container) (env map[string]string, unresolved []string) {
	env = map[string]string{}
	for _, e := range c.Env {
		if e.ValueFrom != nil {
			src := "valueFrom"
			switch {
			case e.ValueFrom.FieldRef != nil:
				src = e.ValueFrom.FieldRef.FieldPath
			case e.ValueFrom.ResourceFieldRef != nil:
				src = e.ValueFrom.ResourceFieldRef.Resource
			}
			env[e.Name] = "<" + src + ">"
			continue
		}
		env[e.Name] = envRef.ReplaceAllStringFunc(e.Value, func(ref string) string {
			name := envRef.FindStringSubmatch(ref)[1]
			if v, ok := env[name]; ok {
				return v
			}
			unresolved = append(unresolved, e.Name+" -> "+ref)
			return ref
		})
	}
	return env, unresolved
}
