// Package redisbind is tether's Redis binding resolver: a key stays on the
// gateway it was first routed to (tether:bind:<key> → gateway ID, with a
// TTL refreshed on each connect) while the fleet changes, with the ring as
// the fallback whenever Redis is slow, down or refusing writes. It is a leaf
// package so that pkg/route, the Resolver interface and ring resolver, does
// not depend on go-redis.
package redisbind

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
	"github.com/tether-proxy/tether/pkg/route"
)

// Defaults of the proxy's --binding-ttl and --redis-timeout.
const (
	// DefaultTTL is how long a binding lives after its key's last connect.
	DefaultTTL = 30 * time.Minute
	// DefaultTimeout bounds the Redis work of one connect.
	DefaultTimeout = 50 * time.Millisecond
	// KeyPrefix prefixes every binding key in Redis.
	KeyPrefix = "tether:bind:"
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

// Config configures a Resolver.
type Config struct {
	// Client talks to Redis; required. Build it with NewClient so
	// every call fails fast.
	Client redis.UniversalClient
	// Ring holds the current gateways; required.
	Ring *ring.Holder
	// Candidates is how many gateways a Route carries; 0 means
	// route.DefaultCandidates.
	Candidates int
	// TTL is the binding lifetime, refreshed on every connect; 0 means
	// DefaultTTL.
	TTL time.Duration
	// Timeout bounds each Resolve's Redis work; 0 means
	// DefaultTimeout.
	Timeout time.Duration
	// Logger receives state changes (Redis lost, writes refused, Redis
	// back), once each; nil means none.
	Logger *zap.Logger
	// OnError, if set, is called for every failed Redis call (metrics);
	// IsWriteRefused tells a refusal from an outage.
	OnError func(error)
	// Now is the clock for the retry windows; nil means time.Now.
	Now func() time.Time
}

// Redis health as the resolver sees it; each change is logged once.
const (
	redisHealthy       int32 = iota
	redisDown                // no answer: the ring routes every key
	redisWritesRefused       // answers reads, refuses writes (OOM, read-only replica, ACL)
)

// IsWriteRefused reports whether err is Redis answering with an error
// (out of memory under noeviction, a read-only replica, an ACL or auth
// refusal) rather than not answering: reads may still work.
func IsWriteRefused(err error) bool {
	var re redis.Error
	return err != nil && !errors.Is(err, redis.Nil) && errors.As(err, &re)
}

// Resolver resolves keys through Redis bindings (tether:bind:<key> →
// gateway ID), falling back to the ring. A binding to a live, non-draining
// gateway wins; a new key is bound to its ring owner with SET NX GET, so two
// proxies racing on it agree; a binding to a dead or draining gateway is
// moved to the ring owner with a compare-and-set. The common path — a new
// key or a live binding — is one round trip: one EVALSHA running SET NX GET
// and, for an existing binding, PEXPIRE.
type Resolver struct {
	cfg           Config
	log           *zap.Logger
	state         atomic.Int32 // redisHealthy, redisDown or redisWritesRefused
	skipUntil     atomic.Int64 // unix nanos before which Redis is not tried
	readOnlyUntil atomic.Int64 // unix nanos before which only reads are tried
}

var _ route.Resolver = (*Resolver)(nil)

// New checks cfg and returns a resolver.
func New(cfg Config) (*Resolver, error) {
	if cfg.Client == nil || cfg.Ring == nil {
		return nil, errors.New("route: binding resolver needs a Redis client and a ring")
	}
	if cfg.Candidates <= 0 {
		cfg.Candidates = route.DefaultCandidates
	}
	if cfg.TTL <= 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Resolver{cfg: cfg, log: cfg.Logger}, nil
}

// Resolve implements Resolver. It never fails because of Redis: when Redis
// is slow or down it answers from the ring within the timeout, with
// route.SourceFallback. When Redis answers but refuses writes (full under
// noeviction, a read-only replica, an ACL), existing bindings are still
// read and honoured; new keys go to their ring owner without being stored.
func (b *Resolver) Resolve(ctx context.Context, key []byte) (route.Route, error) {
	rg := b.cfg.Ring.Load()
	cands, ok := b.ringCandidates(rg, key)
	if !ok {
		return route.Route{}, route.ErrNoGateway
	}
	now := b.cfg.Now().UnixNano()
	if now < b.skipUntil.Load() {
		return route.Route{Source: route.SourceFallback, Candidates: cands}, nil
	}
	ctx, cancel := context.WithTimeout(ctx, b.cfg.Timeout)
	defer cancel()
	rkey := KeyPrefix + string(key)
	if now < b.readOnlyUntil.Load() {
		return b.readOnly(ctx, rg, rkey, cands, nil)
	}
	owner := cands[0].ID

	ttl := b.cfg.TTL.Milliseconds()
	bound, err := bindScript.Run(ctx, b.cfg.Client, []string{rkey}, owner, ttl).Text()
	switch {
	case errors.Is(err, redis.Nil): // no binding: ours is stored
		b.setState(redisHealthy, nil)
		return route.Route{Source: route.SourceRing, Candidates: cands}, nil
	case IsWriteRefused(err):
		return b.readOnly(ctx, rg, rkey, cands, err)
	case err != nil:
		return b.fallback(cands, err)
	}
	b.setState(redisHealthy, nil)
	if r, ok := bindingRoute(rg, bound, cands); ok {
		return r, nil
	}
	// Bound to a dead or draining gateway: move it to the ring owner,
	// unless another proxy already did.
	cur, err := rebindScript.Run(ctx, b.cfg.Client, []string{rkey}, bound, owner, ttl).Text()
	if IsWriteRefused(err) {
		b.refused(err)
		return route.Route{Source: route.SourceFallback, Candidates: cands}, nil
	}
	if err != nil {
		return b.fallback(cands, err)
	}
	if r, ok := bindingRoute(rg, cur, cands); ok {
		if cur == owner {
			r.Source = route.SourceRing
		}
		return r, nil
	}
	// Someone bound it to a gateway we do not consider live either: our
	// view may be stale; serve from the ring without fighting over it.
	return route.Route{Source: route.SourceRing, Candidates: cands}, nil
}

var _ route.Looker = (*Resolver)(nil)

// LookupRoutes implements route.Looker: where a connect for each key goes
// now, read with one pipelined GET per key (one round trip for the batch).
// It never creates or refreshes a binding: a key without one is answered
// with its ring owner, as a connect would bind it; a binding to a gateway
// that is gone or draining is answered with the ring owner a connect would
// move it to. While Redis does not answer every key gets its ring route,
// route.SourceFallback, as connects do.
func (b *Resolver) LookupRoutes(ctx context.Context, keys []string) ([]route.Route, error) {
	rg := b.cfg.Ring.Load()
	routes := make([]route.Route, len(keys))
	for i, k := range keys {
		cands, ok := b.ringCandidates(rg, []byte(k))
		if !ok {
			return nil, route.ErrNoGateway
		}
		routes[i] = route.Route{Source: route.SourceFallback, Candidates: cands}
	}
	if len(keys) == 0 || b.cfg.Now().UnixNano() < b.skipUntil.Load() {
		return routes, nil
	}
	// A batch gets one more timeout per 250 keys: 1000 GETs are one
	// round trip but Redis takes a moment to run them.
	ctx, cancel := context.WithTimeout(ctx, b.cfg.Timeout*time.Duration(1+len(keys)/250))
	defer cancel()
	cmds := make([]*redis.StringCmd, len(keys))
	_, err := b.cfg.Client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range keys {
			cmds[i] = p.Get(ctx, KeyPrefix+k)
		}
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) && !IsWriteRefused(err) {
		b.down(err)
		return routes, nil
	}
	for i, cmd := range cmds {
		bound, err := cmd.Result()
		switch {
		case errors.Is(err, redis.Nil):
			routes[i].Source = route.SourceRing
		case err != nil:
			// Redis refused the read (NOAUTH, ACL): fallback, as a
			// connect would be.
			if b.cfg.OnError != nil {
				b.cfg.OnError(err)
			}
		default:
			if r, ok := bindingRoute(rg, bound, routes[i].Candidates); ok {
				routes[i] = r
			} else {
				routes[i].Source = route.SourceRing
			}
		}
	}
	return routes, nil
}

