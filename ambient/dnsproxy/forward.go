package dnsproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// Upstream forwards the questions the mesh does not answer to the node's
// resolvers, with a cache that honours the answers' TTLs. Its sockets are
// the daemon's own, created in the daemon's network namespace, which is
// never enrolled: the kernel's DNS capture cannot send them back to us.
type Upstream struct {
	servers []string // host:port
	timeout time.Duration
	cache   *cache
	udp     *dns.Client
	tcp     *dns.Client
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
	u := &Upstream{servers: servers, timeout: cfg.Timeout,
		udp: &dns.Client{Net: "udp", UDPSize: dns.MaxMsgSize, Timeout: cfg.Timeout},
		tcp: &dns.Client{Net: "tcp", Timeout: cfg.Timeout}}
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
// resolvers: UDP first, TCP when the answer was truncated. The answer's ID
// is q's. cached reports an answer from the cache.
func (u *Upstream) Exchange(ctx context.Context, q *dns.Msg) (r *dns.Msg, cached bool, err error) {
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
		var rerr error
		r, _, rerr = u.udp.ExchangeContext(ctx, out, s)
		if rerr == nil && r.Truncated {
			r, _, rerr = u.tcp.ExchangeContext(ctx, out, s)
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
