package bench

import (
	"math"
	"math/rand/v2"
	"slices"
)

// Median of xs (NaN for none).
func Median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// Ratio is a median ratio against the baseline with a 95% interval.
type Ratio struct {
	Median float64 `json:"median"`
	Low    float64 `json:"ci95_low"`
	High   float64 `json:"ci95_high"`
}

// Ratios summarises per-repetition ratios (arm/baseline, each repetition
// against the baseline measured next to it): the median, and a bootstrap
// 95% interval of the median. Deterministic (fixed seed) so reports are
// reproducible from the same samples.
func Ratios(rs []float64) Ratio {
	var clean []float64
	for _, r := range rs {
		if !math.IsNaN(r) && !math.IsInf(r, 0) {
			clean = append(clean, r)
		}
	}
	if len(clean) == 0 {
		return Ratio{math.NaN(), math.NaN(), math.NaN()}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	const n = 2000
	meds := make([]float64, n)
	buf := make([]float64, len(clean))
	for i := range meds {
		for j := range buf {
			buf[j] = clean[rng.IntN(len(clean))]
		}
		meds[i] = Median(buf)
	}
	slices.Sort(meds)
	return Ratio{Median: Median(clean), Low: meds[n*25/1000], High: meds[n*975/1000]}
}
