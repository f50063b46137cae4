package sidecar

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/kernel"
)

// PodUIDFromCgroup finds the pod UID in the content of /proc/<pid>/cgroup
// as the kubelet names pod cgroups: with the cgroupfs driver
// ".../kubepods/burstable/pod<uid>/<container>", with the systemd driver
// ".../kubepods-burstable-pod<uid with _ for ->.slice/...". ok is false
// when no line names exactly one well-formed UID.
func PodUIDFromCgroup(content []byte) (uid string, ok bool) {
	for _, line := range bytes.Split(content, []byte("\n")) {
		// hierarchy-ID:controllers:path; cgroup v2 is "0::path".
		parts := bytes.SplitN(line, []byte(":"), 3)
		if len(parts) != 3 {
			continue
		}
		for _, seg := range strings.Split(string(parts[2]), "/") {
			seg = strings.TrimSuffix(seg, ".slice")
			if i := strings.LastIndex(seg, "-pod"); i >= 0 && strings.HasPrefix(seg, "kubepods") {
				seg = seg[i+1:]
			}
			if !strings.HasPrefix(seg, "pod") {
				continue
			}
			u := strings.ReplaceAll(seg[3:], "_", "-")
			if !validUID(u) {
				continue
			}
			if uid != "" && uid != u {
				return "", false // two pods? refuse
			}
			uid = u
		}
	}
	return uid, uid != ""
}

// validUID: a Kubernetes UID, 8-4-4-4-12 lower-case hex digits.
func validUID(u string) bool {
	if len(u) != 36 {
		return false
	}
	for i, c := range u {
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
				return false
			}
		}
	}
	return true
}

// Finder finds pods' network namespaces from the node's processes.
type Finder struct {
	// Proc is the node's /proc (the daemon runs with hostPID).
	Proc string
	// HostNetns is the node's network namespace (default Proc/1/ns/net):
	// a pod in it is on the host network and never spliced.
	HostNetns string
	// MaxProcs bounds one scan (a node's process count is not ours to
	// trust); beyond it the scan fails, closed.
	MaxProcs int
}

// errTooMany: the scan stopped at MaxProcs.
var errTooMany = errors.New("too many processes to scan")

// readCgroup reads at most 8 KiB of a process's cgroup file.
func (f Finder) readCgroup(pid string) ([]byte, error) {
	fh, err := os.Open(filepath.Join(f.Proc, pid, "cgroup"))
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	return io.ReadAll(io.LimitReader(fh, 8<<10))
}

// Found is what a scan found of one pod's network namespace: Why is
// Spliced (Cookie is the namespace's), NetnsUnknown (no process of the
// pod), NetnsAmbiguous (its processes in different namespaces) or
// HostNetwork (in the node's).
type Found struct {
	Cookie uint64
	Why    Reason
}

// Netns finds one pod's network namespace (Find for one UID).
func (f Finder) Netns(uid string) (uint64, Reason, error) {
	got, err := f.Find(map[string]bool{uid: true})
	if err != nil {
		return 0, NetnsUnknown, err
	}
	return got[uid].Cookie, got[uid].Why, nil
}

// Find scans the node's processes once for the network namespaces of the
// pods with the given UIDs: every process of a pod must be in one network
// namespace, not the node's. A pid reused between reading its cgroup and
// opening its namespace is caught by reading the cgroup again. Every UID
// asked for is in the result.
func (f Finder) Find(uids map[string]bool) (map[string]Found, error) {
	out := make(map[string]Found, len(uids))
	for u := range uids {
		out[u] = Found{Why: NetnsUnknown}
	}
	entries, err := os.ReadDir(f.Proc)
	if err != nil {
		return out, err
	}
	hostPath := f.HostNetns
	if hostPath == "" {
		hostPath = filepath.Join(f.Proc, "1", "ns", "net")
	}
	host, err := nsIno(hostPath)
	if err != nil {
		return out, fmt.Errorf("the host's network namespace: %w", err)
	}
	inos := map[string]uint64{}
	scanned := 0
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		if scanned++; scanned > f.MaxProcs {
			for u := range uids {
				out[u] = Found{Why: NetnsUnknown}
			}
			return out, errTooMany
		}
		cg, err := f.readCgroup(e.Name())
		if err != nil {
			continue // exited
		}
		uid, ok := PodUIDFromCgroup(cg)
		if !ok || !uids[uid] {
			continue
		}
		cur := out[uid]
		if cur.Why == NetnsAmbiguous || cur.Why == HostNetwork {
			continue // decided
		}
		fd, err := unix.Open(filepath.Join(f.Proc, e.Name(), "ns", "net"), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			continue
		}
		var st unix.Stat_t
		err = unix.Fstat(fd, &st)
		var c uint64
		if err == nil && inos[uid] == 0 && st.Ino != host {
			c, err = kernel.NetnsCookie(fd) // once: the pod's others must match it
		}
		unix.Close(fd)
		if err != nil {
			continue
		}
		// The pid may have been reused between reading its cgroup and
		// opening its namespace: it must still be the pod's.
		if cg, err := f.readCgroup(e.Name()); err != nil {
			continue
		} else if u, ok := PodUIDFromCgroup(cg); !ok || u != uid {
			continue
		}
		switch {
		case st.Ino == host:
			out[uid] = Found{Why: HostNetwork}
		case inos[uid] == 0:
			inos[uid] = st.Ino
			out[uid] = Found{Cookie: c, Why: Spliced}
		case inos[uid] != st.Ino:
			out[uid] = Found{Why: NetnsAmbiguous}
		}
	}
	return out, nil
}

func nsIno(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}
