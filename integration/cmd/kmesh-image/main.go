// Command kmesh-image builds Kmesh's image without docker: kmesh-daemon,
// kmeshctl and kmesh-cni as static binaries in /usr/local/bin on an empty
// base, entrypoint /usr/local/bin/kmesh-daemon, written as an OCI image
// layout (default out/image). Push it with
// `skopeo copy oci:out/image docker://<ref>` or `crane push out/image <ref>`.
//
//	go run ./integration/cmd/kmesh-image [-out out/image] [-ref ghcr.io/kmesh-dev/kmesh:latest] [-version v]
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"kmesh.dev/kmesh/integration/installpkg"
	"kmesh.dev/kmesh/integration/ociimage"
)

func main() {
	out := flag.String("out", "out/image", "OCI image layout directory to write (replaced if it is one)")
	ref := flag.String("ref", installpkg.DefaultImage, "image reference recorded in the layout (org.opencontainers.image.ref.name)")
	version := flag.String("version", "dev", "version stamped into the binaries and the image labels")
	bin := flag.String("bin", "out/image-bin", "directory for the static binaries")
	flag.Parse()

	bins, err := ociimage.BuildBinaries(".", *bin, *version)
	if err != nil {
		fatal(err)
	}
	img, err := ociimage.Build(ociimage.Options{Binaries: bins, Version: *version, Revision: gitRevision()})
	if err != nil {
		fatal(err)
	}
	if err := ociimage.WriteLayout(*out, *ref, img); err != nil {
		fatal(err)
	}
	d, err := img.Digest()
	if err != nil {
		fatal(err)
	}
	fmt.Printf("%s: %s %s (entrypoint %s)\n", *out, *ref, d, strings.Join(ociimage.Entrypoint, " "))
	fmt.Printf("push: skopeo copy oci:%s docker://%s\n", filepath.Clean(*out), *ref)
}

// gitRevision is the commit checked out, or "" outside a git checkout.
func gitRevision() string {
	b, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "kmesh-image:", err)
	os.Exit(1)
}
