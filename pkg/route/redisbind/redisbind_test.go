package redisbind

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tether-proxy/tether/internal/testenv"
	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route"
)

func holder(t *testing.T, ms ...ring.Member) *ring.Holder {
	t.Helper()
	r, err := ring.New(ms)
	if err != nil {
		t.Fatal(err)
	}
	var h ring.Holder
	h.Store(r)
	return &h
}

func gws(weights ...float64) []ring.Member {
	out := make([]ring.Member, len(weights))
	for i, w := range weights {
		out[i] = ring.Member{ID: fmt.Sprintf("gw-%d", i+1), Addr: fmt.Sprintf("127.0.1.%d:9000", i+1), Weight: w}
	}
	return out
}

// countingHook counts commands (pipelines count once) the client sends.
type countingHook struct{ n atomic.Int64 }

func (h *countingHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *countingHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error { h.n.Add(1); return next(ctx, cmd) }
}
func (h *countingHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error { h.n.Add(1); return next(ctx, cmds) }
}

func newClient(t *testing.T, addr string) redis.UniversalClient {
	t.Helper()
	c, err := NewClient("redis://"+addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func resolver(t *testing.T, c redis.UniversalClient, h *ring.Holder, ttl time.Duration) *Resolver {
	t.Helper()
	b, err := New(Config{Client: c, Ring: h, TTL: ttl, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Preload(context.Background()); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestBindingNewKeyAndLiveBinding(t *testing.T) {
	rd := testenv.StartRedis(t)
	c := newClient(t, rd.Addr)
	h := holder(t, gws(1, 1, 1)...)
	b := resolver(t, c, h, time.Minute)
	ctx := context.Background()

	rt, err := b.Resolve(ctx, []byte("new-key"))
	if err != nil {
		t.Fatal(err)
	}
	if rt.Source != route.SourceRing {
		t.Fatalf("new key source %s", rt.Source)
	}
	if v := c.Get(ctx, KeyPrefix+"new-key").Val(); v != rt.Candidates[0].ID {
		t.Fatalf("stored %q, routed to %s", v, rt.Candidates[0].ID)
	}

	// A binding to a live gateway that is not the ring owner wins.
	owner := rt.Candidates[0].ID
	other := "gw-1"
	if owner == other {
		other = "gw-2"
	}
	c.Set(ctx, KeyPrefix+"new-key", other, time.Minute)
	rt, err = b.Resolve(ctx, []byte("new-key"))
	if err != nil {
		t.Fatal(err)
	}
	if rt.Source != route.SourceBinding || rt.Candidates[0].ID != other || len(rt.Candidates) != 3 {
		t.Fatalf("route %+v, want binding to %s first", rt, other)
	}
	seen := map[string]bool{}
	for _, g := range rt.Candidates {
		if seen[g.ID] {
			t.Fatalf("duplicate candidate %s", g.ID)
		}
		seen[g.ID] = true
	}
}

func TestBindingTTLRefresh(t *testing.T) {
	rd := testenv.StartRedis(t)
	c := newClient(t, rd.Addr)
	b := resolver(t, c, holder(t, gws(1, 1)...), 30*time.Second)
	ctx := context.Background()
	key := KeyPrefix + "k"
	if _, err := b.Resolve(ctx, []byte("k")); err != nil {
		t.Fatal(err)
	}
	if ttl := c.PTTL(ctx, key).Val(); ttl < 25*time.Second || ttl > 30*time.Second {
		t.Fatalf("TTL after bind %v", ttl)
	}
	c.PExpire(ctx, key, 2*time.Second)
	if _, err := b.Resolve(ctx, []byte("k")); err != nil {
		t.Fatal(err)
	}
	if ttl := c.PTTL(ctx, key).Val(); ttl < 25*time.Second {
		t.Fatalf("TTL not refreshed on connect: %v", ttl)
	}
}

// TestBindingRace: two proxies with different ring views (weights differ,
// so their ring owners differ for many keys) race on 1,000 new keys; both
// must end up routing every key to the same gateway.
func TestBindingRace(t *testing.T) {
	rd := testenv.StartRedis(t)
	a := resolver(t, newClient(t, rd.Addr), holder(t, gws(1, 1, 1)...), time.Minute)
	bv := resolver(t, newClient(t, rd.Addr), holder(t, gws(3, 1, 1)...), time.Minute)
	ctx := context.Background()
	disagreeRing := 0
	ra, rb := holder(t, gws(1, 1, 1)...).Load(), holder(t, gws(3, 1, 1)...).Load()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var bad []string
	for i := range 1000 {
		key := []byte(fmt.Sprintf("race-%d", i))
		oa, _ := ra.Lookup(key)
		ob, _ := rb.Lookup(key)
		if oa.ID != ob.ID {
			disagreeRing++
		}
		var ga, gb string
		wg.Add(2)
		go func() { defer wg.Done(); r, _ := a.Resolve(ctx, key); ga = r.Candidates[0].ID }()
		go func() { defer wg.Done(); r, _ := bv.Resolve(ctx, key); gb = r.Candidates[0].ID }()
		wg.Wait()
		if ga != gb {
			mu.Lock()
			bad = append(bad, fmt.Sprintf("%s: %s vs %s", key, ga, gb))
			mu.Unlock()
		}
	}
	if len(bad) > 0 {
		t.Fatalf("%d keys disagree, e.g. %v", len(bad), bad[0])
	}
	if disagreeRing < 100 {
		t.Fatalf("only %d keys had different ring owners: the race proved little", disagreeRing)
	}
	t.Logf("1000 keys raced; %d had different ring owners on the two proxies; all agree", disagreeRing)
}

// TestBindingRebind: a binding to a dead or draining gateway moves to the
// ring owner; a stale proxy cannot overwrite a binding that moved meanwhile.
func TestBindingRebind(t *testing.T) {
	rd := testenv.StartRedis(t)
	c := newClient(t, rd.Addr)
	ms := gws(1, 1, 1)
	ms[1].Weight = 0 // gw-2 draining
	h := holder(t, ms...)
	b := resolver(t, c, h, time.Minute)
	ctx := context.Background()
	for _, dead := range []string{"gw-gone", "gw-2"} {
		c.Set(ctx, KeyPrefix+"k", dead, time.Minute)
		rt, err := b.Resolve(ctx, []byte("k"))
		if err != nil {
			t.Fatal(err)
		}
		owner, _ := h.Load().Lookup([]byte("k"))
		if rt.Candidates[0].ID != owner.ID || rt.Source != route.SourceRing {
			t.Fatalf("bound to %s: route %+v, want ring owner %s", dead, rt, owner.ID)
		}
		if v := c.Get(ctx, KeyPrefix+"k").Val(); v != owner.ID {
			t.Fatalf("binding %q after rebind from %s", v, dead)
		}
	}
	// Stale proxy: it still believes the binding is "gw-gone" but another
	// proxy moved it to gw-3; the compare-and-set must keep gw-3.
	c.Set(ctx, KeyPrefix+"s", "gw-3", time.Minute)
	cur, err := rebindScript.Run(ctx, c, []string{KeyPrefix + "s"}, "gw-gone", "gw-1", 60000).Text()
	if err != nil {
		t.Fatal(err)
	}
	if cur != "gw-3" || c.Get(ctx, KeyPrefix+"s").Val() != "gw-3" {
		t.Fatalf("stale CAS overwrote a fresh binding: %q", cur)
	}
}

// TestBindingOneRoundTrip counts what a resolve sends: one command from the
// client, one EVALSHA on the server, for new keys and live bindings alike.
func TestBindingOneRoundTrip(t *testing.T) {
	rd := testenv.StartRedis(t)
	c := newClient(t, rd.Addr)
	hook := &countingHook{}
	c.AddHook(hook)
	b := resolver(t, c, holder(t, gws(1, 1, 1)...), time.Minute)
	ctx := context.Background()
	admin := newClient(t, rd.Addr)
	evalsha := func() int {
		info := admin.Info(ctx, "commandstats").Val()
		for _, line := range strings.Split(info, "\n") {
			if strings.HasPrefix(line, "cmdstat_evalsha:calls=") {
				n, _ := strconv.Atoi(strings.SplitN(strings.TrimPrefix(line, "cmdstat_evalsha:calls="), ",", 2)[0])
				return n
			}
		}
		return 0
	}
	const n = 200
	for pass, what := range []string{"new keys", "existing bindings"} {
		before, sent := evalsha(), hook.n.Load()
		for i := range n {
			if _, err := b.Resolve(ctx, []byte(fmt.Sprintf("rt-%d", i))); err != nil {
				t.Fatal(err)
			}
		}
		if got := evalsha() - before; got != n {
			t.Fatalf("pass %d (%s): %d EVALSHA for %d resolves", pass, what, got, n)
		}
		if got := hook.n.Load() - sent; got != n {
			t.Fatalf("pass %d (%s): client sent %d commands for %d resolves", pass, what, got, n)
		}
	}
}

// TestBindingRedisDown: with Redis gone every resolve still answers from the
// ring; when it returns, bindings are used again by the same resolver.
func TestBindingRedisDown(t *testing.T) {
	rd := testenv.StartRedis(t)
	c, err := NewClient("redis://"+rd.Addr, 50*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var errs atomic.Int64
	h := holder(t, gws(1, 1, 1)...)
	b, err := New(Config{Client: c, Ring: h, OnError: func(error) { errs.Add(1) }})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if rt, err := b.Resolve(ctx, []byte("k")); err != nil || rt.Source != route.SourceRing {
		t.Fatalf("%+v %v", rt, err)
	}
	rd.Kill()
	for i := range 50 {
		rt, err := b.Resolve(ctx, []byte(fmt.Sprintf("down-%d", i)))
		if err != nil || rt.Source != route.SourceFallback || len(rt.Candidates) == 0 {
			t.Fatalf("with Redis down: %+v %v", rt, err)
		}
	}
	if errs.Load() == 0 {
		t.Fatal("no Redis error reported")
	}
	rd.Restart(t)
	deadline := time.Now().Add(10 * time.Second)
	for {
		rt, err := b.Resolve(ctx, []byte("k"))
		if err != nil {
			t.Fatal(err)
		}
		if rt.Source != route.SourceFallback {
			break // Redis used again: new binding (ring) after the restart wiped data
		}
		if time.Now().After(deadline) {
			t.Fatal("resolver never used Redis again after it came back")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestNewRedisClientURLs(t *testing.T) {
	for _, u := range []string{"redis://127.0.0.1:6379/0", "redis://h:1?master_name=m&addr=h:2", "redis+cluster://h:1?addr=h:2"} {
		c, err := NewClient(u, 0)
		if err != nil {
			t.Errorf("%s: %v", u, err)
			continue
		}
		c.Close()
	}
	if _, err := NewClient("http://x", 0); err == nil {
		t.Error("http URL accepted")
	}
	if _, err := New(Config{}); err == nil {
		t.Error("empty config accepted")
	}
}

// TestBindingWritesRefused: a Redis that answers but refuses writes (full
// under noeviction, a read-only replica) still routes every bound key to
// its binding; new keys go to the ring without being stored; the refusal
// is logged once with Redis's own reason, and writes resume when Redis
// takes them again.
func TestBindingWritesRefused(t *testing.T) {
	tests := []struct {
		name   string
		setup  func(t *testing.T) (write, read redis.UniversalClient, refuse, allow func())
		reason string
	}{
		{"full, noeviction", func(t *testing.T) (redis.UniversalClient, redis.UniversalClient, func(), func()) {
			rd := testenv.StartRedis(t, "--maxmemory-policy", "noeviction")
			c := newClient(t, rd.Addr)
			ctx := context.Background()
			refuse := func() {
				if err := c.ConfigSet(ctx, "maxmemory", "1mb").Err(); err != nil {
					t.Fatal(err)
				}
				// Fill it up (bounded): 1 MiB of 16 KiB values.
				filler := strings.Repeat("x", 16<<10)
				for i := 0; i < 1000; i++ {
					if err := c.Set(ctx, fmt.Sprintf("filler:%d", i), filler, 0).Err(); err != nil {
						if !strings.HasPrefix(err.Error(), "OOM") {
							t.Fatal(err)
						}
						return
					}
				}
				t.Fatal("redis never reported OOM")
			}
			allow := func() {
				if err := c.ConfigSet(ctx, "maxmemory", "0").Err(); err != nil {
					t.Fatal(err)
				}
			}
			return c, c, refuse, allow
		}, "OOM"},
		{"read-only replica", func(t *testing.T) (redis.UniversalClient, redis.UniversalClient, func(), func()) {
			primary := testenv.StartRedis(t, "--repl-diskless-sync-delay", "0")
			host, port, _ := strings.Cut(primary.Addr, ":")
			replica := testenv.StartRedis(t, "--replicaof", host, port)
			rc := newClient(t, replica.Addr)
			ctx := context.Background()
			allow := func() {
				if err := rc.Do(ctx, "REPLICAOF", "NO", "ONE").Err(); err != nil {
					t.Fatal(err)
				}
			}
			return newClient(t, primary.Addr), rc, func() {}, allow
		}, "READONLY"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			write, read, refuse, allow := tt.setup(t)
			ctx := context.Background()
			const bound = 100
			for i := range bound {
				if err := write.Set(ctx, KeyPrefix+fmt.Sprintf("bound-%d", i), "gw-2", time.Hour).Err(); err != nil {
					t.Fatal(err)
				}
			}
			// The replica has them once it synced.
			deadline := time.Now().Add(10 * time.Second)
			for read.Get(ctx, KeyPrefix+fmt.Sprintf("bound-%d", bound-1)).Val() != "gw-2" {
				if time.Now().After(deadline) {
					t.Fatal("bindings never reached the Redis the resolver reads")
				}
				time.Sleep(20 * time.Millisecond)
			}
			refuse()

			core, logs := observer.New(zap.InfoLevel)
			clock := &fakeClock{now: time.Unix(1000, 0)}
			var errs atomic.Int64
			b, err := New(Config{Client: read, Ring: holder(t, gws(1, 1, 1)...), Timeout: time.Second,
				Logger: zap.New(core), Now: clock.Now, OnError: func(err error) {
					if !IsWriteRefused(err) {
						t.Errorf("refusal reported as an outage: %v", err)
					}
					errs.Add(1)
				}})
			if err != nil {
				t.Fatal(err)
			}
			for round := range 3 { // inside and after the read-only window
				for i := range bound {
					rt, err := b.Resolve(ctx, []byte(fmt.Sprintf("bound-%d", i)))
					if err != nil || rt.Source != route.SourceBinding || rt.Candidates[0].ID != "gw-2" {
						t.Fatalf("round %d: bound key %d: %+v %v", round, i, rt, err)
					}
				}
				rt, err := b.Resolve(ctx, []byte(fmt.Sprintf("new-%d", round)))
				if err != nil || rt.Source != route.SourceFallback {
					t.Fatalf("new key: %+v %v", rt, err)
				}
				clock.Add(2 * breakerPeriod)
			}
			if n := read.Exists(ctx, KeyPrefix+"new-0").Val(); n != 0 {
				t.Fatal("a new key was stored while Redis refused writes")
			}
			if errs.Load() == 0 {
				t.Fatal("no refusal reported")
			}
			refusals := logs.FilterMessageSnippet("redis refuses writes").All()
			if len(refusals) != 1 || !strings.Contains(refusals[0].ContextMap()["redis_error"].(string), tt.reason) {
				t.Fatalf("want one refusal log naming %s, got %v", tt.reason, refusals)
			}
			if n := logs.FilterMessageSnippet("unavailable").Len(); n != 0 {
				t.Fatalf("a refusal was logged as Redis unavailable (%d lines)", n)
			}

			allow()
			clock.Add(2 * breakerPeriod)
			if rt, err := b.Resolve(ctx, []byte("after")); err != nil || rt.Source != route.SourceRing {
				t.Fatalf("after writes resumed: %+v %v", rt, err)
			}
			if read.Get(ctx, KeyPrefix+"after").Val() == "" {
				t.Fatal("binding not stored after writes resumed")
			}
			if logs.FilterMessageSnippet("accepts writes again").Len() != 1 {
				t.Fatal("recovery not logged once")
			}
		})
	}
}

type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// TestLookupRoutesReadOnly: lookups answer as a connect would route each
// key, in one pipelined round trip, and leave Redis exactly as it was: no
// new binding, no moved binding, no refreshed TTL.
func TestLookupRoutesReadOnly(t *testing.T) {
	rd := testenv.StartRedis(t)
	c := newClient(t, rd.Addr)
	hook := &getPipelines{}
	c.AddHook(hook)
	ms := gws(1, 1, 1)
	ms[1].Weight = 0 // gw-2 draining
	h := holder(t, ms...)
	b := resolver(t, c, h, time.Minute)
	ctx := context.Background()
	admin := newClient(t, rd.Addr)
	admin.Set(ctx, KeyPrefix+"bound-3", "gw-3", time.Minute)
	admin.Set(ctx, KeyPrefix+"bound-2", "gw-2", time.Minute)
	admin.Set(ctx, KeyPrefix+"bound-gone", "gw-gone", time.Minute)
	ttlBefore := admin.PTTL(ctx, KeyPrefix+"bound-3").Val()
	sizeBefore := admin.DBSize(ctx).Val()
	keys := []string{"bound-3", "new-key", "bound-2", "bound-gone"}
	routes, err := b.LookupRoutes(ctx, keys)
	if err != nil {
		t.Fatal(err)
	}
	if got := hook.n.Load(); got != 1 {
		t.Fatalf("%d pipelines of GETs for a batch of %d; want one", got, len(keys))
	}
	owner := func(k string) string { m, _ := h.Load().Lookup([]byte(k)); return m.ID }
	want := []struct {
		gw  string
		src route.Source
	}{{"gw-3", route.SourceBinding}, {owner("new-key"), route.SourceRing}, {owner("bound-2"), route.SourceRing}, {owner("bound-gone"), route.SourceRing}}
	for i, w := range want {
		if routes[i].Candidates[0].ID != w.gw || routes[i].Source != w.src {
			t.Errorf("%s: %s via %s, want %s via %s", keys[i], routes[i].Candidates[0].ID, routes[i].Source, w.gw, w.src)
		}
	}
	if n := admin.DBSize(ctx).Val(); n != sizeBefore {
		t.Fatalf("Redis holds %d keys after lookups, %d before", n, sizeBefore)
	}
	for k, v := range map[string]string{"bound-2": "gw-2", "bound-gone": "gw-gone", "bound-3": "gw-3"} {
		if got := admin.Get(ctx, KeyPrefix+k).Val(); got != v {
			t.Errorf("lookup moved %s from %s to %s", k, v, got)
		}
	}
	time.Sleep(20 * time.Millisecond) // let the TTL visibly run down
	if ttl := admin.PTTL(ctx, KeyPrefix+"bound-3").Val(); ttl >= ttlBefore {
		t.Fatalf("lookup refreshed a TTL: %v then %v", ttlBefore, ttl)
	}

	// A connect for the same keys then goes where the lookup said.
	for i, k := range keys {
		rt, err := b.Resolve(ctx, []byte(k))
		if err != nil {
			t.Fatal(err)
		}
		if rt.Candidates[0].ID != routes[i].Candidates[0].ID {
			t.Errorf("%s: connect went to %s, lookup said %s", k, rt.Candidates[0].ID, routes[i].Candidates[0].ID)
		}
	}

	// Redis gone: every key answered from the ring as fallback.
	rd.Kill()
	routes, err = b.LookupRoutes(ctx, keys)
	if err != nil {
		t.Fatal(err)
	}
	for i, rt := range routes {
		if rt.Source != route.SourceFallback || rt.Candidates[0].ID != owner(keys[i]) {
			t.Errorf("Redis down, %s: %+v", keys[i], rt)
		}
	}
}

// getPipelines counts pipelines of GETs (not the connection setup a new
// pooled connection sends).
type getPipelines struct{ n atomic.Int64 }

func (h *getPipelines) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (h *getPipelines) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (h *getPipelines) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if len(cmds) > 0 && cmds[0].Name() == "get" {
			h.n.Add(1)
		}
		return next(ctx, cmds)
	}
}
