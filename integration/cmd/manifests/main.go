// Command manifests assembles the directory given to `istioctl --manifests`:
// the manifests/ tree of the istio.io/istio module pinned in go.mod (copied
// from the module cache, made writable) plus Kmesh's profiles/*.yaml.
//
//	go run ./integration/cmd/manifests [-out out/manifests] [-image ref]
//	istioctl install --manifests out/manifests --set profile=kmesh
package main

import (
	"flag"
	"fmt"
	"os"

	"kmesh.dev/kmesh/integration/installpkg"
)

func main() {
	out := flag.String("out", "out/manifests", "install package directory to write (replaced if it is one)")
	profiles := flag.String("profiles", "profiles", "directory of Kmesh's profiles")
	istio := flag.String("istio", "", "Istio's manifests/ directory (default: the pinned istio.io/istio module's)")
	image := flag.String("image", "", "image to write into the profiles instead of "+installpkg.DefaultImage)
	flag.Parse()
	if *istio == "" {
		dir, err := installpkg.IstioManifestsDir(".")
		if err != nil {
			fatal(err)
		}
		*istio = dir
	}
	names, err := installpkg.Assemble(installpkg.Options{IstioManifests: *istio, Profiles: *profiles, Out: *out, Image: *image})
	if err != nil {
		fatal(err)
	}
	for _, n := range names {
		fmt.Printf("%s: istioctl install --manifests %s --set profile=%s\n", *out, *out, n)
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "manifests:", err)
	os.Exit(1)
}
