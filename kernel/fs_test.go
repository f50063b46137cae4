package kernel

import (
	"strings"
	"testing"
)

const hybridMountinfo = `22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
25 22 0:23 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,relatime shared:7 - cgroup2 cgroup2 rw
27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
30 22 0:30 / /sys/fs/bpf rw - bpf bpf rw,mode=700
31 1 0:31 / /mnt/with\040space rw - cgroup2 none rw
`

func TestPickCgroup2(t *testing.T) {
	ms, err := parseMountinfo(strings.NewReader(hybridMountinfo))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		ms   []mount
		want string
		err  bool
	}{
		{"hybrid host prefers unified", ms, "/sys/fs/cgroup/unified", false},
		{"unified host", []mount{{"/sys/fs/cgroup", "cgroup2"}, {"/x", "cgroup2"}}, "/sys/fs/cgroup", false},
		{"unusual place", []mount{{"/sys/fs/cgroup", "tmpfs"}, {"/mnt/cg", "cgroup2"}}, "/mnt/cg", false},
		{"v1 only", []mount{{"/sys/fs/cgroup/cpu", "cgroup"}}, "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := pickCgroup2(tc.ms)
			if (err != nil) != tc.err || got != tc.want {
				t.Fatalf("pickCgroup2 = %q, %v; want %q, err=%v", got, err, tc.want, tc.err)
			}
		})
	}
	if ms[len(ms)-1].point != "/mnt/with space" {
		t.Fatalf("octal escape not undone: %q", ms[len(ms)-1].point)
	}
}
