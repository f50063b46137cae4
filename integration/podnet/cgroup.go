package podnet

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/kernel"
)

// Cgroup is a cgroup v2 directory created for a test, a simulated node or a
// pod. Kmesh's programs attach to such a subtree in tests, never to the
// machine's root, so a faulty program cannot disturb anything else.
type Cgroup struct {
	Path string
}

// NewCgroup creates name under parent (the cgroup v2 root when parent is "").
func NewCgroup(parent, name string) (*Cgroup, error) {
	if parent == "" {
		root, err := kernel.Cgroup2Root()
		if err != nil {
			return nil, err
		}
		parent = root
	}
	p := filepath.Join(parent, name)
	if err := os.Mkdir(p, 0o755); err != nil {
		return nil, fmt.Errorf("creating cgroup: %w", err)
	}
	return &Cgroup{Path: p}, nil
}

// Child creates a sub-cgroup.
func (c *Cgroup) Child(name string) (*Cgroup, error) { return NewCgroup(c.Path, name) }

// Open returns a descriptor for clone3(CLONE_INTO_CGROUP).
func (c *Cgroup) Open() (*os.File, error) {
	return os.OpenFile(c.Path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
}

// Procs lists the processes in this cgroup (not in its children).
func (c *Cgroup) Procs() ([]string, error) {
	b, err := os.ReadFile(filepath.Join(c.Path, "cgroup.procs"))
	if err != nil {
		return nil, err
	}
	return strings.Fields(string(b)), nil
}

// Remove kills whatever still runs in the subtree and removes it, children first.
func (c *Cgroup) Remove() error {
	entries, _ := os.ReadDir(c.Path)
	var errs []error
	for _, e := range entries {
		if e.IsDir() {
			errs = append(errs, (&Cgroup{Path: filepath.Join(c.Path, e.Name())}).Remove())
		}
	}
	// cgroup.kill (Linux 5.14) SIGKILLs every process in the subtree.
	_ = os.WriteFile(filepath.Join(c.Path, "cgroup.kill"), []byte("1"), 0)
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := unix.Rmdir(c.Path)
		if err == nil || errors.Is(err, unix.ENOENT) {
			break
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			errs = append(errs, fmt.Errorf("removing cgroup %s: %w", c.Path, err))
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	return errors.Join(errs...)
}
