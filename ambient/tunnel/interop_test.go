package tunnel

import (
	"os"
	"os/exec"
	"testing"

	"kmesh.dev/kmesh/ambient/identity"
	"kmesh.dev/kmesh/integration/istioapps"
	"kmesh.dev/kmesh/integration/podnet"
)

// writeCert stores a certificate for Istio's HBONE helpers.
func writeCert(t *testing.T, c *identity.Certificate) (certFile, keyFile string) {
	t.Helper()
	cf, kf, err := istioapps.WriteCert(t.TempDir(), &c.TLS)
	if err != nil {
		t.Fatal(err)
	}
	return cf, kf
}

// startIstioHBONEServer runs Istio's HBONE server in pod on :15008.
func startIstioHBONEServer(t *testing.T, pod *podnet.Pod, c *identity.Certificate) {
	t.Helper()
	cf, kf := writeCert(t, c)
	cmd := exec.Command("/proc/self/exe", "-cert", cf, "-key", kf)
	cmd.Env = append(os.Environ(), podnet.HelperEnv(istioapps.Serve))
	cmd.Stderr = os.Stderr
	if err := pod.Start(cmd, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	if err := istioapps.WaitListening(pod, "15008"); err != nil {
		t.Fatalf("Istio's HBONE server did not start: %v", err)
	}
}
