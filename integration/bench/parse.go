package bench

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"
)

// Sample is one measured run of one tool against one arm.
type Sample struct {
	// Latency percentiles in microseconds (zero when the tool has none).
	P50, P99, P999 float64
	// Rate is requests (or connections, or messages) per second achieved.
	Rate float64
	// Count is how many requests the run completed; Errors how many failed.
	Count, Errors int64
	// Gbps is throughput for iperf3 runs.
	Gbps float64
}

// fortioResult is the part of fortio's -json output we use.
type fortioResult struct {
	ActualQPS               float64
	RetCodes                map[string]int64
	ErrorsDurationHistogram struct {
		Count int64
	}
	DurationHistogram struct {
		Count       int64
		Percentiles []struct {
			Percentile float64
			Value      float64 // seconds
		}
	}
}

// ParseFortio reads fortio's JSON result (http and tcp load).
func ParseFortio(r io.Reader) (Sample, error) {
	var f fortioResult
	if err := json.NewDecoder(r).Decode(&f); err != nil {
		return Sample{}, fmt.Errorf("fortio output: %w", err)
	}
	s := Sample{Rate: f.ActualQPS, Count: f.DurationHistogram.Count}
	for code, n := range f.RetCodes {
		if code != "200" && code != "OK" { // HTTP status, or "OK" for tcp:// runs
			s.Errors += n
		}
	}
	s.Errors = max(s.Errors, f.ErrorsDurationHistogram.Count)
	for _, p := range f.DurationHistogram.Percentiles {
		us := p.Value * 1e6
		switch p.Percentile {
		case 50:
			s.P50 = us
		case 99:
			s.P99 = us
		case 99.9:
			s.P999 = us
		}
	}
	return s, nil
}

var sockperfPct = regexp.MustCompile(`percentile\s+([0-9.]+)\s+=\s+([0-9.]+)`)
var sockperfTotal = regexp.MustCompile(`\[Valid Duration\] RunTime=([0-9.]+) sec; SentMessages=(\d+); ReceivedMessages=(\d+)`)

// ParseSockperf reads sockperf ping-pong output (microseconds).
func ParseSockperf(r io.Reader) (Sample, error) {
	var s Sample
	sc := bufio.NewScanner(r)
	found := false
	for sc.Scan() {
		line := sc.Text()
		if m := sockperfPct.FindStringSubmatch(line); m != nil {
			v, _ := strconv.ParseFloat(m[2], 64)
			switch m[1] {
			case "50.000":
				s.P50, found = v, true
			case "99.000":
				s.P99 = v
			case "99.900":
				s.P999 = v
			}
		}
		if m := sockperfTotal.FindStringSubmatch(line); m != nil {
			d, _ := strconv.ParseFloat(m[1], 64)
			rcv, _ := strconv.ParseInt(m[3], 10, 64)
			s.Count = rcv
			if d > 0 {
				s.Rate = float64(rcv) / d
			}
		}
	}
	if !found {
		return s, fmt.Errorf("sockperf output has no percentiles")
	}
	return s, sc.Err()
}

// ParseIperf3 reads iperf3 -J output.
func ParseIperf3(r io.Reader) (Sample, error) {
	var out struct {
		Error string
		End   struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
				Bytes         float64
			} `json:"sum_received"`
			SumSent struct {
				Retransmits int64
			} `json:"sum_sent"`
		}
	}
	b, err := io.ReadAll(r)
	if err != nil {
		return Sample{}, err
	}
	if err := json.Unmarshal(b, &out); err != nil {
		return Sample{}, fmt.Errorf("iperf3 output: %w: %s", err, strings.TrimSpace(string(b)))
	}
	if out.Error != "" {
		return Sample{}, fmt.Errorf("iperf3: %s", out.Error)
	}
	return Sample{Gbps: out.End.SumReceived.BitsPerSecond / 1e9, Count: int64(out.End.SumReceived.Bytes)}, nil
}
