package agent

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/pprof"
	"net/url"
	"slices"
	"strings"
	"time"

	"kmesh.dev/kmesh/ambient/configdump"
	"kmesh.dev/kmesh/ambient/telemetry"
)

// admin serves the admin port (15000, localhost) as ztunnel's does, so
// that `istioctl ztunnel-config` works against a Kmesh node:
//
//   - /config_dump: ztunnel's format (ambient/configdump);
//   - /kmesh/config_dump: Kmesh's own view of the state (the store as it
//     is, with the fields the data path uses);
//   - /logging: the daemon's log level, read and changed at runtime;
//   - /quitquitquit: a graceful shutdown, as SIGTERM;
//   - /debug/pprof/: profiles (safe on localhost, and what memory and CPU
//     questions need).
//
// What the handlers read is passed as functions so that they are tested
// without a kernel or a control plane.
type admin struct {
	// dump gathers what /config_dump renders.
	dump func() configdump.Input
	// kmesh is Kmesh's own dump.
	kmesh func() any
	// level is the running level (nil: the logger's level is fixed, and
	// /logging says so); def is the configured one, restored by reset.
	level *slog.LevelVar
	def   slog.Level
	// quit starts the graceful shutdown; called at most once.
	quit func()
	log  *slog.Logger
}

// adminPaths are the admin port's pages, listed at "/" (ztunnel's
// dashboard lists its own).
var adminPaths = []struct{ path, what string }{
	{"/config_dump", "the node's view of the mesh, in ztunnel's format (istioctl ztunnel-config)"},
	{"/kmesh/config_dump", "the same state in Kmesh's own format"},
	{"/logging", "the log level; POST ?level=error|warn|info|debug|trace|off changes it, POST ?reset restores it"},
	{"/quitquitquit", "POST: shut down gracefully, as SIGTERM"},
	{"/debug/pprof/", "Go profiles"},
}

func (ad *admin) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/{$}", func(w http.ResponseWriter, _ *http.Request) {
		for _, p := range adminPaths {
			fmt.Fprintf(w, "%-20s %s\n", p.path, p.what)
		}
	})
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/config_dump", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, configdump.Build(ad.dump()))
	})
	mux.HandleFunc("/kmesh/config_dump", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, ad.kmesh())
	})
	mux.HandleFunc("/logging", ad.logging)
	mux.HandleFunc("/quitquitquit", func(w http.ResponseWriter, r *http.Request) {
		// POST only, as ztunnel: a GET from a browser or a crawler of the
		// admin page must not stop the node proxy.
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", http.MethodPost)
			http.Error(w, "use POST to shut the daemon down", http.StatusMethodNotAllowed)
			return
		}
		ad.log.Warn("shutdown requested on the admin port (/quitquitquit)", "from", r.RemoteAddr)
		ad.quit()
		fmt.Fprintln(w, "shutdown now")
	})
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// loggingHelp is ztunnel's usage text, with Kmesh's one difference: one
// level for the whole daemon, no per-module levels.
const loggingHelp = `
usage: POST /logging                       (to list the current level; GET works too)
usage: POST /logging?level=<level>         (to change the level)
usage: POST /logging?reset                 (to restore the configured level)

hint: level: error|warn|info|debug|trace|off
hint: Kmesh has one level for the whole daemon: per-module levels (mod:level) are not supported
`

func (ad *admin) logging(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost && r.Method != http.MethodGet {
		http.Error(w, "Invalid HTTP method\n"+loggingHelp, http.StatusMethodNotAllowed)
		return
	}
	if ad.level == nil {
		http.Error(w, "this daemon's log level cannot change at runtime", http.StatusNotImplemented)
		return
	}
	q := r.URL.Query()
	if r.Method == http.MethodGet && (q.Has("level") || q.Has("reset")) {
		// A change is a POST: a link followed by a browser does not turn
		// debug logging on for the node.
		http.Error(w, "use POST to change the level\n"+loggingHelp, http.StatusMethodNotAllowed)
		return
	}
	cur := ad.level.Level()
	next, err := loggingRequest(q, cur, ad.def)
	if err != nil {
		http.Error(w, err.Error()+"\n"+loggingHelp, http.StatusBadRequest)
		return
	}
	if next != cur {
		// Logged while the more verbose of the two levels is in force, so
		// that whoever reads the log learns why its volume changed.
		say := func() {
			ad.log.Log(r.Context(), max(min(cur, next), slog.LevelInfo), "log level changed on the admin port", "from", LevelName(cur), "to", LevelName(next))
		}
		if next < cur {
			ad.level.Set(next)
			say()
		} else {
			say()
			ad.level.Set(next)
		}
	}
	fmt.Fprintf(w, "current log level is %s\n", LevelName(next))
}

