package reconcile

import (
	"testing"

	"kmesh.dev/kmesh/ambient/state"
)

func TestKubernetesService(t *testing.T) {
	for _, tc := range []struct {
		name, ns, host, domain string
		want                   bool
	}{
		{"web", "shop", "web.shop.svc.cluster.local", "", true},
		{"web", "shop", "web.shop.svc.corp.example", "corp.example", true},
		{"web", "shop", "web.shop.svc.cluster.local", "corp.example", false}, // another cluster's domain
		{"api", "shop", "api.example.com", "", false},                        // a ServiceEntry host
		{"se", "shop", "web.shop.svc.cluster.local", "", false},              // a ServiceEntry shadowing a Service's name
		{"", "shop", ".shop.svc.cluster.local", "", false},
	} {
		s := &state.Service{Name: tc.name, Namespace: tc.ns, Hostname: tc.host}
		if got := kubernetesService(s, tc.domain); got != tc.want {
			t.Errorf("%s/%s host %s domain %q: %v, want %v", tc.ns, tc.name, tc.host, tc.domain, got, tc.want)
		}
	}
}
