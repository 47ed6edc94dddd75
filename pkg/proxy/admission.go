package proxy

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/time/rate"

	"github.com/tether-proxy/tether/pkg/route"
)

// Admission control for reconnect storms: --max-handshakes bounds the
// connections in their handshake (Serve closes more at once), and
// --gateway-rate bounds new sessions per second to each gateway
// (GatewayRate, the dialer's Admit hook). Both turn clients away with zero
// bytes, which a tether client takes as "come back later" (pkg/client backs
// off with jitter), and both log once per state change.

// DefaultMaxHandshakes is --max-handshakes: connections accepted but not yet
// spliced.
const DefaultMaxHandshakes = 4096

// ErrRateLimited means a gateway's --gateway-rate had no token for the
// connection within its handshake deadline.
var ErrRateLimited = errors.New("proxy: gateway rate limit")

// GatewayRate limits new sessions per second to each gateway: a token
// bucket per gateway ID, with a burst of one second's worth. A connection
// that finds no token waits for one, as long as its handshake deadline
// allows, and is refused otherwise (without trying another gateway: the
// key's session is on this one). Its methods are safe for concurrent use.
type GatewayRate struct {
	perSecond rate.Limit
	burst     int
	m         *Metrics
	log       *zap.Logger
	now       func() time.Time

	mu  sync.Mutex
	gws map[string]*gatewayLimit
}

type gatewayLimit struct {
	lim      *rate.Limiter
	limited  exhaustion // refusing: logged once per change
	refused  prometheus.Counter
	refusedN atomic.Uint64
}

// NewGatewayRate limits each gateway to perSecond new sessions (> 0). m
// counts refusals per gateway; log gets one line when a gateway starts
// refusing and one when it has been quiet for a second.
func NewGatewayRate(perSecond float64, m *Metrics, log *zap.Logger) (*GatewayRate, error) {
	if perSecond <= 0 {
		return nil, fmt.Errorf("proxy: gateway rate %v: want > 0", perSecond)
	}
	if m == nil {
		m = NewMetrics(nil)
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &GatewayRate{perSecond: rate.Limit(perSecond), burst: max(1, int(perSecond)), m: m, log: log, now: time.Now,
		gws: map[string]*gatewayLimit{}}, nil
}

// Admit has the signature of route.Dialer's Admit hook.
var _ func(context.Context, route.Gateway) error = (*GatewayRate)(nil).Admit

// Admit takes a token for a new session to gw, waiting within ctx's
// deadline; it fails with ErrRateLimited when none comes in time.
func (g *GatewayRate) Admit(ctx context.Context, gw route.Gateway) error {
	l := g.limit(gw.ID)
	if err := l.lim.Wait(ctx); err != nil {
		l.refused.Inc()
		l.refusedN.Add(1)
		if l.limited.fail(g.now()) {
			g.log.Warn("gateway rate limit reached: new sessions to it wait for a token, and are closed if none comes within their handshake deadline",
				zap.String("gateway", gw.ID), zap.Float64("sessions_per_second", float64(g.perSecond)))
		}
		return fmt.Errorf("%w: %s: %w", ErrRateLimited, gw.ID, err)
	}
	if over, n := l.limited.ok(g.now); over {
		g.log.Info("gateway rate limit: no refusals for a second", zap.String("gateway", gw.ID), zap.Int("refused_meanwhile", n))
	}
	return nil
}

// PerSecond is the configured rate.
func (g *GatewayRate) PerSecond() float64 { return float64(g.perSecond) }

// Limited reports whether gateway id refused a session in the last second.
func (g *GatewayRate) Limited(id string) bool {
	g.mu.Lock()
	l := g.gws[id]
	g.mu.Unlock()
	return l != nil && l.limited.on.Load()
}

// Refused counts the sessions gateway id refused.
func (g *GatewayRate) Refused(id string) uint64 {
	g.mu.Lock()
	l := g.gws[id]
	g.mu.Unlock()
	if l == nil {
		return 0
	}
	return l.refusedN.Load()
}

func (g *GatewayRate) limit(id string) *gatewayLimit {
	g.mu.Lock()
	defer g.mu.Unlock()
	l := g.gws[id]
	if l == nil {
		l = &gatewayLimit{lim: rate.NewLimiter(g.perSecond, g.burst), refused: g.m.RateLimited.WithLabelValues(id)}
		g.gws[id] = l
	}
	return l
}
