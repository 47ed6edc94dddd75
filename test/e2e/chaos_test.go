//go:build e2e && chaos

package e2e

import (
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tether-proxy/tether/internal/testenv"
)

// TestChaos (make chaos) runs a small cluster through gossip churn while
// clients keep connecting and echoing: gateways are killed, drained,
// restarted and added at random, one proxy is killed and restarted, Redis
// is restarted. Then everything is brought back, and once gossip has
// converged every key must route to the same gateway from every proxy. The
// report counts client errors by cause. CHAOS_FOR sets the churn time
// (default 100s), CHAOS_SEED replays a run.
func TestChaos(t *testing.T) {
	churn := 100 * time.Second
	if d, err := time.ParseDuration(os.Getenv("CHAOS_FOR")); err == nil {
		churn = d
	}
	seed := uint64(time.Now().UnixNano())
	if s, err := strconv.ParseUint(os.Getenv("CHAOS_SEED"), 10, 64); err == nil {
		seed = s
	}
	rng := rand.New(rand.NewPCG(seed, seed))
	t.Logf("chaos seed %d (CHAOS_SEED=%d replays it), churn %v", seed, seed, churn)

	rd := testenv.StartRedis(t)
	c := &chaos{t: t, rng: rng, redis: rd, events: map[string]int{}}
	// Fixed addresses so a restarted node comes back where it was.
	for i := 1; i <= 6; i++ {
		ip := fmt.Sprintf("127.0.1.%d", i)
		c.gwAddr = append(c.gwAddr, [2]string{
			fmt.Sprintf("%s:%d", ip, testenv.FreePort(t, ip)), fmt.Sprintf("%s:%d", ip, testenv.FreePort(t, ip))})
	}
	for range 3 {
		c.pxAddr = append(c.pxAddr, [3]string{
			fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t, "127.0.0.1")),
			fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t, "127.0.0.1")),
			fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t, "127.0.0.1"))})
	}
	c.gws = make([]*proc, 6)
	c.proxies = make([]*proc, 3)
	for i := range 5 { // gw-6 joins and leaves during the churn
		c.startGateway(i)
	}
	for i := range c.proxies {
		c.startProxy(i)
	}
	waitRing(t, 30*time.Second, 5, 0, c.proxies...)

	keys := keyList("chaos", 500)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, uint64(w)))
			for {
				select {
				case <-stop:
					return
				default:
				}
				via := c.pxAddr[r.IntN(len(c.pxAddr))][0]
				// Each worker has keys of its own: two sessions of one key
				// at once would be one client, and the newer wins.
				per := len(keys) / 16
				_, err := session(via, fmt.Sprintf("127.0.0.%d", 2+w%8), keys[w*per+r.IntN(per)])
				c.count(err)
			}
		}()
	}

	end := time.Now().Add(churn)
	for time.Now().Before(end) {
		c.step()
		time.Sleep(time.Duration(1500+rng.IntN(2500)) * time.Millisecond)
	}
	close(stop)
	wg.Wait()

	// Everything back: gw-1..5 running, gw-6 gone, all proxies up.
	c.restore()
	t0 := time.Now()
	waitRing(t, 60*time.Second, 5, 0, c.proxies...)
	for _, p := range c.proxies {
		waitFor(t, 30*time.Second, "no ID conflict on "+p.name, func() bool { return metrics(t, p)["tether_gateway_id_conflicts"] == 0 })
	}
	var disagree []string
	waitFor(t, 30*time.Second, "every proxy to route every key the same way", func() bool {
		disagree = disagree[:0]
		for _, k := range keys {
			first := routeOf(t, c.proxies[0], k)[0]
			for _, p := range c.proxies[1:] {
				if got := routeOf(t, p, k)[0]; got != first {
					disagree = append(disagree, fmt.Sprintf("%s: %s vs %s", k, first, got))
				}
			}
		}
		return len(disagree) == 0
	}, func() string { return strings.Join(disagree, "\n") })
	// And real sessions agree with the routes, through every proxy.
	owners := map[string]string{}
	for i, p := range c.proxies {
		for _, k := range keys[:100] {
			res, err := session(p.addr, "127.0.0.2", k)
			if err != nil {
				t.Fatalf("after convergence, %s via proxy %d: %v", k, i, err)
			}
			if o, ok := owners[k]; ok && o != res.reply.Gateway {
				t.Fatalf("after convergence, %s: %s via one proxy, %s via another", k, o, res.reply.Gateway)
			}
			owners[k] = res.reply.Gateway
		}
	}
	t.Log(c.report(time.Since(t0)))
}

type chaos struct {
	t       *testing.T
	rng     *rand.Rand
	redis   *testenv.Redis
	gwAddr  [][2]string // service, gossip
	pxAddr  [][3]string // listen, admin, gossip
	gws     []*proc     // nil: not running
	proxies []*proc

	mu     sync.Mutex
	events map[string]int
	ok     atomic.Int64
	errs   sync.Map // cause → *atomic.Int64
}

