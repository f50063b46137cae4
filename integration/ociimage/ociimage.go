// Package ociimage builds Kmesh's container image without a container
// runtime: the three static binaries on an empty base, written as an OCI
// image layout (push it with `skopeo copy oci:out/image docker://<ref>` or
// `crane push out/image <ref>`). The Dockerfile at the repository root
// builds the same image where docker is available.
package ociimage

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// BinDir is where the binaries live in the image.
const BinDir = "/usr/local/bin"

// Entrypoint is the image's entrypoint. The ztunnel DaemonSet sets no
// command, only args (`proxy ztunnel`), so this is what runs on a node.
var Entrypoint = []string{BinDir + "/kmesh-daemon"}

// Commands are the packages built into the image, by binary name.
var Commands = map[string]string{
	"kmesh-daemon": "./cmd/kmesh-daemon",
	"kmeshctl":     "./cmd/kmeshctl",
	"kmesh-cni":    "./cmd/kmesh-cni",
}

// Source is the repository the image's labels point at.
const Source = "https://github.com/kmesh-dev/kmesh"

// BuildBinaries builds Commands as static Linux binaries (CGO_ENABLED=0,
// -trimpath) from the module at repo into dir, stamping version.
func BuildBinaries(repo, dir, version string) (map[string]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	args := []string{"build", "-trimpath", "-ldflags", "-X main.version=" + version, "-o", dir + string(filepath.Separator)}
	bins := map[string]string{}
	for name, pkg := range Commands {
		args = append(args, pkg)
		bins[name] = filepath.Join(dir, name)
	}
	cmd := exec.Command("go", args...)
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("go build: %w\n%s", err, out)
	}
	return bins, nil
}

// Options describe the image.
type Options struct {
	Binaries map[string]string // binary name -> file (BuildBinaries)
	Version  string            // org.opencontainers.image.version
	Revision string            // org.opencontainers.image.revision (git commit), optional
	Arch     string            // default runtime.GOARCH
	// Created is the image's creation time and the files' mtime; zero means
	// the Unix epoch, which keeps the image reproducible.
	Created time.Time
}

// Labels returns the image config labels for o.
func Labels(o Options) map[string]string {
	l := map[string]string{
		"org.opencontainers.image.source":      Source,
		"org.opencontainers.image.title":       "kmesh",
		"org.opencontainers.image.description": "Kmesh node proxy for Istio ambient (runs in ztunnel's DaemonSet): kmesh-daemon, kmeshctl, kmesh-cni",
		"org.opencontainers.image.licenses":    "Apache-2.0",
		"org.opencontainers.image.version":     o.Version,
	}
	if o.Revision != "" {
		l["org.opencontainers.image.revision"] = o.Revision
	}
	return l
}

// Build assembles the image: one layer with the binaries under BinDir on an
// empty base. The binaries must be static (BuildBinaries makes them so):
// the base has no libc.
func Build(o Options) (v1.Image, error) {
	if len(o.Binaries) == 0 {
		return nil, errors.New("no binaries")
	}
	if o.Arch == "" {
		o.Arch = runtime.GOARCH
	}
	created := o.Created
	if created.IsZero() {
		created = time.Unix(0, 0).UTC()
	}
	data, err := layerTar(o.Binaries, created)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, err
	}
	base := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	base = mutate.ConfigMediaType(base, types.OCIConfigJSON)
	img, err := mutate.Append(base, mutate.Addendum{Layer: layer, History: v1.History{
		Created: v1.Time{Time: created}, CreatedBy: "kmesh-image: " + strings.Join(sortedNames(o.Binaries), ", ") + " in " + BinDir,
	}})
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = o.Arch, "linux"
	cf.Created = v1.Time{Time: created}
	cf.Config.Entrypoint = Entrypoint
	cf.Config.Cmd = nil
	cf.Config.Env = []string{"PATH=" + BinDir}
	cf.Config.Labels = Labels(o)
	return mutate.ConfigFile(img, cf)
}

// WriteLayout writes img as an OCI image layout at dir, naming it ref
// (annotation org.opencontainers.image.ref.name). A previous layout at dir
// is replaced; any other non-empty directory is refused.
func WriteLayout(dir, ref string, img v1.Image) error {
	if entries, err := os.ReadDir(dir); err == nil && len(entries) > 0 {
		if _, err := os.Stat(filepath.Join(dir, "oci-layout")); err != nil {
			return fmt.Errorf("%s exists and is not an OCI layout: not replacing it", dir)
		}
		if err := os.RemoveAll(dir); err != nil {
			return err
		}
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	return p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": ref}))
}

// layerTar makes the layer: the directories down to BinDir, then each
// binary (root-owned, 0755), in a fixed order with a fixed mtime.
func layerTar(bins map[string]string, mtime time.Time) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dir := ""
	for _, part := range strings.Split(strings.Trim(BinDir, "/"), "/") {
		dir = path.Join(dir, part)
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir + "/", Mode: 0o755, ModTime: mtime, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
	}
	for _, name := range sortedNames(bins) {
		b, err := os.ReadFile(bins[name])
		if err != nil {
			return nil, err
		}
		h := &tar.Header{Typeflag: tar.TypeReg, Name: path.Join(dir, name), Mode: 0o755, Size: int64(len(b)), ModTime: mtime, Format: tar.FormatPAX}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(b); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func sortedNames(m map[string]string) []string { return slices.Sorted(maps.Keys(m)) }
