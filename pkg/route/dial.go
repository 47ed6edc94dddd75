package route

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
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
	Now func() time.Time
	// Logger gets one warning when a gateway becomes unreachable and one
	// when it answers again (by ID; the error names the address, which
	// only operators see); nil means none.
	Logger *zap.Logger
	// Admit, when set, is asked before each attempt whether a new session
	// may go to gw now (a rate limit); it may wait within ctx. Its error
	// ends the Dial as is: the key's session belongs on gw, so the next
	// candidate is not tried.
	Admit func(ctx context.Context, gw Gateway) error

	mu          sync.Mutex
	down        map[string]time.Time // gateway ID → end of cooldown
	unreachable map[string]bool      // gateway ID → last attempt failed
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

// ErrLocalResources means a connection attempt failed for lack of
// resources on this host (file descriptors, local ports, kernel memory),
// not because of the gateway: no gateway is blamed or cooled down, and the
// remaining candidates are not tried (they would fail the same way).
var ErrLocalResources = errors.New("route: out of local resources")

// IsLocalResourceError reports whether err is this host running out of
// something a connection needs: descriptors (EMFILE, ENFILE), local ports
// (EADDRNOTAVAIL) or kernel buffers (ENOBUFS, ENOMEM).
func IsLocalResourceError(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM)
}

// Dial connects to the first candidate that answers, in failover order. It
// returns an error wrapping ErrUnreachable when every attempt failed,
// ErrLocalResources when this host could not open a connection, and
// ErrNoGateway when cands is empty; Result.Failed lists the gateways to
// blame either way.
func (d *Dialer) Dial(ctx context.Context, cands []Gateway) (Result, error) {
	if len(cands) == 0 {
		return Result{}, ErrNoGateway
	}
	return d.dial(ctx, cands, Result{}, nil, 0, -1)
}

// Attempt is a connection attempt Pick chose: the caller opens it itself,
// without waiting (an event loop), and reports how it went with Connected
// or DialAfter.
type Attempt struct {
	// Gateway is the candidate to connect to.
	Gateway Gateway
	pass    int // 0: the first not cooling down; 1: every one was
	index   int // its place in the candidates
}

// Pick returns the attempt Dial would make first now: the first candidate
// not cooling down, or the first of all if every one is. ok is false when
// cands is empty or an Admit hook must be asked first (use Dial then).
func (d *Dialer) Pick(cands []Gateway) (a Attempt, ok bool) {
	if len(cands) == 0 || d.Admit != nil {
		return Attempt{}, false
	}
	for i, c := range cands {
		if !d.coolingDown(c.ID) {
			return Attempt{Gateway: c, index: i}, true
		}
	}
	return Attempt{Gateway: cands[0], pass: 1}, true
}

// Connected records that the connection of a (from Pick) succeeded: as
// after a successful Dial, its gateway is no longer cooling down or
// unreachable.
func (d *Dialer) Connected(a Attempt) { d.markUp(a.Gateway.ID) }

// DialAfter carries on a dial whose first attempt, a from Pick over the
// same cands, the caller made and saw fail with err: it records the
// failure as Dial would (cooldown, the unreachable warning), then makes
// the attempts Dial would have made after it. The Result counts the
// caller's attempt and lists its gateway among the failed; errors are
// Dial's.
func (d *Dialer) DialAfter(ctx context.Context, cands []Gateway, a Attempt, err error) (Result, error) {
	res := Result{Attempts: 1}
	if IsLocalResourceError(err) {
		return res, fmt.Errorf("%w: %w", ErrLocalResources, err)
	}
	res.Failed = []Gateway{a.Gateway}
	d.markDown(a.Gateway.ID, err)
	if ctx.Err() != nil {
		return res, fmt.Errorf("%w: %w", ErrUnreachable, ctx.Err())
	}
	return d.dial(ctx, cands, res, err, a.pass, a.index)
}

// dial runs Dial's attempts after those already in res (lastErr is the
// last one's error), from pass fromPass on, past candidate index done in
// that pass (-1: none done).
func (d *Dialer) dial(ctx context.Context, cands []Gateway, res Result, lastErr error, fromPass, done int) (Result, error) {
	tries := d.MaxTries
	if tries <= 0 {
		tries = DefaultMaxTries
	}
	attempts, failed := res.Attempts, res.Failed
	// Two passes: candidates not cooling down first, in order, then the
	// cooling ones if tries remain.
	for pass := fromPass; pass < 2 && attempts < tries; pass++ {
		for i, gw := range cands {
			if attempts >= tries {
				break
			}
			if pass == fromPass && i <= done {
				continue
			}
			if d.coolingDown(gw.ID) != (pass == 1) {
				continue
			}
			if d.Admit != nil {
				// Refused admission ends the dial: the key's session
				// belongs on this gateway, not on the next candidate.
				if err := d.Admit(ctx, gw); err != nil {
					return Result{Attempts: attempts, Failed: failed}, err
				}
			}
			attempts++
			c, err := d.dialOne(ctx, gw)
			if err == nil {
				d.markUp(gw.ID)
				return Result{Conn: c, Gateway: gw, Attempts: attempts, Failed: failed}, nil
			}
			if IsLocalResourceError(err) {
				return Result{Attempts: attempts, Failed: failed}, fmt.Errorf("%w: %w", ErrLocalResources, err)
			}
			lastErr = err
			failed = append(failed, gw)
			d.markDown(gw.ID, err)
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

// Unreachable reports whether the last connection attempt to gateway id
// failed (and none succeeded since), cooldown over or not. Lookups pass
// such a gateway over: once its cooldown ends the next connect tries it
// again first, but while it stays down that connect fails over to the same
// next choice, which is where the session lands.
func (d *Dialer) Unreachable(id string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.unreachable[id]
}

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

func (d *Dialer) markDown(id string, err error) {
	cd := d.cooldown()
	d.mu.Lock()
	if cd >= 0 {
		if d.down == nil {
			d.down = make(map[string]time.Time)
		}
		d.down[id] = d.now().Add(cd)
	}
	if d.unreachable == nil {
		d.unreachable = make(map[string]bool)
	}
	changed := !d.unreachable[id]
	d.unreachable[id] = true
	d.mu.Unlock()
	if changed && d.Logger != nil {
		d.Logger.Warn("gateway unreachable: its keys go to their next choice", zap.String("gateway", id),
			zap.Duration("cooldown", max(cd, 0)), zap.Error(err))
	}
}

func (d *Dialer) markUp(id string) {
	d.mu.Lock()
	delete(d.down, id)
	changed := d.unreachable[id]
	delete(d.unreachable, id)
	d.mu.Unlock()
	if changed && d.Logger != nil {
		d.Logger.Warn("gateway reachable again", zap.String("gateway", id))
	}
}
