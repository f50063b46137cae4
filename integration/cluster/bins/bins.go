// Package bins builds and caches the real control-plane binaries the
// cluster tier runs: etcd, kube-apiserver and kube-controller-manager from
// the nested module integration/cluster/tools (kubernetes' replace
// directives stay out of Kmesh's go.mod), pilot-discovery and istioctl from
// Kmesh's own module (the Istio release Kmesh is built and tested against).
//
// Binaries live in a cache that survives between runs on one machine
// ($KMESH_CLUSTER_CACHE, default /var/cache/kmesh-cluster-bins), one
// directory per binary and key. The key hashes the Go version, target,
// package, linker flags, every module version of the building module's
// build list (go list -m all) and the tools module's own source, so
// changing any pinned version or the toolchain builds again; Go's build
// cache keeps a rebuild short.
package bins

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"
)

// The binaries, by name.
const (
	Etcd                  = "etcd"
	KubeAPIServer         = "kube-apiserver"
	KubeControllerManager = "kube-controller-manager"
	KubeScheduler         = "kube-scheduler"
	PilotDiscovery        = "pilot-discovery"
	Istioctl              = "istioctl"
	// InstallCNI is the istio-cni-node DaemonSet's program (install-cni:
	// the CNI config installer and Istio's CNI node agent); IstioCNI is the
	// chained CNI plugin it installs, which a kubelet's runtime runs.
	InstallCNI = "install-cni"
	IstioCNI   = "istio-cni"
)

// All is every binary, in the order they are built.
var All = []string{Etcd, KubeAPIServer, KubeControllerManager, KubeScheduler, PilotDiscovery, Istioctl, InstallCNI, IstioCNI}

// CacheEnv names the variable that moves the cache.
const CacheEnv = "KMESH_CLUSTER_CACHE"

// DefaultCache is the cache without CacheEnv.
const DefaultCache = "/var/cache/kmesh-cluster-bins"

// ToolsDir is the nested module, relative to the repository root.
const ToolsDir = "integration/cluster/tools"

type spec struct {
	tools bool   // built in ToolsDir, else in the main module
	pkg   string // import path
	// k8sVersion: stamp k8s.io/component-base/version with the kubernetes
	// module's version (/version is bogus otherwise).
	k8sVersion bool
}

var specs = map[string]spec{
	Etcd:                  {tools: true, pkg: "kmesh.dev/kmesh/integration/cluster/tools/etcd"},
	KubeAPIServer:         {tools: true, pkg: "k8s.io/kubernetes/cmd/kube-apiserver", k8sVersion: true},
	KubeControllerManager: {tools: true, pkg: "k8s.io/kubernetes/cmd/kube-controller-manager", k8sVersion: true},
	KubeScheduler:         {tools: true, pkg: "k8s.io/kubernetes/cmd/kube-scheduler", k8sVersion: true},
	PilotDiscovery:        {pkg: "istio.io/istio/pilot/cmd/pilot-discovery"},
	InstallCNI:            {pkg: "istio.io/istio/cni/cmd/install-cni"},
	IstioCNI:              {pkg: "istio.io/istio/cni/cmd/istio-cni"},
	Istioctl:              {pkg: "istio.io/istio/istioctl/cmd/istioctl"},
}

// CacheDir is where binaries are cached.
func CacheDir() string {
	if d := os.Getenv(CacheEnv); d != "" {
		return d
	}
	return DefaultCache
}

// RepoRoot finds the Kmesh module's root from the working directory.
func RepoRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("not inside the kmesh.dev/kmesh module (go env GOMOD is empty)")
	}
	return filepath.Dir(mod), nil
}

// Builder builds binaries into the cache.
type Builder struct {
	Root  string // repository root
	Cache string // cache directory
	// Log, if set, is told about each build (they take minutes cold).
	Log func(format string, args ...any)

	memo map[string]string // go command answers, by directory and question
}

// New returns a Builder for the repository holding the working directory.
func New() (*Builder, error) {
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	return &Builder{Root: root, Cache: CacheDir()}, nil
}

