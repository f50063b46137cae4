package identity

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

var sleepID = Identity{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "sleep"}

func TestParseCertChain(t *testing.T) {
	ca := newTestCA(t, "cluster.local", false)
	withInter := newTestCA(t, "cluster.local", true)
	other := newTestCA(t, "other", false)
	now := time.Now()
	key := mustKey(t)
	valid := func(ca *testCA, uris ...string) *x509.Certificate {
		if uris == nil {
			uris = []string{sleepID.String()}
		}
		return ca.issue(t, key.Public(), uris, now.Add(-2*time.Minute), now.Add(time.Hour))
	}
	leaf := valid(ca)
	for _, tc := range []struct {
		name  string
		chain []string
		key   crypto.Signer
		want  error // nil: success
	}{
		{"leaf and root", ca.response(leaf), key, nil},
		{"with intermediate", withInter.response(valid(withInter)), key, nil},
		{"leaf with its intermediate in one element", []string{pemOf(valid(withInter)) + pemOf(withInter.signer), pemOf(withInter.root)}, key, nil},
		{"two roots in the bundle", []string{pemOf(leaf), pemOf(other.root) + pemOf(ca.root)}, key, nil},
		{"empty", nil, key, ErrEmptyChain},
		{"leaf only", []string{pemOf(leaf)}, key, ErrMalformedChain},
		{"garbage", []string{"hello", pemOf(ca.root)}, key, ErrMalformedChain},
		{"text before PEM", []string{"x\n" + pemOf(leaf), pemOf(ca.root)}, key, ErrMalformedChain},
		{"truncated", []string{pemOf(leaf)[:200], pemOf(ca.root)}, key, ErrMalformedChain},
		{"key block", []string{pemOf(leaf), "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}, key, ErrMalformedChain},
		{"other key", ca.response(leaf), mustKey(t), ErrKeyMismatch},
		{"other identity", ca.response(valid(ca, "spiffe://cluster.local/ns/default/sa/other")), key, ErrIdentityMismatch},
		{"two identities", ca.response(valid(ca, sleepID.String(), "spiffe://cluster.local/ns/default/sa/other")), key, ErrIdentityMismatch},
		{"no identity", ca.response(ca.issue(t, key.Public(), nil, now.Add(-time.Minute), now.Add(time.Hour))), key, ErrIdentityMismatch},
		{"foreign root", []string{pemOf(leaf), pemOf(other.root)}, key, ErrUntrustedChain},
		{"intermediate missing", []string{pemOf(valid(withInter)), pemOf(withInter.root)}, key, ErrUntrustedChain},
		{"expired", ca.response(ca.issue(t, key.Public(), []string{sleepID.String()}, now.Add(-2*time.Hour), now.Add(-time.Hour))), key, ErrUntrustedChain},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseCertChain(tc.chain, tc.key, sleepID, now)
			if tc.want == nil {
				if err != nil {
					t.Fatal(err)
				}
				checkCert(t, c, tc.key, sleepID, now)
				return
			}
			var ce *ChainError
			if !errors.As(err, &ce) || !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want a ChainError wrapping %v", err, tc.want)
			}
			if c != nil {
				t.Fatal("certificate returned with an error")
			}
		})
	}
}

// checkCert asserts what every certificate ParseCertChain returns holds.
func checkCert(t *testing.T, c *Certificate, key crypto.Signer, want Identity, now time.Time) {
	t.Helper()
	if c.Identity != want || c.Leaf == nil || c.TLS.Leaf != c.Leaf || !bytes.Equal(c.TLS.Certificate[0], c.Leaf.Raw) {
		t.Fatalf("inconsistent certificate %+v", c)
	}
	if got, err := FromCertificate(c.Leaf); err != nil || got != want {
		t.Fatalf("leaf identity %v, %v", got, err)
	}
	if !key.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(c.Leaf.PublicKey) || c.TLS.PrivateKey != key {
		t.Fatal("leaf not for the key")
	}
	if !c.NotAfter.Equal(c.Leaf.NotAfter) || !now.Before(c.NotAfter) || len(c.Roots) == 0 {
		t.Fatalf("validity %v, roots %d", c.NotAfter, len(c.Roots))
	}
	for _, r := range c.Roots {
		if bytes.Equal(r.Raw, c.Leaf.Raw) {
			t.Fatal("leaf returned as a root")
		}
	}
}

