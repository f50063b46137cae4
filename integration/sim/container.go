package sim

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/integration/podnet"
)

// The external mode's container runtime (Options.External). A container is
// a process that the kubelet starts through a re-executed helper:
//
//   - in the pod's network namespace (the node's for hostNetwork pods) and
//     the node's PID namespace (entered by the forking thread: setns of
//     CLONE_NEWPID sets the namespace of the thread's next child);
//   - in its cgroup <node cgroup>/pod<uid>/<container id> from its first
//     instruction (clone3 CLONE_INTO_CGROUP), the shape a real kubelet
//     gives, which istio-cni's /proc scan parses;
//   - in a new mount and UTS namespace, where the helper builds the
//     container's root: an overlay whose lower layer is the machine's root
//     file system (the "image": the machine's programs and libraries) and
//     whose upper layer is a tmpfs, so creating mount points changes
//     nothing on the machine; a fresh /proc (the node's PID namespace) and
//     /sys; the volumes bind-mounted at their mountPath; the image's
//     program bound at /.kmesh-sim/; then pivot_root and exec.

const (
	containerHelper  = "kmesh-sim-container"
	nodeInitHelper   = "kmesh-sim-node-init"
	containerSpecEnv = "KMESH_SIM_CONTAINER_SPEC"
)

func init() {
	podnet.RegisterHelper(containerHelper, runContainer)
	podnet.RegisterHelper(nodeInitHelper, runNodeInit)
}

// mountKind is how a volume appears in a container.
type mountKind string

const (
	mountBind mountKind = "bind" // Source (a host file or directory) at Target
	mountProc mountKind = "proc" // a procfs of the node's PID namespace at Target
)

type containerMount struct {
	Kind     mountKind `json:"kind"`
	Source   string    `json:"source,omitempty"`
	Target   string    `json:"target"`
	ReadOnly bool      `json:"readOnly,omitempty"`
}

// containerSpec is what the helper needs to build the container and exec
// its program; the kubelet writes it as JSON next to the container's scratch
// directory.
type containerSpec struct {
	Scratch  string           `json:"scratch"` // host directory the helper mounts its tmpfs on
	Mounts   []containerMount `json:"mounts"`
	Program  string           `json:"program"` // host path of the program
	Argv     []string         `json:"argv"`
	Env      []string         `json:"env"`
	Dir      string           `json:"dir,omitempty"`
	Hostname string           `json:"hostname"`
}

// runContainer is the helper: it never returns on success (exec).
func runContainer([]string) (any, error) {
	b, err := os.ReadFile(os.Getenv(containerSpecEnv))
	if err != nil {
		return nil, err
	}
	var s containerSpec
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, err
	}
	// One thread does the mount work; pivot_root and chdir apply to every
	// thread sharing the file system context, which Go's threads do.
	runtime.LockOSThread()
	if err := buildRoot(&s); err != nil {
		return nil, err
	}
	if s.Hostname != "" {
		if err := unix.Sethostname([]byte(s.Hostname)); err != nil {
			return nil, fmt.Errorf("hostname: %w", err)
		}
	}
	dir := s.Dir
	if dir == "" {
		dir = "/"
	}
	if err := os.Chdir(dir); err != nil {
		return nil, fmt.Errorf("working directory: %w", err)
	}
	prog := "/.kmesh-sim/" + filepath.Base(s.Program)
	return nil, fmt.Errorf("exec %s: %w", s.Program, syscall.Exec(prog, s.Argv, s.Env))
}

