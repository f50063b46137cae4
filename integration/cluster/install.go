package cluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"kmesh.dev/kmesh/integration/cluster/bins"
	"kmesh.dev/kmesh/integration/installpkg"
)

// AssembleManifests writes what `make manifests` writes (Istio's pinned
// charts and profiles plus Kmesh's profiles/*.yaml) to out, for
// `istioctl install --manifests out`.
func AssembleManifests(out string) error {
	root, err := bins.RepoRoot()
	if err != nil {
		return err
	}
	istio, err := installpkg.IstioManifestsDir(root)
	if err != nil {
		return err
	}
	_, err = installpkg.Assemble(installpkg.Options{IstioManifests: istio, Profiles: filepath.Join(root, "profiles"), Out: out})
	return err
}

// IstioctlInstall runs what README tells a user to run, against this API
// server:
//
//	istioctl install -y --kubeconfig <admin> --manifests <dir> --set profile=kmesh
//
// No --set beyond the profile: the cluster's domain (cluster.local), its
// name (Kubernetes) and the istio-system namespace are the charts'
// defaults, and the images are the profile's (the simulated kubelet maps
// them to binaries, ImageBinaries). readiness bounds istioctl's wait for
// each component's Deployments and DaemonSets (its own flag). The output
// goes to logFile too.
func IstioctlInstall(ctx context.Context, istioctl, kubeconfig, manifests, logFile string, readiness time.Duration) (string, error) {
	args := []string{"install", "-y", "--kubeconfig", kubeconfig, "--manifests", manifests, "--set", "profile=kmesh",
		"--readiness-timeout", readiness.String()}
	return runIstioctl(ctx, istioctl, logFile, args...)
}

// IstioctlUninstall removes everything istioctl installed (and the CRDs:
// --purge), as a user uninstalls.
func IstioctlUninstall(ctx context.Context, istioctl, kubeconfig, logFile string) (string, error) {
	return runIstioctl(ctx, istioctl, logFile, "uninstall", "--purge", "-y", "--kubeconfig", kubeconfig)
}

func runIstioctl(ctx context.Context, istioctl, logFile string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, istioctl, args...)
	// HOME: istioctl reads ~/.kube/config only without --kubeconfig, and
	// writes nothing else; keep it out of the machine's home anyway.
	cmd.Env = append(os.Environ(), "HOME="+filepath.Dir(logFile))
	out, err := cmd.CombinedOutput()
	if f, ferr := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); ferr == nil {
		fmt.Fprintf(f, "$ istioctl %s\n%s\n", strings.Join(args, " "), out)
		f.Close()
	}
	if err != nil {
		return string(out), fmt.Errorf("istioctl %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// Image is what the simulated kubelet runs for a container image: the
// program, and extra files of the image (container path → host path).
type Image struct {
	Entrypoint string
	Files      map[string]string
}

// ImageBinaries maps the images the kmesh profile renders to what the
// simulated kubelet runs for them: Istio's pilot image (istiod) to
// pilot-discovery; its install-cni image (istio-cni-node) to install-cni,
// with the istio-cni plugin at /opt/cni/bin/istio-cni where install-cni
// copies it from onto the node; Kmesh's image (profiles/kmesh.yaml
// values.ztunnel.image, the DaemonSet ztunnel) to the kmesh-daemon built
// for the run. Istio's images are matched by repository name whatever the
// registry and tag (they follow the pinned Istio's hub and tag); Kmesh's
// exactly. Anything else is unknown, and the kubelet refuses to run it.
func ImageBinaries(kmeshImage, daemon string, paths map[string]string) func(image string) (Image, bool) {
	return func(image string) (Image, bool) {
		if image == kmeshImage {
			return Image{Entrypoint: daemon}, daemon != ""
		}
		repo := image
		if i := strings.LastIndex(repo, "@"); i >= 0 {
			repo = repo[:i]
		}
		if i := strings.LastIndex(repo, ":"); i > strings.LastIndex(repo, "/") {
			repo = repo[:i]
		}
		switch repo[strings.LastIndex(repo, "/")+1:] {
		case "pilot":
			p := paths[bins.PilotDiscovery]
			return Image{Entrypoint: p}, p != ""
		case "install-cni":
			p, plugin := paths[bins.InstallCNI], paths[bins.IstioCNI]
			return Image{Entrypoint: p, Files: map[string]string{"/opt/cni/bin/istio-cni": plugin}}, p != "" && plugin != ""
		}
		return Image{}, false
	}
}
