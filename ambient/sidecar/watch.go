package sidecar

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"time"
)

// Watch feeds a Reconciler from the Kubernetes API: this node's pods
// (fieldSelector spec.nodeName) and the namespaces, each by list then
// watch, relisting after any error. Plain HTTP and JSON, a handful of
// fields: client-go would add over 200 packages to the daemon for two
// watches. RBAC: get, list, watch on pods and namespaces.
type Watch struct {
	// Server is the API server's base URL (https://host:port).
	Server string
	Client *http.Client
	// Token returns the bearer token (read per request: it rotates).
	Token func() (string, error)
	Node  string
	R     *Reconciler
	Log   *slog.Logger
	// MaxEvent bounds one watch event and MaxList one list response
	// (bytes); beyond them the stream is dropped and relisted.
	MaxEvent, MaxList int
	// Retry is how often pods whose network namespace was not found yet
	// are tried again, and the backoff after a failed list or watch.
	Retry time.Duration
}

type meta struct {
	UID             string            `json:"uid"`
	Name            string            `json:"name"`
	Namespace       string            `json:"namespace"`
	ResourceVersion string            `json:"resourceVersion"`
	Annotations     map[string]string `json:"annotations"`
}

type securityContextJSON struct {
	RunAsUser  *int64 `json:"runAsUser"`
	RunAsGroup *int64 `json:"runAsGroup"`
}

type containerJSON struct {
	Name            string               `json:"name"`
	SecurityContext *securityContextJSON `json:"securityContext"`
}

type podJSON struct {
	Metadata meta `json:"metadata"`
	Spec     struct {
		NodeName        string               `json:"nodeName"`
		HostNetwork     bool                 `json:"hostNetwork"`
		SecurityContext *securityContextJSON `json:"securityContext"`
		Containers      []containerJSON      `json:"containers"`
		InitContainers  []containerJSON      `json:"initContainers"`
	} `json:"spec"`
	Status struct {
		Phase  string `json:"phase"`
		PodIP  string `json:"podIP"`
		PodIPs []struct {
			IP string `json:"ip"`
		} `json:"podIPs"`
	} `json:"status"`
}

// proxyContainer is Istio's sidecar container's name (a native sidecar
// is an init container of that name).
const proxyContainer = "istio-proxy"

func (p podJSON) pod() Pod {
	out := Pod{UID: p.Metadata.UID, Namespace: p.Metadata.Namespace, Name: p.Metadata.Name, NodeName: p.Spec.NodeName,
		HostNetwork: p.Spec.HostNetwork, Running: p.Status.Phase == "Running", Annotations: p.Metadata.Annotations}
	ips := []string{p.Status.PodIP}
	for _, ip := range p.Status.PodIPs {
		ips = append(ips, ip.IP)
	}
	out.IPv4 = firstIPv4(ips...)
	// The sidecar's identity: its container's securityContext, else the
	// pod's (Kubernetes' precedence); unknown stays 0, which is not 1337.
	var uid, gid *int64
	if sc := p.Spec.SecurityContext; sc != nil {
		uid, gid = sc.RunAsUser, sc.RunAsGroup
	}
	for _, c := range append(p.Spec.Containers, p.Spec.InitContainers...) {
		if c.Name == proxyContainer && c.SecurityContext != nil {
			if c.SecurityContext.RunAsUser != nil {
				uid = c.SecurityContext.RunAsUser
			}
			if c.SecurityContext.RunAsGroup != nil {
				gid = c.SecurityContext.RunAsGroup
			}
		}
	}
	if uid != nil {
		out.ProxyUID = *uid
	}
	if gid != nil {
		out.ProxyGID = *gid
	}
	return out
}

type listJSON struct {
	Metadata struct {
		ResourceVersion string `json:"resourceVersion"`
	} `json:"metadata"`
	Items []json.RawMessage `json:"items"`
}

type eventJSON struct {
	Type   string          `json:"type"`
	Object json.RawMessage `json:"object"`
}

// errGone: the watch's resource version is too old (410): relist.
var errGone = errors.New("resource version gone")

// Run watches until ctx ends.
func (w *Watch) Run(ctx context.Context) {
	if w.MaxEvent == 0 {
		w.MaxEvent = 1 << 20
	}
	if w.MaxList == 0 {
		w.MaxList = 64 << 20
	}
	if w.Retry == 0 {
		w.Retry = 5 * time.Second
	}
	done := make(chan struct{})
	go func() { defer close(done); w.loop(ctx, "namespaces", "/api/v1/namespaces", nil, w.namespaces()) }()
	go func() {
		t := time.NewTicker(w.Retry)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				w.R.Retry()
			}
		}
	}()
	w.loop(ctx, "pods", "/api/v1/pods", url.Values{"fieldSelector": {"spec.nodeName=" + w.Node}}, w.pods())
	<-done
}