// Path returns the cached binary name, building it first if the cache has
// no binary for its current key.
func (b *Builder) Path(name string) (string, error) {
	s, ok := specs[name]
	if !ok {
		return "", fmt.Errorf("no such cluster binary %q", name)
	}
	dir := b.Root
	if s.tools {
		dir = filepath.Join(b.Root, ToolsDir)
	}
	args := []string{"build"}
	if s.k8sVersion {
		v, err := b.goOutput(dir, "list", "-m", "-f", "{{.Version}}", "k8s.io/kubernetes")
		if err != nil {
			return "", fmt.Errorf("finding the kubernetes version for %s: %w", name, err)
		}
		major, minor, _ := strings.Cut(strings.TrimPrefix(v, "v"), ".")
		minor, _, _ = strings.Cut(minor, ".")
		const p = "k8s.io/component-base/version."
		args = append(args, "-ldflags", fmt.Sprintf("-X %sgitVersion=%s -X %sgitMajor=%s -X %sgitMinor=%s", p, v, p, major, p, minor))
	}
	key, err := b.key(name, dir, s, args)
	if err != nil {
		return "", err
	}
	out := filepath.Join(b.Cache, name+"-"+key, name)
	if isExec(out) {
		touch(filepath.Dir(out))
		return out, nil
	}
	if err := os.MkdirAll(b.Cache, 0o755); err != nil {
		return "", fmt.Errorf("cluster binary cache %s (set %s to move it): %w", b.Cache, CacheEnv, err)
	}
	// One builder at a time per cache: a second test binary or make
	// cluster-bins waits, then finds the binary built.
	unlock, err := lock(filepath.Join(b.Cache, ".lock"))
	if err != nil {
		return "", err
	}
	defer unlock()
	if isExec(out) {
		return out, nil
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return "", err
	}
	tmp := out + ".tmp"
	args = append(args, "-o", tmp, s.pkg)
	cmd := exec.Command("go", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOWORK=off")
	if b.Log != nil {
		b.Log("building %s (cold: minutes): (cd %s && go %s)", name, dir, strings.Join(args, " "))
	}
	start := time.Now()
	if o, err := cmd.CombinedOutput(); err != nil {
		_ = os.Remove(tmp)
		return "", fmt.Errorf("building %s failed: (cd %s && go %s): %w\n%s", name, dir, strings.Join(args, " "), err, tail(o, 4000))
	}
	if err := os.Rename(tmp, out); err != nil {
		return "", err
	}
	if b.Log != nil {
		b.Log("built %s in %s: %s", name, time.Since(start).Round(time.Second), out)
	}
	b.prune(name, filepath.Dir(out))
	return out, nil
}

// Unused is how long a cached binary may go unused before a build of the
// same binary removes it. Worktrees pinning other versions share the
// cache, so only long-unused keys go.
const Unused = 14 * 24 * time.Hour

// touch marks a cached binary used.
func touch(dir string) {
	now := time.Now()
	_ = os.Chtimes(dir, now, now)
}

// prune removes the other keys of name not used for Unused (called with
// the cache locked).
func (b *Builder) prune(name, keep string) {
	dirs, _ := filepath.Glob(filepath.Join(b.Cache, name+"-*"))
	for _, d := range dirs {
		st, err := os.Stat(d)
		if err != nil || d == keep || !st.IsDir() || time.Since(st.ModTime()) < Unused {
			continue
		}
		if err := os.RemoveAll(d); err == nil && b.Log != nil {
			b.Log("removed %s, unused since %s", d, st.ModTime().Format(time.DateOnly))
		}
	}
}

// Paths returns every named binary (building what is missing).
func (b *Builder) Paths(names ...string) (map[string]string, error) {
	m := map[string]string{}
	for _, n := range names {
		p, err := b.Path(n)
		if err != nil {
			return nil, err
		}
		m[n] = p
	}
	return m, nil
}

func (b *Builder) key(name, dir string, s spec, args []string) (string, error) {
	gover, err := b.goOutput(dir, "env", "GOVERSION")
	if err != nil {
		return "", fmt.Errorf("go env GOVERSION: %w", err)
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%s\x00%s/%s\x00%s\x00%q\x00", name, gover, runtime.GOOS, runtime.GOARCH, s.pkg, args)
	// Every module version the build can see (replacements included):
	// what the binary links is among them. go.sum is left out, its
	// lines change without any version moving.
	mods, err := b.goOutput(dir, "list", "-m", "all")
	if err != nil {
		return "", fmt.Errorf("keying %s: %w", name, err)
	}
	fmt.Fprintf(h, "modules\x00%s\x00", mods)
	var files []string
	if s.tools {
		files = append(files, "etcd/main.go")
	}
	for _, f := range files {
		c, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			return "", fmt.Errorf("keying %s: %w", name, err)
		}
		fmt.Fprintf(h, "%s\x00%d\x00", f, len(c))
		h.Write(c)
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// goOutput runs the go command in dir, once per Builder for each question.
func (b *Builder) goOutput(dir string, args ...string) (string, error) {
	k := dir + "\x00" + strings.Join(args, "\x00")
	if v, ok := b.memo[k]; ok {
		return v, nil
	}
	v, err := goOutput(dir, args...)
	if err != nil {
		return "", err
	}
	if b.memo == nil {
		b.memo = map[string]string{}
	}
	b.memo[k] = v
	return v, nil
}

func goOutput(dir string, args ...string) (string, error) {
	cmd := exec.Command("go", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOWORK=off")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("(cd %s && go %s): %w: %s", dir, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimSpace(string(out)), nil
}

func isExec(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

func lock(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	return func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}

func tail(b []byte, n int) string {
	s := strings.TrimSpace(string(b))
	if len(s) > n {
		s = "..." + s[len(s)-n:]
	}
	return s
}
