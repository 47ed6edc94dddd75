package route

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/tether-proxy/tether/pkg/ring"
)

// SourceFallback means Redis did not answer in time and the ring chose.
const SourceFallback Source = "fallback"

// Binding defaults (DESIGN §2 --binding-ttl, --redis-timeout).
const (
	DefaultBindingTTL   = 30 * time.Minute
	DefaultRedisTimeout = 50 * time.Millisecond
	// BindingKeyPrefix prefixes every binding key in Redis.
	BindingKeyPrefix = "tether:bind:"
	// breakerPeriod is how long Redis is skipped after a failure before the
	// next connection probes it again: while Redis is down, connections
	// do not each pay the timeout.
	breakerPeriod = 500 * time.Millisecond
)

// bindScript is the connect path in one round trip: SET NX GET stores the
// ring owner for a new key (two proxies racing agree on whoever came first)
// and returns the binding in force otherwise, whose TTL it refreshes.
var bindScript = redis.NewScript(`
local old = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'GET', 'PX', ARGV[2])
if old then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return old`)

// rebindScript moves a binding from a dead gateway to a new one only if it
// still names the dead one, so a proxy with a stale view cannot overwrite a
// binding another proxy just refreshed. It returns the binding in force.
var rebindScript = redis.NewScript(`
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return ARGV[2]
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return cur`)

// BindingConfig configures a BindingResolver.
type BindingConfig struct {
	// Client talks to Redis; required. Build it with NewRedisClient so
	// every call fails fast.
	Client redis.UniversalClient
	// Ring holds the current gateways; required.
	Ring *ring.Holder
	// Candidates is how many gateways a Route carries; 0 means
	// DefaultCandidates.
	Candidates int
	// TTL is the binding lifetime, refreshed on every connect; 0 means
	// DefaultBindingTTL.
	TTL time.Duration
	// Timeout bounds each Resolve's Redis work; 0 means
	// DefaultRedisTimeout.
	Timeout time.Duration
	// Logger receives state changes (Redis lost, Redis back); nil means
	// none.
	Logger *zap.Logger
	// OnError, if set, is called for every failed Redis call (metrics).
	OnError func(error)
}

// BindingResolver resolves keys through Redis bindings (tether:bind:<key> →
// gateway ID), falling back to the ring. A binding to a live, non-draining
// gateway wins; a new key is bound to its ring owner with SET NX GET, so two
// proxies racing on it agree; a binding to a dead or draining gateway is
// moved to the ring owner with a compare-and-set. The common path — a new
// key or a live binding — is one round trip: one EVALSHA running SET NX GET
// and, for an existing binding, PEXPIRE.
type BindingResolver struct {
	cfg       BindingConfig
	log       *zap.Logger
	down      atomic.Bool  // Redis is failing (for state-change logs)
	skipUntil atomic.Int64 // unix nanos before which Redis is not tried
}

var _ Resolver = (*BindingResolver)(nil)

