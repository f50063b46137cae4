package installtest

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"kmesh.dev/kmesh/integration/installpkg"
)

// repo is the repository root, seen from this package's directory.
const repo = "../.."

// scratch holds what the tests build once per run: the install package and
// the image's binaries.
var scratch string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "kmesh-installtest-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	scratch = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

var (
	pkgOnce sync.Once
	pkgDir  string
	pkgErr  error
)

// installPackage assembles the install package (what `make manifests`
// writes) once per run.
func installPackage(t *testing.T) string {
	t.Helper()
	pkgOnce.Do(func() {
		var istio string
		if istio, pkgErr = installpkg.IstioManifestsDir(repo); pkgErr != nil {
			return
		}
		pkgDir = filepath.Join(scratch, "manifests")
		_, pkgErr = installpkg.Assemble(installpkg.Options{
			IstioManifests: istio, Profiles: filepath.Join(repo, "profiles"), Out: pkgDir,
		})
	})
	if pkgErr != nil {
		t.Fatalf("assembling the install package: %v", pkgErr)
	}
	return pkgDir
}
