package sim

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// BuildDaemon builds kmesh-daemon from this module into dir (tests run it
// as a real process on every simulated node). Go's build cache makes this
// quick after the first time.
func BuildDaemon(dir string) (string, error) {
	out := filepath.Join(dir, "kmesh-daemon")
	cmd := exec.Command("go", "build", "-o", out, "kmesh.dev/kmesh/cmd/kmesh-daemon")
	cmd.Env = os.Environ()
	b, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("building kmesh-daemon: %w: %s", err, strings.TrimSpace(string(b)))
	}
	return out, nil
}