func TestRefreshAt(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	mk := func(notBefore, notAfter, received time.Time) *Certificate {
		return &Certificate{Leaf: &x509.Certificate{NotBefore: notBefore}, NotAfter: notAfter, Received: received}
	}
	for _, tc := range []struct {
		name string
		c    *Certificate
		want time.Time
	}{
		{"half life", mk(t0, t0.Add(24*time.Hour), t0), t0.Add(12 * time.Hour)},
		{"backdated NotBefore counts from arrival", mk(t0.Add(-2*time.Minute), t0.Add(4*time.Second), t0), t0.Add(2 * time.Second)},
		{"arrived late", mk(t0, t0.Add(time.Hour), t0.Add(20*time.Minute)), t0.Add(40 * time.Minute)},
		{"nearly expired: not before a second", mk(t0, t0.Add(time.Second), t0.Add(900*time.Millisecond)), t0.Add(1900 * time.Millisecond)},
	} {
		if got := tc.c.RefreshAt(); !got.Equal(tc.want) {
			t.Errorf("%s: RefreshAt = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// The fuzz target reads one CA response: chain elements separated by NUL,
// checked against a fixed key and identity at a fixed time, so that the
// committed seeds (testdata/fuzz/FuzzParseCertChain) stay meaningful.
var (
	fuzzID  = Identity{TrustDomain: "cluster.local", Namespace: "fuzz", ServiceAccount: "fuzz"}
	fuzzNow = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
)

const fuzzKeyFile = "testdata/fuzz-key.pem"

func fuzzKey(t testing.TB) crypto.Signer {
	t.Helper()
	b, err := os.ReadFile(fuzzKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(b)
	if block == nil {
		t.Fatalf("%s: no PEM", fuzzKeyFile)
	}
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return key.(crypto.Signer)
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

// readSeed decodes a corpus file holding one []byte value.
func readSeed(t *testing.T, file string) []byte {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	lit, ok := strings.CutPrefix(strings.TrimSpace(string(b)), "go test fuzz v1\n[]byte(")
	if !ok || !strings.HasSuffix(lit, ")") {
		t.Fatalf("%s: not a one-[]byte corpus file", file)
	}
	s, err := strconv.Unquote(strings.TrimSuffix(lit, ")"))
	if err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	return []byte(s)
}

func FuzzParseCertChain(f *testing.F) {
	key := fuzzKey(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		chain := strings.Split(string(data), "\x00")
		if len(data) == 0 {
			chain = nil
		}
		c, err := ParseCertChain(chain, key, fuzzID, fuzzNow)
		if err != nil {
			var ce *ChainError
			if !errors.As(err, &ce) || c != nil {
				t.Fatalf("untyped error or certificate with error: %v", err)
			}
			return
		}
		checkCert(t, c, key, fuzzID, fuzzNow)
	})
}

// The seeds named valid-* must parse: they are what exercises the checks
// past PEM decoding.
func TestFuzzSeedsValid(t *testing.T) {
	key := fuzzKey(t)
	seeds, _ := filepath.Glob("testdata/fuzz/FuzzParseCertChain/valid-*")
	if len(seeds) == 0 {
		t.Fatal("no valid seeds")
	}
	for _, s := range seeds {
		data := readSeed(t, s)
		if _, err := ParseCertChain(strings.Split(string(data), "\x00"), key, fuzzID, fuzzNow); err != nil {
			t.Errorf("%s: %v", s, err)
		}
	}
}

var writeSeeds = flag.Bool("write-seeds", false, "regenerate the fuzz key and seed corpus under testdata")

// TestWriteFuzzSeeds regenerates testdata when run with -write-seeds.
func TestWriteFuzzSeeds(t *testing.T) {
	if !*writeSeeds {
		t.Skip("run with -write-seeds to regenerate the fuzz corpus")
	}
	key := mustKey(t)
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll("testdata/fuzz/FuzzParseCertChain", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(fuzzKeyFile, pemBlock("PRIVATE KEY", der), 0o644); err != nil {
		t.Fatal(err)
	}
	nb, na := time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC), time.Date(2120, 1, 1, 0, 0, 0, 0, time.UTC)
	ca := newTestCA(t, "cluster.local", false)
	inter := newTestCA(t, "cluster.local", true)
	join := func(s []string) []byte { return []byte(strings.Join(s, "\x00")) }
	valid := join(ca.response(ca.issue(t, key.Public(), []string{fuzzID.String()}, nb, na)))
	seeds := map[string][]byte{
		"valid-leaf-root":         valid,
		"valid-intermediate":      join(inter.response(inter.issue(t, key.Public(), []string{fuzzID.String()}, nb, na))),
		"truncated":               valid[:len(valid)/2],
		"garbage":                 []byte("\x00\x01not a certificate\x00-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
		"other-identity":          join(ca.response(ca.issue(t, key.Public(), []string{"spiffe://cluster.local/ns/fuzz/sa/other"}, nb, na))),
		"leaf-only":               []byte(ca.response(ca.issue(t, key.Public(), []string{fuzzID.String()}, nb, na))[0]),
		"expired":                 join(ca.response(ca.issue(t, key.Public(), []string{fuzzID.String()}, nb, nb.Add(time.Hour)))),
		"other-key":               join(ca.response(ca.issue(t, mustKey(t).Public(), []string{fuzzID.String()}, nb, na))),
		"untrusted-intermediates": join([]string{inter.response(inter.issue(t, key.Public(), []string{fuzzID.String()}, nb, na))[0], pemOf(inter.root)}),
	}
	for name, data := range seeds {
		content := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", data)
		if err := os.WriteFile(filepath.Join("testdata/fuzz/FuzzParseCertChain", name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
