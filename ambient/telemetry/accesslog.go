package telemetry

import (
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Record is one access log line: a connection that ended (or never began).
type Record struct {
	Time time.Time
	Conn *Conn
	// Duration is how long the connection was open; negative: unknown
	// (a kernel-path connection opened before this daemon started).
	Duration time.Duration
	// BytesSent: server to client; BytesRecv: client to server — the
	// same counters as istio_tcp_sent_bytes_total and
	// istio_tcp_received_bytes_total.
	BytesSent, BytesRecv uint64
	// Err is why the connection failed or was reset; empty when it
	// completed.
	Err string
	// Failed: the connection never opened.
	Failed bool
}

// Message is ztunnel's text for the record: "connection complete" (at
// info; at error with error=... when it was reset), or "connection
// failed" when it never opened.
func (r *Record) Message() (level, msg string) {
	switch {
	case r.Failed:
		return "error", "connection failed"
	case r.Err != "":
		return "error", "connection complete"
	}
	return "info", "connection complete"
}

// field is one key and value of a record, in ztunnel's order.
type field struct {
	key   string
	value any // string (quoted in text) or uint64/raw string (bare)
	bare  bool
}

// fields lists the record's fields in ztunnel's order, leaving out those
// it leaves out when unknown (src.identity only with mTLS).
func (r *Record) fields() []field {
	c := r.Conn
	var fs []field
	add := func(k, v string, bare bool) {
		if v != "" {
			fs = append(fs, field{k, v, bare})
		}
	}
	srcAddr, dstAddr := c.Addrs()
	add("src.addr", srcAddr, true)
	add("src.workload", c.Src.Workload, false)
	add("src.namespace", c.Src.Namespace, false)
	if c.MTLS {
		add("src.identity", c.Src.Principal, false)
	}
	add("dst.addr", dstAddr, true)
	add("dst.service", c.DstService, false)
	add("dst.workload", c.Dst.Workload, false)
	add("dst.namespace", c.Dst.Namespace, false)
	if c.MTLS {
		add("dst.identity", c.Dst.Principal, false)
	}
	add("direction", c.Direction, false)
	fs = append(fs, field{"bytes_sent", r.BytesSent, true}, field{"bytes_recv", r.BytesRecv, true})
	if r.Duration >= 0 {
		fs = append(fs, field{"duration", fmt.Sprintf("%dms", r.Duration.Milliseconds()), false})
	}
	add("error", r.Err, false)
	return fs
}

// FormatText renders the record as ztunnel's default format does:
// tab-separated time, level, target "access", message, then key=value
// pairs separated by spaces, strings quoted.
func FormatText(r *Record) string {
	level, msg := r.Message()
	var b strings.Builder
	b.WriteString(r.Time.UTC().Format("2006-01-02T15:04:05.000000Z"))
	b.WriteString("\t" + level + "\taccess\t" + msg)
	for i, f := range r.fields() {
		if i == 0 {
			b.WriteByte('\t')
		} else {
			b.WriteByte(' ')
		}
		b.WriteString(f.key + "=")
		switch v := f.value.(type) {
		case string:
			if f.bare {
				b.WriteString(v)
			} else {
				b.WriteString(strconv.Quote(v))
			}
		default:
			fmt.Fprint(&b, v)
		}
	}
	return b.String()
}

// FormatJSON renders the record as ztunnel does with LOG_FORMAT=json: one
// object with level, time, scope "access", message and the fields.
func FormatJSON(r *Record) string {
	level, msg := r.Message()
	// Built by hand to keep ztunnel's key order (level, time, scope,
	// message, fields); values are encoded by encoding/json.
	var b strings.Builder
	kv := func(k string, v any) {
		kb, _ := json.Marshal(k)
		vb, _ := json.Marshal(v)
		b.Write(kb)
		b.WriteByte(':')
		b.Write(vb)
	}
	b.WriteByte('{')
	kv("level", level)
	b.WriteByte(',')
	kv("time", r.Time.UTC().Format("2006-01-02T15:04:05.000000Z"))
	b.WriteByte(',')
	kv("scope", "access")
	b.WriteByte(',')
	kv("message", msg)
	for _, f := range r.fields() {
		b.WriteByte(',')
		kv(f.key, f.value)
	}
	b.WriteByte('}')
	return b.String()
}

// Bucket is a token bucket: Rate tokens a second, at most Burst saved.
// Not safe for concurrent use (AccessLog locks around it).
type Bucket struct {
	Rate, Burst float64
	tokens      float64
	last        time.Time
}

// Take spends one token if there is one at now.
func (b *Bucket) Take(now time.Time) bool {
	if b.last.IsZero() {
		b.tokens = b.Burst
	} else if d := now.Sub(b.last).Seconds(); d > 0 {
		b.tokens = min(b.Burst, b.tokens+d*b.Rate)
	}
	b.last = now
	if b.tokens >= 1 {
		b.tokens--
		return true
	}
	return false
}

// LogConfig configures the access log.
type LogConfig struct {
	// JSON: ztunnel's LOG_FORMAT=json; otherwise its text format.
	JSON bool
	// Rate and Burst bound the lines a second (default 100, burst 1000);
	// lines beyond are dropped and counted, never queued.
	Rate, Burst float64
	// Enabled at start (switch at runtime with AccessLog.Enabled).
	Enabled bool
}

// AccessLog writes access log lines for both paths.
type AccessLog struct {
	// Enabled switches the log at runtime (the admin server's hook, and
	// kmeshctl's access-log toggle, set it).
	Enabled atomic.Bool
	json    bool
	dropped func()

	mu     sync.Mutex
	w      io.Writer
	bucket Bucket
}

// NewAccessLog writes to w; dropped (may be nil) is called for each line
// the rate limit suppressed.
func NewAccessLog(w io.Writer, cfg LogConfig, dropped func()) *AccessLog {
	if cfg.Rate <= 0 {
		cfg.Rate = 100
	}
	if cfg.Burst < 1 {
		cfg.Burst = 1000
	}
	if dropped == nil {
		dropped = func() {}
	}
	l := &AccessLog{json: cfg.JSON, dropped: dropped, w: w, bucket: Bucket{Rate: cfg.Rate, Burst: cfg.Burst}}
	l.Enabled.Store(cfg.Enabled)
	return l
}

// Log writes one record if the log is on and the rate allows. A nil
// AccessLog logs nothing.
func (l *AccessLog) Log(r *Record) {
	if r.Time.IsZero() {
		r.Time = time.Now()
	}
	if l.Admit(r.Time) {
		l.Write(r)
	}
}

// Admit says whether a line at now may be written (the log is on and the
// rate allows; a suppressed line is counted). Callers that would build
// the record only for the log ask first: most lines of a busy node are
// suppressed, and building one costs more than deciding.
func (l *AccessLog) Admit(now time.Time) bool {
	if l == nil || !l.Enabled.Load() {
		return false
	}
	l.mu.Lock()
	ok := l.bucket.Take(now)
	l.mu.Unlock()
	if !ok {
		l.dropped()
	}
	return ok
}

// Write writes a record Admit let through.
func (l *AccessLog) Write(r *Record) {
	if r.Time.IsZero() {
		r.Time = time.Now()
	}
	var line string
	if l.json {
		line = FormatJSON(r)
	} else {
		line = FormatText(r)
	}
	l.mu.Lock()
	_, _ = io.WriteString(l.w, line+"\n")
	l.mu.Unlock()
}
