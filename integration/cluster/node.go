package cluster

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/integration/podnet"
	"kmesh.dev/kmesh/kernel"
)

// A run owns a directory under RunParent holding its pid, the control
// plane's files and each node's. A run killed without warning (SIGKILL, a
// go test timeout) cannot clean up: its processes die with it (Pdeathsig)
// and its network namespaces are anonymous, but the daemon's cgroup and
// its pinned programs and maps stay. The next run reaps them.
const (
	// RunParent holds every run's directory.
	RunParent = "/run/kmesh-cluster"
	// PinParent holds every node's pin root.
	PinParent    = kernel.DefaultBPFFS + "/kmesh-cluster"
	cgroupPrefix = "kmesh-cluster-"
	ownerFile    = "owner.pid"
)

// Run is one test process's share of the machine.
type Run struct {
	ID  string
	Dir string
}

// NewRun reaps what dead runs left and creates this run's directory.
func NewRun() (*Run, error) {
	ReapStale()
	r := &Run{ID: podnet.RandomSuffix()}
	r.Dir = filepath.Join(RunParent, r.ID)
	if err := os.MkdirAll(r.Dir, 0o700); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(r.Dir, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o600); err != nil {
		return nil, err
	}
	return r, nil
}

// Close removes the run's directory (its nodes are closed already).
func (r *Run) Close() error { return os.RemoveAll(r.Dir) }

// Node is where one kmesh-daemon runs: a cgroup it attaches to (the
// node's root cgroup, in a cluster) and a pin root, both named by the
// run, and a directory for its files.
type Node struct {
	Name    string
	Dir     string
	Cgroup  *podnet.Cgroup
	PinRoot string
}

// NewNode creates the node's cgroup, directory and pin root path.
func (r *Run) NewNode(name string) (*Node, error) {
	n := &Node{Name: name, Dir: filepath.Join(r.Dir, name), PinRoot: filepath.Join(PinParent, r.ID, name)}
	if err := os.MkdirAll(n.Dir, 0o700); err != nil {
		return nil, err
	}
	parent, err := cgroupOf(r.ID)
	if err != nil {
		return nil, err
	}
	if n.Cgroup, err = parent.Child(name); err != nil {
		return nil, err
	}
	return n, nil
}

func cgroupOf(id string) (*podnet.Cgroup, error) {
	root, err := kernel.Cgroup2Root()
	if err != nil {
		return nil, err
	}
	p := filepath.Join(root, cgroupPrefix+id)
	if err := os.Mkdir(p, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("creating cgroup: %w", err)
	}
	return &podnet.Cgroup{Path: p}, nil
}

// Close removes what the daemon left in the kernel (what an uninstall
// does: its pins), the cgroup (killing anything still in it) and the
// node's directory. The daemon must have stopped.
func (n *Node) Close() error {
	errs := []error{bpf.RemovePins(n.PinRoot)}
	_ = os.Remove(n.PinRoot)
	_ = os.Remove(filepath.Dir(n.PinRoot)) // the run's, once its last node is gone
	errs = append(errs, n.Cgroup.Remove())
	_ = os.Remove(filepath.Dir(n.Cgroup.Path))
	errs = append(errs, os.RemoveAll(n.Dir))
	return errors.Join(errs...)
}

func alive(pid int) bool { return pid > 0 && syscall.Kill(pid, 0) == nil }

// ReapStale removes the directories, cgroups and pins of runs whose
// process is gone (and of runs without an owner file for over a minute).
func ReapStale() {
	ids := map[string]bool{}
	for _, parent := range []string{RunParent, PinParent} {
		entries, _ := os.ReadDir(parent)
		for _, e := range entries {
			ids[e.Name()] = true
		}
	}
	root, err := kernel.Cgroup2Root()
	if err == nil {
		m, _ := filepath.Glob(filepath.Join(root, cgroupPrefix+"*"))
		for _, p := range m {
			ids[strings.TrimPrefix(filepath.Base(p), cgroupPrefix)] = true
		}
	}
	for id := range ids {
		b, err := os.ReadFile(filepath.Join(RunParent, id, ownerFile))
		if err == nil {
			if pid, _ := strconv.Atoi(strings.TrimSpace(string(b))); alive(pid) {
				continue
			}
		} else if st, err := os.Stat(filepath.Join(RunParent, id)); err == nil && time.Since(st.ModTime()) < time.Minute {
			continue // a run starting right now, before it wrote its owner file
		} else if st, err := os.Stat(filepath.Join(PinParent, id)); err == nil && time.Since(st.ModTime()) < time.Minute {
			continue
		}
		if nodes, _ := os.ReadDir(filepath.Join(PinParent, id)); nodes != nil {
			for _, n := range nodes {
				_ = bpf.RemovePins(filepath.Join(PinParent, id, n.Name()))
			}
		}
		_ = os.RemoveAll(filepath.Join(PinParent, id))
		if root != "" {
			_ = (&podnet.Cgroup{Path: filepath.Join(root, cgroupPrefix+id)}).Remove()
		}
		_ = os.RemoveAll(filepath.Join(RunParent, id))
	}
}