// NewBindingResolver checks cfg and returns a resolver.
func NewBindingResolver(cfg BindingConfig) (*BindingResolver, error) {
	if cfg.Client == nil || cfg.Ring == nil {
		return nil, errors.New("route: binding resolver needs a Redis client and a ring")
	}
	if cfg.Candidates <= 0 {
		cfg.Candidates = DefaultCandidates
	}
	if cfg.TTL <= 0 {
		cfg.TTL = DefaultBindingTTL
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultRedisTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	return &BindingResolver{cfg: cfg, log: cfg.Logger}, nil
}

// Resolve implements Resolver. It never fails because of Redis: when Redis
// is slow or down it answers from the ring within the timeout, with
// SourceFallback.
func (b *BindingResolver) Resolve(ctx context.Context, key []byte) (Route, error) {
	rg := b.cfg.Ring.Load()
	cands := make([]Gateway, min(b.cfg.Candidates, rg.Len()))
	if rg.LookupN(key, cands) == 0 {
		return Route{}, ErrNoGateway
	}
	if time.Now().UnixNano() < b.skipUntil.Load() {
		return Route{Source: SourceFallback, Candidates: cands}, nil
	}
	ctx, cancel := context.WithTimeout(ctx, b.cfg.Timeout)
	defer cancel()
	rkey := BindingKeyPrefix + string(key)
	owner := cands[0].ID

	ttl := b.cfg.TTL.Milliseconds()
	bound, err := bindScript.Run(ctx, b.cfg.Client, []string{rkey}, owner, ttl).Text()
	switch {
	case errors.Is(err, redis.Nil): // no binding: ours is stored
		b.healthy()
		return Route{Source: SourceRing, Candidates: cands}, nil
	case err != nil:
		return b.fallback(cands, err)
	}
	b.healthy()
	if r, ok := bindingRoute(rg, bound, cands); ok {
		return r, nil
	}
	// Bound to a dead or draining gateway: move it to the ring owner,
	// unless another proxy already did.
	cur, err := rebindScript.Run(ctx, b.cfg.Client, []string{rkey}, bound, owner, ttl).Text()
	if err != nil {
		return b.fallback(cands, err)
	}
	if r, ok := bindingRoute(rg, cur, cands); ok {
		if cur == owner {
			r.Source = SourceRing
		}
		return r, nil
	}
	// Someone bound it to a gateway we do not consider live either: our
	// view may be stale; serve from the ring without fighting over it.
	return Route{Source: SourceRing, Candidates: cands}, nil
}

// bindingRoute puts a live, non-draining bound gateway first, followed by
// the ring candidates without it. It reports false if the gateway is not
// live or draining.
func bindingRoute(rg *ring.Ring, id string, cands []Gateway) (Route, bool) {
	m, ok := rg.Member(id)
	if !ok || m.Weight <= 0 {
		return Route{}, false
	}
	out := make([]Gateway, 0, len(cands))
	out = append(out, m)
	for _, c := range cands {
		if c.ID != id && len(out) < len(cands) {
			out = append(out, c)
		}
	}
	return Route{Source: SourceBinding, Candidates: out}, true
}

func (b *BindingResolver) fallback(cands []Gateway, err error) (Route, error) {
	b.skipUntil.Store(time.Now().Add(breakerPeriod).UnixNano())
	if b.cfg.OnError != nil {
		b.cfg.OnError(err)
	}
	if !b.down.Swap(true) {
		b.log.Warn("redis unavailable: routing by the ring until it answers", zap.Error(err))
	}
	return Route{Source: SourceFallback, Candidates: cands}, nil
}

func (b *BindingResolver) healthy() {
	if b.down.Swap(false) {
		b.log.Info("redis answered again: bindings in use")
	}
}

// Preload loads the scripts into Redis so the first connections do not pay
// a NOSCRIPT round trip. Failure is harmless (scripts load on first use).
func (b *BindingResolver) Preload(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*b.cfg.Timeout)
	defer cancel()
	if err := bindScript.Load(ctx, b.cfg.Client).Err(); err != nil {
		return err
	}
	return rebindScript.Load(ctx, b.cfg.Client).Err()
}

// NewRedisClient builds a client from a URL, configured to fail fast
// (context deadlines honoured, one retry, short dial and pool timeouts) so a
// dead Redis never stalls connects. Accepted forms:
//
//	redis://[user:pass@]host:port[/db]              a single node (rediss:// for TLS)
//	redis://host:port?master_name=NAME[&addr=...]   Sentinel
//	redis+cluster://host:port[?addr=host:port...]   Redis Cluster
func NewRedisClient(rawURL string, timeout time.Duration) (redis.UniversalClient, error) {
	if timeout <= 0 {
		timeout = DefaultRedisTimeout
	}
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("--redis %q: %w", rawURL, err)
	}
	dial := max(4*timeout, 200*time.Millisecond)
	switch {
	case u.Scheme == "redis+cluster" || u.Scheme == "rediss+cluster":
		opt, err := redis.ParseClusterURL(strings.Replace(rawURL, "+cluster", "", 1))
		if err != nil {
			return nil, fmt.Errorf("--redis: %w", err)
		}
		opt.ContextTimeoutEnabled, opt.MaxRetries = true, 1
		opt.DialTimeout, opt.ReadTimeout, opt.WriteTimeout, opt.PoolTimeout = dial, timeout, timeout, timeout
		return redis.NewClusterClient(opt), nil
	case u.Query().Has("master_name"):
		opt, err := redis.ParseFailoverURL(rawURL)
		if err != nil {
			return nil, fmt.Errorf("--redis: %w", err)
		}
		opt.ContextTimeoutEnabled, opt.MaxRetries = true, 1
		opt.DialTimeout, opt.ReadTimeout, opt.WriteTimeout, opt.PoolTimeout = dial, timeout, timeout, timeout
		return redis.NewFailoverClient(opt), nil
	default:
		opt, err := redis.ParseURL(rawURL)
		if err != nil {
			return nil, fmt.Errorf("--redis: %w", err)
		}
		opt.ContextTimeoutEnabled, opt.MaxRetries = true, 1
		opt.DialTimeout, opt.ReadTimeout, opt.WriteTimeout, opt.PoolTimeout = dial, timeout, timeout, timeout
		return redis.NewClient(opt), nil
	}
}
