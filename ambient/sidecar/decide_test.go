package sidecar

import "testing"

func TestDecide(t *testing.T) {
	injected := func(ann map[string]string) Pod {
		a := map[string]string{sidecarStatus: `{"containers":["istio-proxy"]}`}
		for k, v := range ann {
			a[k] = v
		}
		return Pod{UID: "u", Namespace: "ns", Name: "p", NodeName: "n1", Running: true, Annotations: a}
	}
	on := &Namespace{Name: "ns", Annotations: map[string]string{Annotation: "true"}}
	off := &Namespace{Name: "ns", Annotations: map[string]string{Annotation: "false"}}
	plain := &Namespace{Name: "ns"}
	for _, c := range []struct {
		name string
		pod  Pod
		ns   *Namespace
		want Reason
	}{
		{"pod opted in", injected(map[string]string{Annotation: "true"}), plain, Spliced},
		{"namespace opted in", injected(nil), on, Spliced},
		{"pod opts out of an opted-in namespace", injected(map[string]string{Annotation: "false"}), on, OptedOut},
		{"pod opts in inside an opted-out namespace", injected(map[string]string{Annotation: "true"}), off, Spliced},
		{"nothing said", injected(nil), plain, NotOptedIn},
		{"bad pod value fails closed", injected(map[string]string{Annotation: "yes"}), on, BadValue},
		{"bad namespace value fails closed", injected(nil), &Namespace{Annotations: map[string]string{Annotation: "True"}}, BadValue},
		{"namespace not known yet", injected(nil), nil, UnknownNS},
		{"pod's own answer needs no namespace", injected(map[string]string{Annotation: "true"}), nil, Spliced},
		{"no sidecar", Pod{NodeName: "n1", Running: true, Annotations: map[string]string{Annotation: "true"}}, on, NoSidecar},
		{"ambient pod", injected(map[string]string{Annotation: "true", ambientRedirection: "enabled"}), on, Ambient},
		{"host network", func() Pod { p := injected(map[string]string{Annotation: "true"}); p.HostNetwork = true; return p }(), on, HostNetwork},
		{"not running", func() Pod { p := injected(map[string]string{Annotation: "true"}); p.Running = false; return p }(), on, NotRunning},
		{"other node", func() Pod { p := injected(map[string]string{Annotation: "true"}); p.NodeName = "n2"; return p }(), on, OtherNode},
	} {
		if got := Decide(c.pod, c.ns, "n1"); got != c.want {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}
