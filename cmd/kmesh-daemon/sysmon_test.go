package main

import "testing"

func TestSysmonGODEBUG(t *testing.T) {
	for _, c := range []struct {
		godebug, park string
		want          string
		need          bool
	}{
		{"", "", sysmonSchedtrace, true},
		{"http2debug=1", "", "http2debug=1," + sysmonSchedtrace, true},
		{"schedtrace=1000", "", "schedtrace=1000", false},
		{"madvdontneed=1, schedtrace=0", "", "madvdontneed=1, schedtrace=0", false},
		{"", "true", "", false},
		{"http2debug=1", "false", "http2debug=1," + sysmonSchedtrace, true},
	} {
		got, need := sysmonGODEBUG(c.godebug, c.park)
		if got != c.want || need != c.need {
			t.Errorf("sysmonGODEBUG(%q, %q) = %q, %v; want %q, %v", c.godebug, c.park, got, need, c.want, c.need)
		}
	}
}