// ringCandidates is key's failover order on rg, owner first; false when
// no gateway takes keys.
func (b *Resolver) ringCandidates(rg *ring.Ring, key []byte) ([]route.Gateway, bool) {
	cands := make([]route.Gateway, min(b.cfg.Candidates, rg.Len()))
	return cands, rg.LookupN(key, cands) > 0
}

// readOnly serves a key while Redis refuses writes (werr, or nil inside the
// window after a refusal): a plain GET honours the binding in force; a key
// without a live one goes to its ring owner, unstored. For breakerPeriod
// after a refusal connects skip the write and pay one round trip.
func (b *Resolver) readOnly(ctx context.Context, rg *ring.Ring, rkey string, cands []route.Gateway, werr error) (route.Route, error) {
	if werr != nil {
		b.refused(werr)
	}
	bound, err := b.cfg.Client.Get(ctx, rkey).Result()
	switch {
	case errors.Is(err, redis.Nil):
	case err != nil && !IsWriteRefused(err):
		return b.fallback(cands, err)
	case err != nil:
		// Not even reads (NOAUTH, ACL): the ring alone, as when down.
		if b.cfg.OnError != nil {
			b.cfg.OnError(err)
		}
	default:
		if r, ok := bindingRoute(rg, bound, cands); ok {
			return r, nil
		}
	}
	return route.Route{Source: route.SourceFallback, Candidates: cands}, nil
}

