// Package installpkg assembles an istioctl install package (the directory
// given to `istioctl --manifests`): the manifests/ tree of the istio.io/istio
// module this repository pins, plus Kmesh's profiles. Nothing of Istio's is
// committed here; the copy is made from the module cache.
package installpkg

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// IstioModule is the module whose manifests/ tree is copied.
const IstioModule = "istio.io/istio"

// DefaultImage is the image profiles/kmesh.yaml names; Assemble replaces it
// when asked for another.
const DefaultImage = "ghcr.io/kmesh-dev/kmesh:latest"

// IstioManifestsDir returns the manifests/ directory of the pinned
// istio.io/istio module, asking the go command run in dir (the repository).
func IstioManifestsDir(dir string) (string, error) {
	var out, stderr bytes.Buffer
	cmd := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", IstioModule)
	cmd.Dir, cmd.Stdout, cmd.Stderr = dir, &out, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("go list -m %s: %w: %s", IstioModule, err, strings.TrimSpace(stderr.String()))
	}
	mod := strings.TrimSpace(out.String())
	if mod == "" {
		return "", fmt.Errorf("go list -m %s: module not downloaded (run go mod download %s)", IstioModule, IstioModule)
	}
	return filepath.Join(mod, "manifests"), nil
}

// Options says what to assemble.
type Options struct {
	IstioManifests string // Istio's manifests/ directory (IstioManifestsDir)
	Profiles       string // directory of Kmesh's profiles (*.yaml), copied into profiles/
	Out            string // the install package to write; replaced if it is one already
	// Image, when set and not DefaultImage, replaces DefaultImage in the
	// copied profiles (for a release or a privately pushed image).
	Image string
}

// Assemble writes the install package and returns the names of the Kmesh
// profiles it added.
func Assemble(o Options) ([]string, error) {
	for _, d := range []string{"charts", "profiles"} {
		if fi, err := os.Stat(filepath.Join(o.IstioManifests, d)); err != nil || !fi.IsDir() {
			return nil, fmt.Errorf("%s has no %s/ directory: not Istio's manifests tree", o.IstioManifests, d)
		}
	}
	kmesh, err := filepath.Glob(filepath.Join(o.Profiles, "*.yaml"))
	if err != nil || len(kmesh) == 0 {
		return nil, fmt.Errorf("no profiles (*.yaml) in %s", o.Profiles)
	}
	if err := clearOut(o.Out); err != nil {
		return nil, err
	}
	if err := copyTree(o.IstioManifests, o.Out); err != nil {
		return nil, err
	}
	var names []string
	for _, p := range kmesh {
		name := filepath.Base(p)
		dst := filepath.Join(o.Out, "profiles", name)
		if _, err := os.Stat(dst); err == nil {
			return nil, fmt.Errorf("profile %s would replace Istio's own profile of that name", name)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		if o.Image != "" && o.Image != DefaultImage {
			if n := bytes.Count(b, []byte(DefaultImage)); n > 1 {
				return nil, fmt.Errorf("%s names %s %d times: cannot tell which to replace", p, DefaultImage, n)
			}
			b = bytes.ReplaceAll(b, []byte(DefaultImage), []byte(o.Image))
		}
		if err := os.WriteFile(dst, b, 0o644); err != nil {
			return nil, err
		}
		names = append(names, strings.TrimSuffix(name, ".yaml"))
	}
	return names, nil
}

// clearOut removes a previous install package at out, refusing to remove a
// directory that does not look like one.
func clearOut(out string) error {
	entries, err := os.ReadDir(out)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	} else if err != nil {
		return err
	}
	if len(entries) > 0 {
		if _, err := os.Stat(filepath.Join(out, "charts")); err != nil {
			return fmt.Errorf("%s exists and is not an install package (no charts/): not removing it", out)
		}
	}
	return os.RemoveAll(out)
}

// copyTree copies src to dst, making everything writable (the module cache
// is read-only) and leaving out Go files: the package would land inside this
// module (out/ is under the repository) and istioctl does not read them.
func copyTree(src, dst string) error {
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		switch {
		case d.IsDir():
			return os.MkdirAll(target, 0o755)
		case d.Type()&fs.ModeSymlink != 0:
			return fmt.Errorf("%s: symlinks are not expected in Istio's manifests", path)
		case strings.HasSuffix(d.Name(), ".go"):
			return nil
		}
		return copyFile(path, target)
	})
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
