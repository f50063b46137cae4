package kernel

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultBPFFS is where the BPF filesystem is conventionally mounted.
const DefaultBPFFS = "/sys/fs/bpf"

// mount is one line of /proc/self/mountinfo, reduced to what we use.
type mount struct {
	point  string
	fstype string
}

// parseMountinfo reads the mount point and filesystem type of each mount.
func parseMountinfo(r io.Reader) ([]mount, error) {
	var out []mount
	s := bufio.NewScanner(r)
	s.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for s.Scan() {
		// ID PARENT MAJ:MIN ROOT POINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER
		fields := strings.Fields(s.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" {
				sep = i
				break
			}
		}
		if len(fields) < 5 || sep < 0 || sep+1 >= len(fields) {
			continue
		}
		out = append(out, mount{point: unescapeMount(fields[4]), fstype: fields[sep+1]})
	}
	return out, s.Err()
}

// unescapeMount undoes the octal escapes (\040 for space) of mountinfo.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + byte(c-'0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// pickCgroup2 chooses the cgroup v2 mount to attach to: /sys/fs/cgroup on
// unified hosts, /sys/fs/cgroup/unified on hybrid (v1 + v2) hosts, otherwise
// the first cgroup2 mount found.
func pickCgroup2(ms []mount) (string, error) {
	var found []string
	for _, m := range ms {
		if m.fstype == "cgroup2" {
			found = append(found, m.point)
		}
	}
	for _, pref := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} {
		for _, p := range found {
			if p == pref {
				return p, nil
			}
		}
	}
	if len(found) > 0 {
		return found[0], nil
	}
	return "", errors.New("no cgroup v2 hierarchy is mounted: Kmesh attaches its programs to cgroup v2 " +
		"(mount one with 'mount -t cgroup2 none /sys/fs/cgroup/unified')")
}

// Cgroup2Root returns the mount point of the cgroup v2 hierarchy.
func Cgroup2Root() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	ms, err := parseMountinfo(f)
	if err != nil {
		return "", fmt.Errorf("reading mountinfo: %w", err)
	}
	return pickCgroup2(ms)
}

// EnsureBPFFS makes sure dir lies on a BPF filesystem, mounting one at
// DefaultBPFFS when nothing is mounted there yet, and creates dir.
func EnsureBPFFS(dir string) error {
	dir = filepath.Clean(dir)
	if !isBPFFS(existingAncestor(dir)) {
		if dir != DefaultBPFFS && !strings.HasPrefix(dir, DefaultBPFFS+"/") {
			return fmt.Errorf("%s is not on a BPF filesystem: mount one there (mount -t bpf bpf <dir>) or pin under %s",
				dir, DefaultBPFFS)
		}
		if err := os.MkdirAll(DefaultBPFFS, 0o755); err != nil {
			return err
		}
		if err := unix.Mount("bpf", DefaultBPFFS, "bpf", 0, "mode=0700"); err != nil {
			return fmt.Errorf("mounting the BPF filesystem at %s: %w (needs CAP_SYS_ADMIN)", DefaultBPFFS, err)
		}
	}
	return os.MkdirAll(dir, 0o700)
}

// existingAncestor returns path itself or its closest existing parent.
func existingAncestor(path string) string {
	for {
		if _, err := os.Stat(path); err == nil || path == "/" || path == "." {
			return path
		}
		path = filepath.Dir(path)
	}
}

func isBPFFS(path string) bool {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false
	}
	return uint32(st.Type) == unix.BPF_FS_MAGIC
}
