package bench

import (
	"math"
	"os"
	"testing"
)

func open(t *testing.T, name string) *os.File {
	t.Helper()
	f, err := os.Open("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func TestParseFortio(t *testing.T) {
	for _, name := range []string{"fortio-http.json", "fortio-tcp.json"} {
		s, err := ParseFortio(open(t, name))
		if err != nil {
			t.Fatal(err)
		}
		if s.Count != 200 || s.Errors != 0 || s.P50 < 100 || s.P50 > 300 || s.P99 < s.P50 || s.P999 < s.P99 || math.Abs(s.Rate-199) > 2 {
			t.Errorf("%s: %+v", name, s)
		}
	}
}

func TestParseSockperf(t *testing.T) {
	s, err := ParseSockperf(open(t, "sockperf.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if s.P50 != 20.674 || s.P99 != 37.64 || s.P999 != 55.694 || s.Count != 25354 {
		t.Errorf("%+v", s)
	}
}

func TestRatios(t *testing.T) {
	r := Ratios([]float64{1.01, 1.02, 0.99, 1.03, 1.00})
	if r.Median != 1.01 || r.Low > r.Median || r.High < r.Median || r.Low < 0.99 || r.High > 1.03 {
		t.Errorf("%+v", r)
	}
	if r := Ratios(nil); !math.IsNaN(r.Median) {
		t.Errorf("no data must give NaN, got %+v", r)
	}
	if Median([]float64{3, 1, 2, 4}) != 2.5 {
		t.Error("median of an even count")
	}
}

func TestReadSystemCPU(t *testing.T) {
	s, err := ReadSystemCPU()
	if err != nil {
		t.Fatal(err)
	}
	if s.Total == 0 || s.Busy > s.Total {
		t.Errorf("%+v", s)
	}
	if _, err := TaskCPU(os.Getpid()); err != nil {
		t.Error(err)
	}
}
