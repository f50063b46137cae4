package charttest

import (
	"fmt"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	kruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/yaml"

	"helm.sh/helm/v4/pkg/chart/common"
	"helm.sh/helm/v4/pkg/chart/common/util"
	chart "helm.sh/helm/v4/pkg/chart/v2"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	"helm.sh/helm/v4/pkg/engine"
)

// chartDir is manifests/charts/kmesh, found from this file.
func chartDir(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("no caller information")
	}
	return filepath.Join(filepath.Dir(file), "..", "..", "manifests", "charts", "kmesh")
}

func loadChart(t testing.TB) *chart.Chart {
	t.Helper()
	c, err := loader.Load(chartDir(t))
	if err != nil {
		t.Fatalf("loading the chart: %v", err)
	}
	return c
}

const (
	releaseName = "ztunnel"
	namespace   = "istio-system"
)

// render renders the chart as `helm install ztunnel <chart> -n istio-system
// -f <values>` would, schema validation included. values is YAML.
func render(t testing.TB, values string) (map[string]string, error) {
	t.Helper()
	c := loadChart(t)
	vals := map[string]any{}
	if err := yaml.Unmarshal([]byte(values), &vals); err != nil {
		t.Fatalf("values %q: %v", values, err)
	}
	top, err := util.ToRenderValues(c, vals, common.ReleaseOptions{Name: releaseName, Namespace: namespace, IsInstall: true, Revision: 1}, nil)
	if err != nil {
		return nil, err
	}
	return engine.Render(c, top)
}

// objects is what one rendering produced, decoded.
type objects struct {
	ds  *appsv1.DaemonSet
	sa  *corev1.ServiceAccount
	all []kruntime.Object
	// raw is the rendered YAML, for failure messages.
	raw string
}

// mustRender renders values and decodes every object into its typed form
// (strictly: a field the Kubernetes types do not have is an error).
func mustRender(t testing.TB, values string) objects {
	t.Helper()
	files, err := render(t, values)
	if err != nil {
		t.Fatalf("rendering with values %q: %v", values, err)
	}
	return decode(t, files)
}

func decode(t testing.TB, files map[string]string) objects {
	t.Helper()
	codecs := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict)
	dec := codecs.UniversalDeserializer()
	var o objects
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	var raw strings.Builder
	for _, n := range names {
		if strings.HasSuffix(n, "NOTES.txt") {
			continue
		}
		fmt.Fprintf(&raw, "# %s\n%s\n", n, files[n])
		for _, doc := range strings.Split(files[n], "\n---") {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			obj, _, err := dec.Decode([]byte(doc), nil, nil)
			if err != nil {
				t.Fatalf("decoding %s: %v\n%s", n, err, doc)
			}
			o.all = append(o.all, obj)
			switch v := obj.(type) {
			case *appsv1.DaemonSet:
				if o.ds != nil {
					t.Fatalf("two DaemonSets rendered")
				}
				o.ds = v
			case *corev1.ServiceAccount:
				if o.sa != nil {
					t.Fatalf("two ServiceAccounts rendered")
				}
				o.sa = v
			}
		}
	}
	o.raw = raw.String()
	if o.ds == nil || o.sa == nil {
		t.Fatalf("want a DaemonSet and a ServiceAccount, got %d objects:\n%s", len(o.all), o.raw)
	}
	return o
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, l := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

// proxy is the daemon's container: the first, as in ztunnel's chart
// (kubectl and Istio's tooling take the first container by default).
func (o objects) proxy(t testing.TB) *corev1.Container {
	t.Helper()
	cs := o.ds.Spec.Template.Spec.Containers
	if len(cs) == 0 || len(cs) > 2 {
		t.Fatalf("want the daemon's container and at most the listener holder's, got %d containers", len(cs))
	}
	return &cs[0]
}

// holder is the listener holder's container, nil when there is none.
func (o objects) holder(t testing.TB) *corev1.Container {
	t.Helper()
	cs := o.ds.Spec.Template.Spec.Containers
	for i := range cs[1:] {
		if cs[1+i].Name == "listener-holder" {
			return &cs[1+i]
		}
	}
	if len(cs) > 1 {
		t.Fatalf("second container %q is not the listener holder", cs[1].Name)
	}
	return nil
}
