package identity

import (
	"crypto/x509"
	"errors"
	"net/url"
	"testing"

	"kmesh.dev/kmesh/ambient/identity/spiffe"
)

func TestFromCertificate(t *testing.T) {
	u := func(s ...string) []*url.URL {
		var out []*url.URL
		for _, x := range s {
			p, err := url.Parse(x)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, p)
		}
		return out
	}
	id := "spiffe://cluster.local/ns/a/sa/b"
	for name, tc := range map[string]struct {
		uris []*url.URL
		ok   bool
	}{
		"one spiffe URI": {u(id), true},
		"no URI":         {nil, false},
		"two URIs":       {u(id, "spiffe://cluster.local/ns/a/sa/c"), false},
		"not spiffe":     {u("https://example.com/"), false},
	} {
		got, err := FromCertificate(&x509.Certificate{URIs: tc.uris, DNSNames: []string{"ignored.example"}})
		if tc.ok != (err == nil) || (tc.ok && got.String() != id) || (err != nil && !errors.Is(err, spiffe.ErrBadIdentity)) {
			t.Errorf("%s: got %v, %v", name, got, err)
		}
	}
	if _, err := FromCertificate(nil); err == nil {
		t.Error("nil certificate accepted")
	}
}
