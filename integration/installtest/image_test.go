package installtest

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"encoding/json"
	"errors"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"

	"kmesh.dev/kmesh/integration/installpkg"
	"kmesh.dev/kmesh/integration/ociimage"
)

const testVersion = "v0.0.0-installtest"

var (
	binOnce sync.Once
	bins    map[string]string
	binErr  error
)

// binaries builds the image's three binaries once per run, as `make image`
// does (static, -trimpath).
func binaries(t *testing.T) map[string]string {
	t.Helper()
	binOnce.Do(func() {
		bins, binErr = ociimage.BuildBinaries(repo, filepath.Join(scratch, "bin"), testVersion)
	})
	if binErr != nil {
		t.Fatalf("building the binaries: %v", binErr)
	}
	return bins
}

// TestImage builds the image as `make image` does, writes and reads back the
// OCI layout, and checks: the reference, the labels, the entrypoint, the
// three binaries (regular, root-owned, executable, static: the base has no
// libc), and that the binaries from the layer run: kmesh-daemon given the
// rendered DaemonSet's args, kmeshctl's version, kmesh-cni's CNI VERSION.
func TestImage(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries (about a minute warm)")
	}
	img, err := ociimage.Build(ociimage.Options{Binaries: binaries(t), Version: testVersion, Revision: "0123abc"})
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "image")
	if err := ociimage.WriteLayout(dir, installpkg.DefaultImage, img); err != nil {
		t.Fatal(err)
	}
	// Read back what was written, not the in-memory image.
	p, err := layout.FromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := p.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 || im.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != installpkg.DefaultImage {
		t.Fatalf("layout index = %+v, want one image named %s", im.Manifests, installpkg.DefaultImage)
	}
	if mt := string(im.Manifests[0].MediaType); mt != "application/vnd.oci.image.manifest.v1+json" {
		t.Errorf("manifest media type %s, want OCI", mt)
	}
	got, err := p.Image(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := got.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"/usr/local/bin/kmesh-daemon"}; !slices.Equal(cf.Config.Entrypoint, want) || len(cf.Config.Cmd) != 0 {
		t.Errorf("entrypoint %q cmd %q, want %q and no cmd", cf.Config.Entrypoint, cf.Config.Cmd, want)
	}
	if cf.OS != "linux" {
		t.Errorf("os = %q", cf.OS)
	}
	for k, want := range map[string]string{
		"org.opencontainers.image.source":   ociimage.Source,
		"org.opencontainers.image.version":  testVersion,
		"org.opencontainers.image.revision": "0123abc",
		"org.opencontainers.image.licenses": "Apache-2.0",
	} {
		if cf.Config.Labels[k] != want {
			t.Errorf("label %s = %q, want %q", k, cf.Config.Labels[k], want)
		}
	}

	files := layerFiles(t, got)
	extracted := t.TempDir()
	for name := range ociimage.Commands {
		f, ok := files["usr/local/bin/"+name]
		if !ok {
			t.Errorf("no /usr/local/bin/%s in the image (have %q)", name, slices.Sorted(maps.Keys(files)))
			continue
		}
		if f.hdr.Typeflag != tar.TypeReg || f.hdr.Mode&0o111 != 0o111 || f.hdr.Uid != 0 || f.hdr.Gid != 0 {
			t.Errorf("%s: type %c mode %o uid %d gid %d, want a root-owned executable file", name, f.hdr.Typeflag, f.hdr.Mode, f.hdr.Uid, f.hdr.Gid)
		}
		if interp := elfInterpreter(t, f.data); interp != "" {
			t.Errorf("%s is dynamically linked (interpreter %s): the image has no libc", name, interp)
		}
		if err := os.WriteFile(filepath.Join(extracted, name), f.data, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if t.Failed() {
		return
	}

	// The entrypoint with the args the rendered DaemonSet passes is a command
	// the daemon accepts; --help stops it before it touches the kernel.
	c := container(t, &renderProfile(t, "kmesh").daemonSet(t, ns, ztunnel).Spec.Template.Spec, proxyName)
	entry := filepath.Join(extracted, filepath.Base(cf.Config.Entrypoint[0]))
	out, err := run(entry, nil, append(slices.Clone(c.Args), "--help")...)
	if !strings.Contains(out, "proxy ztunnel") || !strings.Contains(out, "--cgroup-path") || exitCode(err) != 2 {
		t.Errorf("%s %q --help: exit %v, output:\n%s", entry, c.Args, err, out)
	}
	// And an unknown command is refused, so the check above means something.
	if out, err := run(entry, nil, "proxy", "envoy", "--help"); exitCode(err) != 2 {
		t.Errorf("kmesh-daemon proxy envoy --help: exit %v\n%s", err, out)
	}
	if out, err := run(filepath.Join(extracted, "kmeshctl"), nil, "version"); err != nil || !strings.Contains(out, testVersion) {
		t.Errorf("kmeshctl version: %v, output %q (want the stamped %s)", err, out, testVersion)
	}
	if out, err := run(filepath.Join(extracted, "kmesh-cni"), []string{"CNI_COMMAND=VERSION"}); err != nil || !strings.Contains(out, `"cniVersion"`) {
		t.Errorf("kmesh-cni VERSION: %v, output %q", err, out)
	}
}

type tarFile struct {
	hdr  *tar.Header
	data []byte
}

// layerFiles reads the image's layers (in order, later ones winning).
func layerFiles(t *testing.T, img v1.Image) map[string]tarFile {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != 1 {
		t.Errorf("%d layers, want 1", len(layers))
	}
	files := map[string]tarFile{}
	for _, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		tr := tar.NewReader(rc)
		for {
			h, err := tr.Next()
			if errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				t.Fatal(err)
			}
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			files[strings.TrimPrefix(h.Name, "/")] = tarFile{h, b}
		}
		rc.Close()
	}
	return files
}

