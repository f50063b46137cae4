package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"kmesh.dev/kmesh/bpf"
)

// run executes kmeshctl with args as main does, minus the exit.
func run(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRoot()
	out := &bytes.Buffer{}
	root.SetOut(out)
	root.SetErr(out)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

func isUsage(err error) bool {
	var ue usageError
	return errors.As(err, &ue)
}

func TestUsage(t *testing.T) {
	out, err := run(t)
	if !isUsage(err) {
		t.Errorf("no command: %v, want a usage error (exit 2)", err)
	}
	for _, cmd := range []string{"version", "dump", "demo", "log", "completion"} {
		if !strings.Contains(out, cmd) {
			t.Errorf("usage does not list %s:\n%s", cmd, out)
		}
	}
	if _, err := run(t, "frobnicate"); !isUsage(err) || !strings.Contains(err.Error(), `unknown command "frobnicate"`) {
		t.Errorf("unknown command: %v", err)
	}
	if _, err := run(t, "version", "--no-such-flag"); !isUsage(err) {
		t.Errorf("unknown flag: %v, want a usage error", err)
	}
	if out, err := run(t, "--help"); err != nil || !strings.Contains(out, "dump") {
		t.Errorf("--help: %v\n%s", err, out)
	}
}

func TestVersion(t *testing.T) {
	out, err := run(t, "version")
	if want := fmt.Sprintf("kmeshctl dev (pin layout v%d)\n", bpf.PinLayout); err != nil || out != want {
		t.Errorf("version: %q, %v; want %q", out, err, want)
	}
}

// The demo's flags are the simulator's: kmeshctl passes them untouched,
// --help included.
func TestDemoPassesFlags(t *testing.T) {
	var got []string
	demoRun = func(args []string) error { got = args; return nil }
	t.Cleanup(func() { demoRun = runDemo })
	for _, args := range [][]string{{"--requests", "60", "--keep"}, {"--help"}, {}} {
		got = []string{"not called"}
		if _, err := run(t, append([]string{"demo"}, args...)...); err != nil {
			t.Fatal(err)
		}
		if len(args) == 0 && len(got) == 0 {
			continue
		}
		if !reflect.DeepEqual(got, args) {
			t.Errorf("kmeshctl demo %v ran the simulator with %v", args, got)
		}
	}
}

func TestPickMaps(t *testing.T) {
	names := []string{"kmesh_frontend", "kmesh_managed", "kmesh_stats"}
	for _, tc := range []struct {
		args []string
		want []string
		err  bool
	}{
		{nil, names, false},
		{[]string{"all"}, names, false},
		{[]string{"frontend"}, []string{"kmesh_frontend"}, false},
		{[]string{"frontends", "kmesh_managed"}, []string{"kmesh_frontend", "kmesh_managed"}, false}, // earlier versions' plurals
		{[]string{"stats"}, []string{"kmesh_stats"}, false},
		{[]string{"routes"}, nil, true},
	} {
		got, err := pickMaps(names, tc.args)
		if (err != nil) != tc.err || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%v: %v, %v; want %v (error %v)", tc.args, got, err, tc.want, tc.err)
		}
	}
}

var tables = []bpf.Table{
	{Map: "kmesh_frontend", Header: []string{"ADDRESS", "PORT", "SERVICE"}, Rows: [][]string{{"10.96.0.10", "80", "7"}, {"fd00::10", "80", "7"}}},
	{Map: "kmesh_udp", Note: "unused: affinity lives in socket storage"},
}

func TestDumpTable(t *testing.T) {
	var b bytes.Buffer
	if err := renderTable(&b, tables); err != nil {
		t.Fatal(err)
	}
	want := "# kmesh_frontend (2 entries)\n" +
		"ADDRESS     PORT  SERVICE\n" +
		"10.96.0.10  80    7\n" +
		"fd00::10    80    7\n" +
		"\n" +
		"# kmesh_udp (0 entries)\n" +
		"unused: affinity lives in socket storage\n"
	if b.String() != want {
		t.Errorf("table:\n%s\nwant\n%s", b.String(), want)
	}
	// One map: no heading, as before.
	b.Reset()
	_ = renderTable(&b, tables[:1])
	if strings.HasPrefix(b.String(), "#") {
		t.Errorf("one map printed a heading:\n%s", b.String())
	}
}

