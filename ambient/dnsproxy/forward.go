package dnsproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// Upstream forwards the questions the mesh does not answer to the node's
// resolvers, with a cache that honours the answers' TTLs. Where its sockets
// live is the caller's Dial: from the asking pod (as ztunnel does: the
// resolver sees the pod's address; sockets recorded as the proxy's own so
// the kernel's capture leaves them alone), or from the daemon's network
// namespace, which is never enrolled.
type Upstream struct {
	servers []string // host:port
	timeout time.Duration
	cache   *cache
}

// Dial opens a connection for one upstream exchange ("udp" or "tcp").
type Dial func(ctx context.Context, network string, dst netip.AddrPort) (net.Conn, error)

// hostDial dials from the daemon's own network namespace.
func hostDial(ctx context.Context, network string, dst netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, network, dst.String())
}

// UpstreamConfig configures an Upstream.
type UpstreamConfig struct {
	// Servers are the resolvers to ask, in order (host:port). Empty: read
	// from ResolvConf.
	Servers []string
	// ResolvConf is the resolver configuration file whose nameservers are
	// asked (default /etc/resolv.conf).
	ResolvConf string
	// Timeout bounds one question's whole forwarding, every server and the
	// TCP retry included (default 2 s): a client gets SERVFAIL in that time
	// when the upstream is down, well before its own resolver gives up.
	Timeout time.Duration
	// CacheEntries bounds the cache (default 4096; negative: no cache).
	CacheEntries int
}

// NewUpstream reads the servers and prepares the forwarder.
func NewUpstream(cfg UpstreamConfig) (*Upstream, error) {
	servers := cfg.Servers
	if len(servers) == 0 {
		path := cfg.ResolvConf
		if path == "" {
			path = "/etc/resolv.conf"
		}
		rc, err := dns.ClientConfigFromFile(path)
		if err != nil {
			return nil, fmt.Errorf("reading the upstream resolvers from %s: %w", path, err)
		}
		for _, s := range rc.Servers {
			servers = append(servers, net.JoinHostPort(s, rc.Port))
		}
		if len(servers) == 0 {
			return nil, fmt.Errorf("%s names no nameserver", path)
		}
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 2 * time.Second
	}
	if cfg.CacheEntries == 0 {
		cfg.CacheEntries = 4096
	}
	for _, sv := range servers {
		if _, err := netip.ParseAddrPort(sv); err != nil {
			return nil, fmt.Errorf("upstream resolver %q: want ip:port", sv)
		}
	}
	u := &Upstream{servers: servers, timeout: cfg.Timeout}
	if cfg.CacheEntries > 0 {
		u.cache = newCache(cfg.CacheEntries)
	}
	return u, nil
}

// Servers returns the resolvers asked.
func (u *Upstream) Servers() []string { return u.servers }

// errNoAnswer: every upstream failed.
var errNoAnswer = errors.New("no upstream resolver answered")

// Exchange answers q (one question) from the cache or the upstream
// resolvers, through dial (nil: from the daemon's namespace): UDP first,
// TCP when the answer was truncated. The answer's ID is q's. cached
// reports an answer from the cache.
func (u *Upstream) Exchange(ctx context.Context, q *dns.Msg, dial Dial) (r *dns.Msg, cached bool, err error) {
	key := cacheKey(q)
	if u.cache != nil {
		if r := u.cache.get(key, time.Now()); r != nil {
			r.Id = q.Id
			return r, true, nil
		}
	}
	ctx, cancel := context.WithTimeout(ctx, u.timeout)
	defer cancel()
	out := q.Copy()
	out.Id = dns.Id() // our own ID towards the upstream: clients' IDs may collide
	err = errNoAnswer
	for _, s := range u.servers {
		dst := netip.MustParseAddrPort(s)
		d := dial
		if d == nil || dst.Addr().IsLoopback() {
			// A resolver on loopback is the daemon's neighbour, not
			// reachable from a pod's own loopback.
			d = hostDial
		}
		var rerr error
		r, rerr = exchange(ctx, d, "udp", dst, out)
		if rerr == nil && r.Truncated {
			r, rerr = exchange(ctx, d, "tcp", dst, out)
		}
		if rerr == nil {
			err = nil
			break
		}
		err = fmt.Errorf("%s: %w", s, rerr)
		if ctx.Err() != nil {
			break
		}
	}
	if err != nil {
		return nil, false, err
	}
	if u.cache != nil {
		u.cache.put(key, r, time.Now())
	}
	r.Id = q.Id
	return r, false, nil
}

