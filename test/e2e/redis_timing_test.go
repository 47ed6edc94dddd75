//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/tether-proxy/tether/internal/testenv"
	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route"
	"github.com/tether-proxy/tether/pkg/route/redisbind"
)

// TestRedisPausedFallbackLatency: with Redis frozen (SIGSTOP), every lookup
// still returns from the ring within --redis-timeout (50ms) plus
// scheduling: under 90ms each, less than a single retry would take (two
// timeouts, 100ms), on a loaded CI machine too. Lookups spaced past the
// retry window each pay the timeout; lookups in between skip Redis.
func TestRedisPausedFallbackLatency(t *testing.T) {
	rd := testenv.StartRedis(t)
	c, err := redisbind.NewClient("redis://"+rd.Addr, redisbind.DefaultTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r, err := ring.New([]ring.Member{{ID: "gw-1", Addr: "127.0.1.1:1", Weight: 1}, {ID: "gw-2", Addr: "127.0.1.2:1", Weight: 1}})
	if err != nil {
		t.Fatal(err)
	}
	var h ring.Holder
	h.Store(r)
	var mu sync.Mutex
	now := time.Unix(1_000_000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	b, err := redisbind.New(redisbind.Config{Client: c, Ring: &h, Now: clock})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for i := range 20 { // warm the connection pool and script cache
		if _, err := b.Resolve(ctx, []byte(fmt.Sprint("warm-", i))); err != nil {
			t.Fatal(err)
		}
	}
	rd.Pause()
	defer rd.Resume()
	var worst time.Duration
	timed := 0
	for i := range 6 {
		for j := range 50 {
			start := time.Now()
			rt, err := b.Resolve(ctx, []byte(fmt.Sprintf("paused-%d-%d", i, j)))
			d := time.Since(start)
			if err != nil || rt.Source != route.SourceFallback || len(rt.Candidates) == 0 {
				t.Fatalf("paused Redis: %+v %v", rt, err)
			}
			if d >= 90*time.Millisecond {
				t.Fatalf("lookup took %v with Redis paused, want < 90ms (one 50ms timeout, no retry)", d)
			}
			if d >= 45*time.Millisecond {
				timed++
			}
			worst = max(worst, d)
		}
		mu.Lock()
		now = now.Add(600 * time.Millisecond) // past the retry window: the next lookup tries Redis again
		mu.Unlock()
	}
	if timed < 5 {
		t.Fatalf("only %d lookups waited for the timeout: Redis was not retried", timed)
	}
	t.Logf("Redis paused: 300 lookups, all from the ring; %d waited for the 50ms timeout, worst %v", timed, worst.Round(100*time.Microsecond))
}
