package kerneltest

import (
	"os"
	"strconv"
	"testing"
	"time"
)

func TestOwnerAlive(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		id   string
		made time.Time
		want bool
	}{
		{strconv.Itoa(os.Getpid()) + "-ab12cd34", now.Add(-48 * time.Hour), true}, // this process
		{"1-ab12cd34", now.Add(-48 * time.Hour), true},                            // init never dies
		{"2147483646-ab12cd34", now, false},                                       // no such process
		{"ab12cd34", now.Add(-time.Minute), true},                                 // no pid: young, maybe running
		{"ab12cd34", now.Add(-2 * time.Hour), false},                              // no pid: older than any test
	} {
		if got := ownerAlive(tc.id, tc.made); got != tc.want {
			t.Errorf("ownerAlive(%q, %s ago) = %v, want %v", tc.id, time.Since(tc.made).Round(time.Minute), got, tc.want)
		}
	}
}