// exchange sends q to dst over a new connection and reads the answer with
// q's ID and question (others are ignored: spoofed or late).
func exchange(ctx context.Context, dial Dial, network string, dst netip.AddrPort, q *dns.Msg) (*dns.Msg, error) {
	c, err := dial(ctx, network, dst)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if d, ok := ctx.Deadline(); ok {
		c.SetDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	co := &dns.Conn{Conn: c, UDPSize: dns.MaxMsgSize}
	if err := co.WriteMsg(q); err != nil {
		return nil, err
	}
	for {
		r, err := co.ReadMsg()
		if err != nil {
			return nil, err
		}
		if r.Id == q.Id && len(r.Question) == 1 && strings.EqualFold(r.Question[0].Name, q.Question[0].Name) &&
			r.Question[0].Qtype == q.Question[0].Qtype {
			return r, nil
		}
	}
}

// --- cache ---

// maxCacheTTL caps how long an answer is kept, whatever its TTL says;
// negativeTTL is used for a negative answer without an SOA.
const (
	maxCacheTTL = time.Hour
	negativeTTL = 30 * time.Second
)

type cacheEntry struct {
	msg     *dns.Msg
	stored  time.Time
	expires time.Time
}

// cache holds upstream answers by question until their TTL runs out. It
// is bounded: a full cache drops expired entries, then arbitrary ones.
type cache struct {
	mu  sync.Mutex
	max int
	m   map[string]cacheEntry
}

func newCache(max int) *cache { return &cache{max: max, m: make(map[string]cacheEntry)} }

// cacheKey is the question (name case-folded), with the DO and CD bits
// that change the answer.
func cacheKey(q *dns.Msg) string {
	qq := q.Question[0]
	do := false
	if o := q.IsEdns0(); o != nil {
		do = o.Do()
	}
	return fmt.Sprintf("%s/%d/%d/%t/%t", strings.ToLower(qq.Name), qq.Qtype, qq.Qclass, do, q.CheckingDisabled)
}

// ttlOf is how long an answer may be cached: the smallest TTL of its
// records (for a negative answer, the SOA's, bounded by its minimum),
// 0 for what must not be cached.
func ttlOf(r *dns.Msg) time.Duration {
	if r.Truncated || (r.Rcode != dns.RcodeSuccess && r.Rcode != dns.RcodeNameError) {
		return 0
	}
	var minTTL uint32
	first := true
	for _, sec := range [][]dns.RR{r.Answer, r.Ns} {
		for _, rr := range sec {
			ttl := rr.Header().Ttl
			if soa, ok := rr.(*dns.SOA); ok && soa.Minttl < ttl {
				ttl = soa.Minttl
			}
			if first || ttl < minTTL {
				minTTL, first = ttl, false
			}
		}
	}
	if first { // no records at all
		if len(r.Answer) == 0 {
			return negativeTTL
		}
		return 0
	}
	return min(time.Duration(minTTL)*time.Second, maxCacheTTL)
}

func (c *cache) get(key string, now time.Time) *dns.Msg {
	c.mu.Lock()
	e, ok := c.m[key]
	if ok && !now.Before(e.expires) {
		delete(c.m, key)
		ok = false
	}
	c.mu.Unlock()
	if !ok {
		return nil
	}
	// Records age while cached: hand out what is left of their TTL.
	r := e.msg.Copy()
	age := uint32(now.Sub(e.stored) / time.Second)
	for _, sec := range [][]dns.RR{r.Answer, r.Ns, r.Extra} {
		for _, rr := range sec {
			h := rr.Header()
			if h.Rrtype == dns.TypeOPT {
				continue
			}
			if h.Ttl > age {
				h.Ttl -= age
			} else {
				h.Ttl = 0
			}
		}
	}
	return r
}

func (c *cache) put(key string, r *dns.Msg, now time.Time) {
	ttl := ttlOf(r)
	if ttl <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.m[key]; !ok && len(c.m) >= c.max {
		for k, e := range c.m {
			if !now.Before(e.expires) {
				delete(c.m, k)
			}
		}
		for k := range c.m { // still full: drop arbitrary entries (map order)
			if len(c.m) < c.max {
				break
			}
			delete(c.m, k)
		}
	}
	c.m[key] = cacheEntry{msg: r.Copy(), stored: now, expires: now.Add(ttl)}
}

func (c *cache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m)
}