func TestDumpJSONAndYAML(t *testing.T) {
	want := []mapDump{
		{Map: "kmesh_frontend", Entries: []map[string]string{{"ADDRESS": "10.96.0.10", "PORT": "80", "SERVICE": "7"}, {"ADDRESS": "fd00::10", "PORT": "80", "SERVICE": "7"}}},
		{Map: "kmesh_udp", Note: "unused: affinity lives in socket storage", Entries: []map[string]string{}},
	}
	for _, format := range []string{"json", "yaml"} {
		var b bytes.Buffer
		if err := renderers[format](&b, tables); err != nil {
			t.Fatal(err)
		}
		raw := b.Bytes()
		if format == "yaml" {
			if bytes.HasPrefix(bytes.TrimSpace(raw), []byte("[")) {
				t.Errorf("-o yaml printed JSON:\n%s", raw)
			}
			var err error
			if raw, err = yaml.YAMLToJSON(raw); err != nil {
				t.Fatalf("-o yaml is not YAML: %v\n%s", err, b.String())
			}
		}
		var got []mapDump
		if err := json.Unmarshal(raw, &got); err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("-o %s read back as %+v (%v)\n%s", format, got, err, b.String())
		}
	}
}

func TestDumpRefusesUnknownFormat(t *testing.T) {
	// Refused before the maps are opened: no root, no daemon needed.
	_, err := run(t, "dump", "-o", "xml", "--pin-root", t.TempDir())
	if !isUsage(err) || !strings.Contains(err.Error(), "table, json, yaml") {
		t.Errorf("dump -o xml: %v", err)
	}
}

func TestCompletion(t *testing.T) {
	for shell, marker := range map[string]string{"bash": "__start_kmeshctl", "zsh": "#compdef kmeshctl", "fish": "complete -c kmeshctl"} {
		out, err := run(t, "completion", shell)
		if err != nil || !strings.Contains(out, marker) {
			t.Errorf("completion %s: %v, output lacks %q", shell, err, marker)
		}
	}
	// The shells ask kmeshctl itself for candidates: log's levels.
	out, err := run(t, "__complete", "log", "")
	if err != nil || !strings.Contains(out, "debug\n") || !strings.Contains(out, "trace\n") {
		t.Errorf("completing kmeshctl log: %v\n%s", err, out)
	}
}

// fakeDaemon answers /logging as the daemon's admin port does.
func fakeDaemon(t *testing.T) (addr string, got *[]string) {
	var reqs []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reqs = append(reqs, r.Method+" "+r.URL.RequestURI())
		if r.URL.Path != "/logging" || r.Method != http.MethodPost {
			http.NotFound(w, r)
			return
		}
		switch lvl := r.URL.Query().Get("level"); {
		case lvl == "loud":
			http.Error(w, `unknown log level "loud": one of error, warn, info, debug, trace, off`, http.StatusBadRequest)
		case lvl != "":
			fmt.Fprintf(w, "current log level is %s\n", lvl)
		case r.URL.Query().Has("reset"):
			fmt.Fprintln(w, "current log level is info")
		default:
			fmt.Fprintln(w, "current log level is warn")
		}
	}))
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String(), &reqs
}

func TestLog(t *testing.T) {
	addr, reqs := fakeDaemon(t)
	for _, tc := range []struct {
		args    []string
		request string
		out     string
	}{
		{[]string{"log"}, "POST /logging?", "current log level is warn\n"},
		{[]string{"log", "debug"}, "POST /logging?level=debug", "current log level is debug\n"},
		{[]string{"log", "--reset"}, "POST /logging?reset=", "current log level is info\n"},
	} {
		*reqs = nil
		out, err := run(t, append(tc.args, "--admin-addr", addr)...)
		if err != nil || out != tc.out || len(*reqs) != 1 || (*reqs)[0] != tc.request {
			t.Errorf("kmeshctl %v: %q, %v, requests %q; want %q after %q", tc.args, out, err, *reqs, tc.out, tc.request)
		}
	}
	// The daemon's refusal reaches the user with its reason.
	if _, err := run(t, "log", "loud", "--admin-addr", addr); err == nil || !strings.Contains(err.Error(), "one of error, warn") {
		t.Errorf("kmeshctl log loud: %v", err)
	}
	if _, err := run(t, "log", "debug", "--reset", "--admin-addr", addr); !isUsage(err) {
		t.Errorf("a level and --reset: %v, want a usage error", err)
	}
	// No daemon: the error says where kmeshctl looked.
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	gone := l.Addr().String()
	l.Close()
	if _, err := run(t, "log", "--admin-addr", gone); err == nil || !strings.Contains(err.Error(), "is kmesh-daemon running") || !strings.Contains(err.Error(), gone) {
		t.Errorf("no daemon: %v", err)
	}
}

func TestParseResponse(t *testing.T) {
	for _, tc := range []struct {
		raw  string
		code int
		body string
		err  bool
	}{
		{"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\ncurrent log level is info\n", 200, "current log level is info\n", false},
		{"HTTP/1.1 400 Bad Request\r\n\r\nno", 400, "no", false},
		{"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n", 0, "", true}, // cut before the body
		{"SSH-2.0-OpenSSH_9.6\r\n\r\n", 0, "", true},
		{"", 0, "", true},
	} {
		code, body, err := parseResponse(tc.raw)
		if code != tc.code || body != tc.body || (err != nil) != tc.err {
			t.Errorf("%q: %d %q %v", tc.raw, code, body, err)
		}
	}
}