func buildRoot(s *containerSpec) error {
	// Mounts made on the machine later (netns pins) still reach volumes
	// bound from shared directories (HostToContainer); nothing made here
	// goes back.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_SLAVE, ""); err != nil {
		return fmt.Errorf("making mounts slave: %w", err)
	}
	if err := unix.Mount("tmpfs", s.Scratch, "tmpfs", 0, "mode=0700"); err != nil {
		return fmt.Errorf("scratch tmpfs: %w", err)
	}
	upper, work, root := filepath.Join(s.Scratch, "upper"), filepath.Join(s.Scratch, "work"), filepath.Join(s.Scratch, "root")
	for _, d := range []string{upper, work, root} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return err
		}
	}
	if err := unix.Mount("overlay", root, "overlay", 0, "lowerdir=/,upperdir="+upper+",workdir="+work); err != nil {
		return fmt.Errorf("root overlay: %w", err)
	}
	if err := unix.Mount("/dev", filepath.Join(root, "dev"), "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("/dev: %w", err)
	}
	if err := unix.Mount("proc", filepath.Join(root, "proc"), "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("/proc: %w", err)
	}
	// A fresh sysfs shows the container's network namespace's devices; no
	// cgroup or bpf file system unless a volume puts one there.
	if err := unix.Mount("sysfs", filepath.Join(root, "sys"), "sysfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC|unix.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("/sys: %w", err)
	}
	for _, d := range []string{"tmp", "run", ".kmesh-sim", ".oldroot"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o1777); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(root, ".kmesh-sim", filepath.Base(s.Program)), nil, 0o755); err != nil {
		return err
	}
	if err := unix.Mount(s.Program, filepath.Join(root, ".kmesh-sim", filepath.Base(s.Program)), "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("program: %w", err)
	}
	if err := unix.PivotRoot(root, filepath.Join(root, ".oldroot")); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := os.Chdir("/"); err != nil {
		return err
	}
	// Volumes, parents first. Paths resolve inside the new root (its
	// /var/run is a symlink to its own /run); sources through the old one.
	mounts := append([]containerMount(nil), s.Mounts...)
	sort.SliceStable(mounts, func(i, j int) bool {
		return strings.Count(filepath.Clean(mounts[i].Target), "/") < strings.Count(filepath.Clean(mounts[j].Target), "/")
	})
	for _, m := range mounts {
		if err := mountVolume(m); err != nil {
			return fmt.Errorf("volume at %s: %w", m.Target, err)
		}
	}
	if err := unix.Unmount("/.oldroot", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detaching the old root: %w", err)
	}
	return os.Remove("/.oldroot")
}

func mountVolume(m containerMount) error {
	switch m.Kind {
	case mountProc:
		if err := os.MkdirAll(m.Target, 0o755); err != nil {
			return err
		}
		flags := uintptr(unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC)
		if m.ReadOnly {
			flags |= unix.MS_RDONLY
		}
		return unix.Mount("proc", m.Target, "proc", flags, "")
	case mountBind:
		src := filepath.Join("/.oldroot", m.Source)
		st, err := os.Stat(src)
		if err != nil {
			return err
		}
		if st.IsDir() {
			if err := os.MkdirAll(m.Target, 0o755); err != nil {
				return err
			}
		} else {
			if err := os.MkdirAll(filepath.Dir(m.Target), 0o755); err != nil {
				return err
			}
			if f, err := os.OpenFile(m.Target, os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
				f.Close()
			} else {
				return err
			}
		}
		if err := unix.Mount(src, m.Target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return err
		}
		if m.ReadOnly {
			return unix.Mount("", m.Target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, "")
		}
		return nil
	}
	return fmt.Errorf("unknown mount kind %q", m.Kind)
}

// runNodeInit is a node's PID 1: it names itself kubelet (what istio-cni
// looks for to find the node's kubelet, and what a node has), reaps the
// orphans of its PID namespace and exits on SIGTERM. When it dies, the
// kernel kills every process of the node's PID namespace.
func runNodeInit([]string) (any, error) {
	// The thread group leader's name, which /proc/<pid>/comm shows.
	_ = os.WriteFile("/proc/self/comm", []byte("kubelet"), 0)
	sig := make(chan os.Signal, 8)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sig {
		if s != syscall.SIGCHLD {
			return nil, nil
		}
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
	return nil, nil
}

// startInNode starts cmd in the network namespace netns and the PID
// namespace pidns (both descriptors), in the cgroup cg (a descriptor, or
// -1), dying with the caller.
func startInNode(cmd *exec.Cmd, netns, pidns, cg int) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	if cg >= 0 {
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = cg
	}
	// Pdeathsig only outside the node's PID namespace: Go's child checks
	// getppid() against its parent's pid after setting it, and in another
	// PID namespace getppid() is 0, so the child would kill itself. A
	// node's processes die with its init instead (the kernel kills a PID
	// namespace whose init exits), which has Pdeathsig.
	if pidns < 0 {
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
	homeNet, err := unix.Open("/proc/self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(homeNet)
	homePid, err := unix.Open("/proc/self/ns/pid", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(homePid)
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(netns, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering the network namespace: %w", err)
			return
		}
		var serr error
		if pidns >= 0 {
			serr = unix.Setns(pidns, unix.CLONE_NEWPID)
			if serr != nil {
				serr = fmt.Errorf("entering the node's PID namespace: %w", serr)
			}
		}
		if serr == nil {
			serr = cmd.Start()
		}
		// Back home; if that fails the thread is retired with the goroutine
		// (the children it forked then get their Pdeathsig: fail closed).
		if err := errors.Join(unix.Setns(homeNet, unix.CLONE_NEWNET), unix.Setns(homePid, unix.CLONE_NEWPID)); err != nil {
			errc <- errors.Join(serr, fmt.Errorf("returning to the simulator's namespaces: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- serr
	}()
	return <-errc
}
