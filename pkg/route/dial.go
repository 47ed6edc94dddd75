package route

import (
	"context"
	"fmt"
	"net"
	"sync"
	"time"
)

// Dialer defaults, as documented on the proxy's flags.
const (
	DefaultMaxTries    = 3
	DefaultDialTimeout = 2 * time.Second
	DefaultCooldown    = 5 * time.Second
)

// Dialer connects to the first reachable candidate of a Route. A gateway that
// fails to connect is skipped by later dials until its cooldown ends, unless
// every candidate is cooling down (then they are tried anyway: a stale mark
// must not turn into an outage). A Dialer is safe for concurrent use; its
// zero value uses the defaults.
type Dialer struct {
	// DialContext opens a connection; nil means a net.Dialer without TCP
	// keepalive (a dead gateway shows up as a reset, a refused dial or a
	// gossip failure; keepalive would cost four setsockopt calls per
	// connection for nothing).
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// MaxTries bounds attempts per Dial; 0 means DefaultMaxTries.
	MaxTries int
	// DialTimeout bounds each attempt; 0 means DefaultDialTimeout.
	DialTimeout time.Duration
	// Cooldown is how long a failed gateway is skipped; 0 means
	// DefaultCooldown, negative disables cooldowns.
	Cooldown time.Duration
	// Now is the clock; nil means time.Now.
	Now  func() time.Time
	mu   sync.Mutex
	down map[string]time.Time // gateway ID → end of cooldown
}

// Result describes a successful Dial.
type Result struct {
	// Conn is the connection to Gateway.
	Conn net.Conn
	// Gateway is the candidate that answered.
	Gateway Gateway
	// Attempts counts connection attempts, the successful one included;
	// > 1 means a failover happened.
	Attempts int
	// Failed lists the candidates whose attempt failed, in order; Dial
	// fills it on error too, so callers can count failures per gateway.
	Failed []Gateway
}

// Dial connects to the first candidate that answers, in failover order. It
// returns an error wrapping ErrUnreachable when every attempt failed and
// ErrNoGateway when cands is empty; Result.Failed is set either way.
func (d *Dialer) Dial(ctx context.Context, cands []Gateway) (Result, error) {
	if len(cands) == 0 {
		return Result{}, ErrNoGateway
	}
	tries := d.MaxTries
	if tries <= 0 {
		tries = DefaultMaxTries
	}
	var lastErr error
	attempts := 0
	var failed []Gateway
	// Two passes: candidates not cooling down first, in order, then the
	// cooling ones if tries remain.
	for pass := 0; pass < 2 && attempts < tries; pass++ {
		for _, gw := range cands {
			if attempts >= tries {
				break
			}
			if d.coolingDown(gw.ID) != (pass == 1) {
				continue
			}
			attempts++
			c, err := d.dialOne(ctx, gw)
			if err == nil {
				d.markUp(gw.ID)
				return Result{Conn: c, Gateway: gw, Attempts: attempts, Failed: failed}, nil
			}
			lastErr = err
			failed = append(failed, gw)
			d.markDown(gw.ID)
			if ctx.Err() != nil {
				return Result{Attempts: attempts, Failed: failed}, fmt.Errorf("%w: %w", ErrUnreachable, ctx.Err())
			}
		}
	}
	return Result{Attempts: attempts, Failed: failed}, fmt.Errorf("%w after %d attempts: %w", ErrUnreachable, attempts, lastErr)
}

func (d *Dialer) dialOne(ctx context.Context, gw Gateway) (net.Conn, error) {
	timeout := d.DialTimeout
	if timeout <= 0 {
		timeout = DefaultDialTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	dial := d.DialContext
	if dial == nil {
		dial = (&net.Dialer{KeepAlive: -1}).DialContext
	}
	c, err := dial(ctx, "tcp", gw.Addr)
	if err != nil {
		return nil, fmt.Errorf("dial gateway %s: %w", gw.ID, err)
	}
	return c, nil
}

func (d *Dialer) now() time.Time {
	if d.Now != nil {
		return d.Now()
	}
	return time.Now()
}

func (d *Dialer) cooldown() time.Duration {
	if d.Cooldown == 0 {
		return DefaultCooldown
	}
	return d.Cooldown
}

// CoolingDown reports whether gateway id is currently skipped after a failed
// connection attempt.
func (d *Dialer) CoolingDown(id string) bool { return d.coolingDown(id) }

func (d *Dialer) coolingDown(id string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	until, ok := d.down[id]
	if !ok {
		return false
	}
	if d.now().Before(until) {
		return true
	}
	delete(d.down, id)
	return false
}

func (d *Dialer) markDown(id string) {
	cd := d.cooldown()
	if cd < 0 {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.down == nil {
		d.down = make(map[string]time.Time)
	}
	d.down[id] = d.now().Add(cd)
}

func (d *Dialer) markUp(id string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.down, id)
}
