package agent

import (
	"io"
	"log/slog"
	"runtime/debug"
	"testing"
)

func TestParseMemoryMax(t *testing.T) {
	for in, want := range map[string]int64{"max\n": 0, "268435456\n": 256 << 20, "0": 0} {
		if got, err := parseMemoryMax(in); err != nil || got != want {
			t.Errorf("%q: %d %v, want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "-1", "lots"} {
		if _, err := parseMemoryMax(in); err == nil {
			t.Errorf("%q parsed", in)
		}
	}
}

func TestMemoryPolicyLeavesTheEnvironmentsChoice(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	defer debug.SetMemoryLimit(debug.SetMemoryLimit(-1))
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	env := map[string]string{"GOGC": "200", "GOMEMLIMIT": "1GiB"}
	debug.SetGCPercent(200)
	SetMemoryPolicy(func(k string) string { return env[k] }, log)
	if got := debug.SetGCPercent(200); got != 200 {
		t.Fatalf("GOGC set in the environment was overridden: %d", got)
	}
	SetMemoryPolicy(func(string) string { return "" }, log)
	if got := debug.SetGCPercent(100); got != DefaultGCPercent {
		t.Fatalf("GC percent %d, want the daemon's default %d", got, DefaultGCPercent)
	}
}