// handler applies one kind's objects: list (every object, in a relist:
// anything not listed is gone) or one watch event.
type handler struct {
	listed func(items []json.RawMessage) error
	event  func(typ string, obj json.RawMessage) error
}

func (w *Watch) pods() handler {
	known := map[string]bool{}
	apply := func(raw json.RawMessage) (Pod, error) {
		var p podJSON
		if err := json.Unmarshal(raw, &p); err != nil {
			return Pod{}, err
		}
		return p.pod(), nil
	}
	return handler{
		listed: func(items []json.RawMessage) error {
			seen := map[string]bool{}
			for _, raw := range items {
				p, err := apply(raw)
				if err != nil {
					return err
				}
				seen[p.UID] = true
				w.R.Pod(p)
			}
			for uid := range known {
				if !seen[uid] {
					w.R.PodGone(uid)
				}
			}
			known = seen
			w.R.Sweep()
			return nil
		},
		event: func(typ string, raw json.RawMessage) error {
			p, err := apply(raw)
			if err != nil {
				return err
			}
			if typ == "DELETED" {
				delete(known, p.UID)
				w.R.PodGone(p.UID)
				return nil
			}
			known[p.UID] = true
			w.R.Pod(p)
			return nil
		},
	}
}

func (w *Watch) namespaces() handler {
	known := map[string]bool{}
	apply := func(raw json.RawMessage) (Namespace, error) {
		var n struct {
			Metadata meta `json:"metadata"`
		}
		if err := json.Unmarshal(raw, &n); err != nil {
			return Namespace{}, err
		}
		return Namespace{Name: n.Metadata.Name, Annotations: n.Metadata.Annotations}, nil
	}
	return handler{
		listed: func(items []json.RawMessage) error {
			seen := map[string]bool{}
			for _, raw := range items {
				n, err := apply(raw)
				if err != nil {
					return err
				}
				seen[n.Name] = true
				w.R.Namespace(n)
			}
			for name := range known {
				if !seen[name] {
					w.R.NamespaceGone(name)
				}
			}
			known = seen
			return nil
		},
		event: func(typ string, raw json.RawMessage) error {
			n, err := apply(raw)
			if err != nil {
				return err
			}
			if typ == "DELETED" {
				delete(known, n.Name)
				w.R.NamespaceGone(n.Name)
				return nil
			}
			known[n.Name] = true
			w.R.Namespace(n)
			return nil
		},
	}
}

func (w *Watch) loop(ctx context.Context, kind, path string, q url.Values, h handler) {
	for ctx.Err() == nil {
		err := w.listWatch(ctx, path, q, h)
		if ctx.Err() != nil {
			return
		}
		w.log().Warn("watching the Kubernetes API for sidecar splicing; relisting", "kind", kind, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(w.Retry):
		}
	}
}

func (w *Watch) get(ctx context.Context, path string, q url.Values) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, w.Server+path+"?"+q.Encode(), nil)
	if err != nil {
		return nil, err
	}
	tok, err := w.Token()
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Accept", "application/json")
	resp, err := w.Client.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		if resp.StatusCode == http.StatusGone {
			return nil, errGone
		}
		return nil, fmt.Errorf("GET %s: %s: %s", path, resp.Status, b)
	}
	return resp, nil
}

func (w *Watch) listWatch(ctx context.Context, path string, base url.Values, h handler) error {
	q := url.Values{}
	for k, v := range base {
		q[k] = v
	}
	resp, err := w.get(ctx, path, q)
	if err != nil {
		return err
	}
	var l listJSON
	err = json.NewDecoder(io.LimitReader(resp.Body, int64(w.MaxList))).Decode(&l)
	resp.Body.Close()
	if err != nil {
		return fmt.Errorf("list %s: %w", path, err)
	}
	if err := h.listed(l.Items); err != nil {
		return err
	}
	q.Set("watch", "true")
	q.Set("allowWatchBookmarks", "true")
	q.Set("resourceVersion", l.Metadata.ResourceVersion)
	resp, err = w.get(ctx, path, q)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), w.MaxEvent)
	for sc.Scan() {
		var ev eventJSON
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return fmt.Errorf("watch %s: %w", path, err)
		}
		switch ev.Type {
		case "ADDED", "MODIFIED", "DELETED":
			if err := h.event(ev.Type, ev.Object); err != nil {
				return err
			}
		case "BOOKMARK":
		case "ERROR":
			// A Status; 410 Gone is the usual one: relist.
			return fmt.Errorf("watch %s: %s", path, ev.Object)
		}
	}
	if err := sc.Err(); err != nil {
		return err
	}
	return io.ErrUnexpectedEOF
}

func (w *Watch) log() *slog.Logger {
	if w.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return w.Log
}