// elfInterpreter returns the ELF program interpreter (the dynamic loader),
// "" for a static binary.
func elfInterpreter(t *testing.T, b []byte) string {
	t.Helper()
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("not an ELF file: %v", err)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			data, _ := io.ReadAll(p.Open())
			return strings.TrimRight(string(data), "\x00")
		}
	}
	return ""
}

func run(bin string, env []string, args ...string) (string, error) {
	cmd := exec.Command(bin, args...)
	cmd.Env = env // nothing inherited: the image sets no variables but PATH
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// TestDockerfileMatchesImageBuilder keeps the two image definitions in step:
// the Dockerfile's final stage copies the same binaries to the same place,
// has the same entrypoint and the same fixed labels as ociimage.Build.
func TestDockerfileMatchesImageBuilder(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(repo, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	df := string(b)
	final := df[strings.LastIndex(df, "\nFROM "):]
	if !strings.HasPrefix(final, "\nFROM scratch") {
		t.Errorf("the final stage is %q, want FROM scratch like the Go builder's empty base", strings.SplitN(final[1:], "\n", 2)[0])
	}
	entry, _ := json.Marshal(ociimage.Entrypoint)
	if !strings.Contains(final, "ENTRYPOINT "+string(entry)) {
		t.Errorf("the Dockerfile's final stage has no ENTRYPOINT %s", entry)
	}
	for name, pkg := range ociimage.Commands {
		if !strings.Contains(df, " "+pkg) || !strings.Contains(final, "/out/"+name) {
			t.Errorf("the Dockerfile does not build %s and copy %s", pkg, name)
		}
	}
	if !strings.Contains(final, ociimage.BinDir+"/") || !strings.Contains(df, "CGO_ENABLED=0") {
		t.Errorf("the Dockerfile does not install static binaries into %s", ociimage.BinDir)
	}
	for k, v := range ociimage.Labels(ociimage.Options{}) {
		if v != "" && !strings.Contains(final, k+"="+strconv.Quote(v)) {
			t.Errorf("the Dockerfile lacks LABEL %s=%q", k, v)
		}
	}
}