func (c *chaos) seeds() string {
	var s []string
	for i, g := range c.gws {
		if g != nil {
			s = append(s, c.gwAddr[i][1])
		}
	}
	for _, p := range c.pxAddr {
		s = append(s, p[2])
	}
	return strings.Join(s, ",")
}

func (c *chaos) startGateway(i int) {
	c.gws[i] = start(c.t, "gateway-stub", "--id", fmt.Sprintf("gw-%d", i+1), "--listen", c.gwAddr[i][0],
		"--proxy-protocol", "require", "--gossip-bind", c.gwAddr[i][1], "--join", c.seeds(), "--drain-timeout", "1s")
}

func (c *chaos) startProxy(i int) {
	c.proxies[i] = start(c.t, "proxy", "--listen", c.pxAddr[i][0], "--admin", c.pxAddr[i][1],
		"--gossip-bind", c.pxAddr[i][2], "--join", c.seeds(), "--node-name", fmt.Sprintf("proxy-%d", i+1),
		"--redis", "redis://"+c.redis.Addr)
}

func (c *chaos) event(name string) {
	c.mu.Lock()
	c.events[name]++
	c.mu.Unlock()
}

// step does one random thing to the cluster.
func (c *chaos) step() {
	running := func() []int {
		var out []int
		for i, g := range c.gws[:5] {
			if g != nil {
				out = append(out, i)
			}
		}
		return out
	}
	switch n := c.rng.IntN(10); {
	case n < 3: // kill -9 a gateway (never the last two)
		if r := running(); len(r) > 2 {
			i := r[c.rng.IntN(len(r))]
			c.gws[i].kill()
			c.gws[i] = nil
			c.event("gateway kill -9")
		}
	case n < 5: // SIGTERM: drain, leave, exit
		if r := running(); len(r) > 2 {
			i := r[c.rng.IntN(len(r))]
			c.gws[i].stop()
			c.gws[i] = nil
			c.event("gateway drained (SIGTERM)")
		}
	case n < 7: // bring a stopped gateway back
		for i, g := range c.gws[:5] {
			if g == nil {
				c.startGateway(i)
				c.event("gateway restarted")
				break
			}
		}
	case n < 8: // the sixth gateway joins or leaves
		if c.gws[5] == nil {
			c.startGateway(5)
			c.event("gateway added")
		} else {
			c.gws[5].stop()
			c.gws[5] = nil
			c.event("added gateway drained")
		}
	case n < 9 && c.events["proxy kill -9"] == 0: // one proxy, mid-stream
		i := c.rng.IntN(len(c.proxies))
		c.proxies[i].kill()
		time.Sleep(time.Second)
		c.startProxy(i)
		c.event("proxy kill -9")
	default:
		if c.events["redis restart"] == 0 {
			c.redis.Kill()
			time.Sleep(time.Second)
			c.redis.Restart(c.t)
			c.event("redis restart")
		}
	}
}

// restore brings gw-1..5 back and removes gw-6.
func (c *chaos) restore() {
	for i, g := range c.gws[:5] {
		if g == nil {
			c.startGateway(i)
		}
	}
	if c.gws[5] != nil {
		c.gws[5].stop()
		c.gws[5] = nil
	}
}

// count files a client session's outcome under its cause.
func (c *chaos) count(err error) {
	if err == nil {
		c.ok.Add(1)
		return
	}
	var cause string
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		cause = "connect refused (proxy down)"
	case errors.Is(err, syscall.ECONNRESET) && strings.Contains(err.Error(), "reply"):
		cause = "reset before the reply (no live candidate, or it died)"
	case errors.Is(err, syscall.ECONNRESET):
		cause = "reset mid-session (its gateway or proxy died)"
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		cause = "closed mid-session (gateway drained)"
	case errors.As(err, &ne) && ne.Timeout():
		cause = "timeout"
	case strings.Contains(err.Error(), "echo"):
		cause = "echo mismatch"
	default:
		cause = "other: " + err.Error()
	}
	v, _ := c.errs.LoadOrStore(cause, new(atomic.Int64))
	v.(*atomic.Int64).Add(1)
}

func (c *chaos) report(converged time.Duration) string {
	var b strings.Builder
	fmt.Fprintf(&b, "\n## chaos report\n\nevents:\n")
	var names []string
	for n := range c.events {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(&b, "  %-28s %d\n", n, c.events[n])
	}
	total := c.ok.Load()
	var causes []string
	c.errs.Range(func(k, v any) bool {
		n := v.(*atomic.Int64).Load()
		total += n
		causes = append(causes, fmt.Sprintf("  %-52s %d", k, n))
		return true
	})
	sort.Strings(causes)
	fmt.Fprintf(&b, "client sessions: %d, served and echoed: %d\nclient errors by cause:\n%s\n", total, c.ok.Load(), strings.Join(causes, "\n"))
	fmt.Fprintf(&b, "after restore: converged in %v; 500 keys route to the same gateway from all 3 proxies\n", converged.Round(100*time.Millisecond))
	return b.String()
}