// loggingRequest decides the level a /logging query asks for: reset
// restores def, then level, when not empty, sets the level. A query with
// neither lists the level (cur). A module-qualified level (mod:level,
// mod=level) is refused: Kmesh has one level.
func loggingRequest(q url.Values, cur, def slog.Level) (slog.Level, error) {
	next := cur
	if q.Has("reset") {
		next = def
	}
	v := q.Get("level")
	if v == "" {
		return next, nil
	}
	var global *slog.Level
	for _, part := range strings.Split(v, ",") {
		if strings.ContainsAny(part, ":=") {
			return cur, fmt.Errorf("per-module level %q: Kmesh has one log level for the whole daemon; use level=<level>", part)
		}
		l, err := ParseLevel(part)
		if err != nil {
			return cur, err
		}
		global = &l
	}
	return *global, nil
}

// LevelOff is a level above every record's: nothing is logged.
const LevelOff = slog.Level(1 << 20)

// levelTrace is ztunnel's trace: below debug.
const levelTrace = slog.LevelDebug - 4

var errLevel = errors.New("unknown log level")

// ParseLevel reads a level in ztunnel's words (error, warn, info, debug,
// trace, off; istioctl's warning and critical too) or slog's (INFO+2).
func ParseLevel(s string) (slog.Level, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "trace":
		return levelTrace, nil
	case "warning":
		return slog.LevelWarn, nil
	case "critical":
		return slog.LevelError, nil
	case "off":
		return LevelOff, nil
	}
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("%w %q: one of error, warn, info, debug, trace, off", errLevel, s)
	}
	return l, nil
}

// LevelName writes a level as ParseLevel reads it, in ztunnel's words.
func LevelName(l slog.Level) string {
	switch {
	case l == levelTrace:
		return "trace"
	case l >= LevelOff:
		return "off"
	}
	return strings.ToLower(l.String())
}

// dumpInput gathers the state, certificates and enrolled pods for
// /config_dump.
func (a *Agent) dumpInput() configdump.Input {
	in := configdump.Input{State: a.Store.Snapshot(), Now: time.Now()}
	if ids := a.certs.Load(); ids != nil {
		in.Certificates = ids.Held()
	}
	if e := a.enrolled.Load(); e != nil {
		var conns []telemetry.ConnInfo
		if p := a.proxy.Load(); p != nil {
			conns = p.Connections()
		}
		conns = append(conns, a.kernelTel.Load().Connections()...)
		in.Pods = e.dumpPods(a.cfg.TrustDomain, conns)
	}
	return in
}

// podConnections sorts connections into their pods' lists: the node
// proxy's by pod UID, the kernel path's by namespace cookie.
func podConnections(conns []telemetry.ConnInfo, cookieToUID map[uint64]string) map[string]*configdump.Connections {
	out := map[string]*configdump.Connections{}
	for _, c := range conns {
		uid := c.Pod
		if uid == "" {
			uid = cookieToUID[c.Netns]
		}
		if uid == "" {
			continue
		}
		pc := out[uid]
		if pc == nil {
			pc = &configdump.Connections{}
			out[uid] = pc
		}
		dc := configdump.Connection{Src: c.Src, OriginalDst: c.OriginalDst, ActualDst: c.ActualDst, Protocol: c.Protocol}
		if c.Inbound {
			pc.Inbound = append(pc.Inbound, dc)
		} else {
			pc.Outbound = append(pc.Outbound, dc)
		}
	}
	for _, pc := range out {
		for _, l := range [][]configdump.Connection{pc.Inbound, pc.Outbound} {
			slices.SortFunc(l, func(a, b configdump.Connection) int {
				return cmp.Or(cmp.Compare(a.Src, b.Src), cmp.Compare(a.OriginalDst, b.OriginalDst), cmp.Compare(a.ActualDst, b.ActualDst))
			})
		}
	}
	return out
}

// dumpPods lists the enrolled pods. A pod is in the map only once its
// listeners are open and the kernel redirects it: ztunnel's "Up".
func (e *enroller) dumpPods(trustDomain string, conns []telemetry.ConnInfo) []configdump.Pod {
	e.mu.Lock()
	defer e.mu.Unlock()
	cookies := make(map[uint64]string, len(e.pods))
	for uid, p := range e.pods {
		cookies[p.cookie] = uid
	}
	byPod := podConnections(conns, cookies)
	out := make([]configdump.Pod, 0, len(e.pods))
	for uid, p := range e.pods {
		sa := p.info.GetServiceAccount()
		if sa == "" {
			sa = "default"
		}
		pod := configdump.Pod{UID: uid, Name: p.info.GetName(), Namespace: p.info.GetNamespace(),
			ServiceAccount: sa, TrustDomain: trustDomain, State: "Up", NetnsCookie: p.cookie}
		if c := byPod[uid]; c != nil {
			pod.Connections = *c
		}
		out = append(out, pod)
	}
	return out
}
