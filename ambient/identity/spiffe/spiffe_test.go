package spiffe

import (
	"errors"
	"testing"
)

func TestParse(t *testing.T) {
	good := Identity{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "sleep"}
	for _, tc := range []struct {
		in   string
		want Identity
		ok   bool
	}{
		{"spiffe://cluster.local/ns/default/sa/sleep", good, true},
		{"spiffe://td_1.example-2/ns/Ns.1/sa/S_a-2", Identity{"td_1.example-2", "Ns.1", "S_a-2"}, true},
		{"", Identity{}, false},
		{"spiffe://cluster.local/ns/default/sa/", Identity{}, false},
		{"spiffe://cluster.local/ns//sa/sleep", Identity{}, false},
		{"spiffe:///ns/default/sa/sleep", Identity{}, false},
		{"SPIFFE://cluster.local/ns/default/sa/sleep", Identity{}, false},
		{"spiffe://Cluster.local/ns/default/sa/sleep", Identity{}, false},
		{"spiffe://cluster.local:443/ns/default/sa/sleep", Identity{}, false},
		{"spiffe://user@cluster.local/ns/default/sa/sleep", Identity{}, false},
		{"spiffe://cluster.local/ns/default/sa/sleep/", Identity{}, false},
		{"spiffe://cluster.local/ns/default/sa/sleep?x=1", Identity{}, false},
		{"spiffe://cluster.local/ns/default/sa/sleep#f", Identity{}, false},
		{"spiffe://cluster.local/ns/def%61ult/sa/sleep", Identity{}, false},
		{"spiffe://cluster.local/ns/../sa/sleep", Identity{}, false},
		{"spiffe://cluster.local/sa/sleep/ns/default", Identity{}, false},
		{"spiffe://cluster.local/ns/default/sa/sleep/extra/x", Identity{}, false},
		{"https://cluster.local/ns/default/sa/sleep", Identity{}, false},
	} {
		got, err := Parse(tc.in)
		if tc.ok != (err == nil) || got != tc.want {
			t.Errorf("Parse(%q) = %+v, %v; want %+v ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrBadIdentity) {
			t.Errorf("Parse(%q) error %v does not wrap ErrBadIdentity", tc.in, err)
		}
		if err == nil && got.String() != tc.in {
			t.Errorf("String() = %q, want %q", got.String(), tc.in)
		}
	}
}

func TestPrincipal(t *testing.T) {
	id := Identity{"td", "ns", "sa"}
	if got := id.Principal(); got != "td/ns/ns/sa/sa" {
		t.Errorf("principal %q", got)
	}
	if got := id.String(); got != "spiffe://td/ns/ns/sa/sa" {
		t.Errorf("identity %q", got)
	}
}