// refused records a write refusal: counted, logged once per state change,
// and writes skipped for breakerPeriod.
func (b *Resolver) refused(err error) {
	b.readOnlyUntil.Store(b.cfg.Now().Add(breakerPeriod).UnixNano())
	if b.cfg.OnError != nil {
		b.cfg.OnError(err)
	}
	b.setState(redisWritesRefused, err)
}

// setState logs a change of Redis health once.
func (b *Resolver) setState(st int32, err error) {
	prev := b.state.Swap(st)
	if prev == st {
		return
	}
	switch st {
	case redisDown:
		b.log.Warn("redis unavailable: routing by the ring until it answers", zap.Error(err))
	case redisWritesRefused:
		b.log.Warn("redis refuses writes: existing bindings are still honoured; new keys go to their ring owner unbound, and bindings are not refreshed",
			zap.String("redis_error", err.Error()))
	case redisHealthy:
		if prev == redisWritesRefused {
			b.log.Info("redis accepts writes again: bindings in use")
		} else {
			b.log.Info("redis answered again: bindings in use")
		}
	}
}

// bindingRoute puts a live, non-draining bound gateway first, followed by
// the ring candidates without it. It reports false if the gateway is not
// live or draining.
func bindingRoute(rg *ring.Ring, id string, cands []route.Gateway) (route.Route, bool) {
	m, ok := rg.Member(id)
	if !ok || m.Weight <= 0 {
		return route.Route{}, false
	}
	out := make([]route.Gateway, 0, len(cands))
	out = append(out, m)
	for _, c := range cands {
		if c.ID != id && len(out) < len(cands) {
			out = append(out, c)
		}
	}
	return route.Route{Source: route.SourceBinding, Candidates: out}, true
}

func (b *Resolver) fallback(cands []route.Gateway, err error) (route.Route, error) {
	b.down(err)
	return route.Route{Source: route.SourceFallback, Candidates: cands}, nil
}

// down records Redis not answering: counted, logged once per state change,
// and Redis skipped for breakerPeriod.
func (b *Resolver) down(err error) {
	b.skipUntil.Store(b.cfg.Now().Add(breakerPeriod).UnixNano())
	if b.cfg.OnError != nil {
		b.cfg.OnError(err)
	}
	b.setState(redisDown, err)
}

// Preload loads the scripts into Redis so the first connections do not pay
// a NOSCRIPT round trip. Failure is harmless (scripts load on first use).
func (b *Resolver) Preload(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*b.cfg.Timeout)
	defer cancel()
	if err := bindScript.Load(ctx, b.cfg.Client).Err(); err != nil {
		return err
	}
	return rebindScript.Load(ctx, b.cfg.Client).Err()
}

// NewClient builds a client from a URL, configured to fail fast
// (context deadlines honoured, one retry, short dial and pool timeouts) so a
// dead Redis never stalls connects. Accepted forms:
//
//	redis://[user:pass@]host:port[/db]              a single node (rediss:// for TLS)
//	redis://host:port?master_name=NAME[&addr=...]   Sentinel
//	redis+cluster://host:port[?addr=host:port...]   Redis Cluster
func NewClient(rawURL string, timeout time.Duration) (redis.UniversalClient, error) {
	if timeout <= 0 {
		timeout = DefaultTimeout
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
