// Package proxy accepts client connections, reads the session key from the
// first bytes, dials the owning gateway and splices the two streams.
//
// The data path (docs/design.md): the first bytes land in a pooled buffer,
// the PROXY v2 header and those bytes go to the gateway in one write, and
// then each direction moves with splice(2) in the kernel and half-closes
// on its own. On Linux the parker does the splicing and holds idle
// sessions without goroutines or pipes (docs/design.md); with --no-park, or
// elsewhere, io.Copy between the raw TCP connections splices instead.
//
// With Config.TLS the server terminates TLS and copies through user space
// (tls.go). HandOff and Adopt move established parked sessions between two
// processes for an in-place upgrade (handoff.go); Shutdown closes sessions
// spread over its deadline.
package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/tether-proxy/tether/internal/sock"
	"github.com/tether-proxy/tether/pkg/proto"
	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route"
)

// DefaultHandshakeTimeout bounds how long a client may take to send its
// whole hello (--handshake-timeout).
const DefaultHandshakeTimeout = 5 * time.Second

// headroom is the space kept in front of the read buffer for the PROXY v2
// header, so header and hello leave in one write without a copy of the
// hello. A v2 header with an IPv6 address and a 255-byte key TLV is 310
// bytes.
const headroom = 320

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("proxy: server closed")

// ErrEventLoopStopped is Serve's error when the event loop that accepts
// on its listener stopped without a Shutdown (its epoll set failed, which
// is logged): nothing would accept any more.
var ErrEventLoopStopped = errors.New("proxy: event loop stopped")

// GatewayDialer connects to the first reachable candidate; *route.Dialer is
// the implementation. Dial must be safe for concurrent use.
type GatewayDialer interface {
	Dial(ctx context.Context, cands []route.Gateway) (route.Result, error)
}

var _ GatewayDialer = (*route.Dialer)(nil)

// Config configures a Server. Zero fields take the documented defaults.
type Config struct {
	// Resolver turns keys into candidate gateways; required.
	Resolver route.Resolver
	// Dialer connects to candidates; nil means a route.Dialer with
	// defaults.
	Dialer GatewayDialer
	// Extractor finds the key in the first bytes; nil means
	// proto.HelloExtractor with the default --max-hello.
	Extractor proto.Extractor
	// HandshakeTimeout bounds the time from accept until the key is read;
	// 0 means DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// ProxyProtocolOut makes the proxy send a PROXY v2 header with the
	// client address and the key TLV before the client's bytes
	// (--proxy-protocol-out v2). DefaultConfig turns it on.
	ProxyProtocolOut bool
	// MaxConns caps concurrent client connections; beyond it new ones are
	// closed at once. 0 means no cap.
	MaxConns int
	// MaxHandshakes caps connections accepted but not yet spliced
	// (--max-handshakes): in a reconnect storm the ones beyond are closed
	// at once with zero bytes, before any work is spent on them.
	// DefaultConfig sets DefaultMaxHandshakes; 0 means no cap.
	MaxHandshakes int
	// GatewayRate, when set, limits new sessions per second to each
	// gateway (--gateway-rate); New installs its Admit as the hook of a
	// *route.Dialer, so every dial attempt, failovers included, takes a
	// token, waiting within the handshake deadline.
	GatewayRate *GatewayRate
	// Logger receives structured logs; nil means no logging.
	Logger *zap.Logger
	// Metrics receives counters; nil means unregistered instruments.
	Metrics *Metrics
	// NoKeyHashSource routes clients whose first bytes carry no key (an
	// HTTP request without the configured cookie) by their IP address
	// (--no-key hash-source) instead of rejecting them.
	NoKeyHashSource bool
	// Park holds idle sessions in the proxy's own epoll set without
	// goroutines or pipes (Linux; elsewhere it is ignored). Otherwise each
	// session keeps a goroutine and, while blocked, a pipe per direction.
	// DefaultConfig turns it on.
	Park bool
	// Now is the clock for decisions that are not socket deadlines (how
	// long a parked direction was quiet, when exhaustion ended); nil means
	// time.Now. Tests step it instead of sleeping.
	Now func() time.Time
	// TLS, when set, makes the listeners serve TLS: the handshake runs
	// within HandshakeTimeout before the hello, the extractors read the
	// decrypted bytes, and the gateway gets cleartext. TLS sessions copy
	// through user space and are neither parked nor handed over.
	TLS *tls.Config
	// GatewayTLS, when set, makes the proxy speak TLS to gateways (the
	// PROXY header and the client's bytes inside it); ServerName is set
	// per connection to the gateway address's host.
	GatewayTLS *tls.Config
	// EventLoop runs a new connection's accept, hello read, ring lookup,
	// gateway connect and first write as events of the parker's epoll loop
	// (Linux, with Park), without a goroutine or a Go poller registration
	// per connection; whatever may wait (a Redis resolver, a failover, a
	// slow connect) carries on in a goroutine as without it. It applies to
	// TCP listeners (not under a PROXY protocol listener) when TLS,
	// GatewayTLS and GatewayRate are off and Dialer is a *route.Dialer
	// without Admit; the loop connects by itself, so Dialer.DialContext is
	// used only by the goroutine path. Such a listener's Serve returns when
	// Shutdown, Close or StopAccepting closes it (closing it directly is
	// not noticed). Set it for the proxy binary; tests of the goroutine
	// path leave it off.
	EventLoop bool
	// EventLoops is how many event loops the parker runs (Linux, with
	// Park): each has its own epoll set and goroutine, accepts on every
	// listener when EventLoop is on, and serves the wakeups of the
	// sessions it parked. One loop is one core's worth of handshakes; 0
	// means DefaultEventLoops.
	EventLoops int
	// ClientKeepAlive is the TCP keepalive of the connections the event
	// loop accepts (--client-keepalive). Serve sets it on the listening
	// socket itself, which Linux copies into every connection created
	// from then on (no system call per connection), and on the
	// connections already queued; a zero value leaves the listener as it
	// is. The goroutine path leaves keepalive to the listener, as
	// net.ListenConfig does.
	ClientKeepAlive net.KeepAliveConfig
	// ParkAfter is how long a direction must be idle before it is parked;
	// until then a goroutine waits for it in Go's poller, so busy sessions
	// pay nothing for parking. 0 means DefaultParkAfter.
	ParkAfter time.Duration
}

// DefaultParkAfter is the idle time after which a session direction parks.
const DefaultParkAfter = time.Second

// DefaultConfig returns the defaults of the proxy's flags, without a
// Resolver.
func DefaultConfig() Config {
	return Config{
		HandshakeTimeout: DefaultHandshakeTimeout,
		MaxHandshakes:    DefaultMaxHandshakes,
		ProxyProtocolOut: true,
		Park:             true,
		Extractor:        proto.HelloExtractor{MaxLen: proto.DefaultMaxHello},
	}
}

// Server is a running proxy. Create it with New, run Serve on one or more
// listeners, and stop it with Shutdown.
type Server struct {
	cfg     Config
	log     *zap.Logger
	m       *Metrics
	bufSize int
	pool    sync.Pool

	ctx    context.Context // cancelled when sessions are forced closed
	cancel context.CancelFunc

	parker *parker // nil: one goroutine and io.Copy per direction
	fronts fronts  // nil: accept and handshake in goroutines (Config.EventLoop)

	// next hands an accepted connection to a handler goroutine waiting
	// for one (workers.go); idleHandlers counts those waiting.
	next            chan job
	idleHandlers    atomic.Int32
	handlersStarted atomic.Int64 // goroutines dispatch started (tests)
	linger          atomic.Int64 // how long an idle handler waits: handlerLinger (tests change it)

	local    exhaustion // out of descriptors or ports: logged once per change
	overload exhaustion // over --max-handshakes: logged once per change
	active   atomic.Int64
	inHand   atomic.Int64 // connections in their handshake (--max-handshakes)
	nextID   atomic.Uint64
	closing  atomic.Bool
	stopped  atomic.Bool    // StopAccepting: listeners closed for a handoff
	wg       sync.WaitGroup // one per handler goroutine
	mu       sync.Mutex
	sessions map[*session]struct{}
	perGW    map[string]int          // open sessions by gateway ID
	ended    byteTotals              // bytes of the sessions that ended
	lns      map[net.Listener]func() // closes it (and stops its Serve)
}

// New validates cfg (a copy is kept; the caller's is never modified) and
// returns a Server.
func New(cfg Config) (*Server, error) {
	if cfg.Resolver == nil {
		return nil, errors.New("proxy: config has no Resolver")
	}
	if cfg.Dialer == nil {
		cfg.Dialer = &route.Dialer{}
	}
	if cfg.GatewayRate != nil {
		d, ok := cfg.Dialer.(*route.Dialer)
		if !ok || (d.Admit != nil) {
			return nil, errors.New("proxy: GatewayRate needs a *route.Dialer without an Admit hook")
		}
		d.Admit = cfg.GatewayRate.Admit
	}
	if cfg.Extractor == nil {
		cfg.Extractor = proto.HelloExtractor{}
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.MaxConns < 0 || cfg.MaxHandshakes < 0 {
		return nil, fmt.Errorf("proxy: max conns %d, max handshakes %d: want >= 0", cfg.MaxConns, cfg.MaxHandshakes)
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	s := &Server{
		cfg:      cfg,
		log:      cfg.Logger,
		m:        cfg.Metrics,
		bufSize:  headroom + cfg.Extractor.MaxPeek(),
		sessions: make(map[*session]struct{}),
		perGW:    make(map[string]int),
		next:     make(chan job),
		lns:      make(map[net.Listener]func()),
	}
	s.pool.New = func() any { b := make([]byte, s.bufSize); return &b }
	s.linger.Store(int64(handlerLinger))
	s.m.traffic.server.Store(s)
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if cfg.Park {
		if cfg.ParkAfter <= 0 {
			cfg.ParkAfter = DefaultParkAfter
			s.cfg.ParkAfter = DefaultParkAfter
		}
		loops := cfg.EventLoops
		if loops <= 0 {
			loops = DefaultEventLoops()
		}
		p, err := newParker(s.log, s.m, cfg.ParkAfter, cfg.Now, s.parkedEnd, s.dispatchDir, loops)
		if err != nil {
			return nil, fmt.Errorf("proxy: park: %w", err)
		}
		s.parker = p // nil where parking is not supported
		if s.fronts, err = newFronts(s, p); err != nil {
			p.close()
			return nil, fmt.Errorf("proxy: event loop: %w", err)
		}
		p.start(s.fronts)
	}
	return s, nil
}

// DefaultEventLoops is the number of event loops when Config.EventLoops
// is 0: one per CPU Go schedules on (runtime.GOMAXPROCS), as HAProxy runs
// a thread and nginx a worker per core. A loop never blocks, so the
// goroutines that wait on others — Redis lookups, TLS, failovers, busy
// sessions — share the Ps with the loops through Go's scheduler.
func DefaultEventLoops() int { return max(1, runtime.GOMAXPROCS(0)) }

// Resolver is the resolver the server routes with (for lookups that must
// answer exactly like a connect).
func (s *Server) Resolver() route.Resolver { return s.cfg.Resolver }

// Active is the number of client connections open now.
func (s *Server) Active() int { return int(s.active.Load()) }

// Closing reports whether Shutdown has begun (readiness turns false).
func (s *Server) Closing() bool { return s.closing.Load() }

// Serve accepts connections on ln until Shutdown or a permanent accept
// error. It always closes ln and returns ErrServerClosed after Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	if s.fronts != nil {
		if rc := listenerConn(ln); rc != nil {
			return s.serveLoop(ln, rc)
		}
	}
	if !s.track(ln, func() { ln.Close() }) {
		ln.Close()
		return ErrServerClosed
	}
	defer s.untrack(ln)
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.closing.Load() {
				return ErrServerClosed
			}
			if s.stopped.Load() {
				return ErrAcceptStopped
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Out of descriptors and the like: back off and keep
			// serving the sessions we have, as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.m.AcceptErrors.Inc()
			if route.IsLocalResourceError(err) {
				s.localFailed("accept", err)
			} else {
				s.log.Warn("accept failed; backing off", zap.Error(err), zap.Duration("backoff", backoff))
			}
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		if !s.admit() {
			abort(c)
			continue
		}
		s.dispatch(c)
	}
}

// admit counts a connection just accepted and decides whether it may
// proceed (--max-conns, --max-handshakes): if so it enters its handshake,
// counted in wg and the gauges; otherwise it is counted closed and the
// caller resets it at once.
func (s *Server) admit() bool {
	s.m.Accepted.Inc()
	if s.cfg.MaxConns > 0 && s.active.Load() >= int64(s.cfg.MaxConns) {
		s.m.Rejected.WithLabelValues("max_conns").Inc()
		s.m.Closed.Inc()
		return false
	}
	if s.cfg.MaxHandshakes > 0 && s.inHand.Load() >= int64(s.cfg.MaxHandshakes) {
		s.m.Rejected.WithLabelValues("overload").Inc()
		s.m.Closed.Inc()
		if s.overload.fail(s.cfg.Now()) {
			s.log.Warn("overload: more connections in their handshake than --max-handshakes; new ones are closed at once until they drain",
				zap.Int("max_handshakes", s.cfg.MaxHandshakes), zap.Int("open_connections", s.Active()))
		}
		return false
	}
	if over, n := s.overload.ok(s.cfg.Now); over {
		s.log.Info("overload over: accepting every connection again", zap.Int("closed_meanwhile", n))
	}
	s.inHand.Add(1)
	s.m.InHandshake.Inc()
	s.active.Add(1)
	s.m.Active.Inc()
	s.wg.Add(1)
	return true
}

// serveLoop is Serve for a listener the event loop accepts on (rc is
// its): it waits until Shutdown, Close or StopAccepting closes ln.
func (s *Server) serveLoop(ln net.Listener, rc syscall.RawConn) error {
	stop := make(chan struct{})
	if !s.track(ln, sync.OnceFunc(func() {
		s.fronts.unwatchListener(rc) // before the close: another process may hold the socket too
		ln.Close()
		close(stop)
	})) {
		ln.Close()
		return ErrServerClosed
	}
	defer s.untrack(ln)
	err := s.fronts.serve(rc, stop)
	switch {
	case s.closing.Load():
		return ErrServerClosed
	case err != nil:
		return err
	}
	return ErrAcceptStopped
}

// track adds a listener Serve uses; stop closes it.
func (s *Server) track(ln net.Listener, stop func()) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing.Load() {
		return false
	}
	s.stopped.Store(false)
	s.lns[ln] = stop
	return true
}

func (s *Server) untrack(ln net.Listener) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if stop := s.lns[ln]; stop != nil {
		stop()
	} else {
		ln.Close()
	}
	delete(s.lns, ln)
}

// Shutdown stops accepting, then lets open sessions run while it closes
// them one at a time, spread evenly until ctx's deadline, so their clients
// come back spread out instead of all at once (a reconnect storm on the
// gateways). When ctx is done, those still open are closed at once; without
// a deadline, sessions run until ctx is done. It returns ctx.Err() if
// sessions had to be closed at the end, nil otherwise. Safe to call more
// than once.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing.Store(true)
	for _, stop := range s.lns {
		stop()
	}
	s.mu.Unlock()

	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	paced := 0
	if deadline, ok := ctx.Deadline(); ok {
		paced = s.pace(ctx, done, deadline)
	}
	select {
	case <-done:
		s.cancel()
		s.closeParker()
		if paced > 0 {
			s.log.Info("drain: closed open sessions spread over the drain timeout", zap.Int("sessions", paced))
		}
		return nil
	case <-ctx.Done():
	}
	s.cancel()
	n := s.abortAll(endDrainTimeout)
	s.log.Info("drain timeout: closed open sessions", zap.Int("sessions", n), zap.Int("paced_before", paced))
	<-done
	s.closeParker()
	return ctx.Err()
}

// pace closes the sessions open now one by one at the times of
// paceSchedule, until they are gone, done is closed or ctx ends; it
// returns how many it closed.
func (s *Server) pace(ctx context.Context, done <-chan struct{}, deadline time.Time) int {
	s.mu.Lock()
	n := len(s.sessions)
	s.mu.Unlock()
	closed := 0
	t := time.NewTimer(0)
	defer t.Stop()
	<-t.C
	for _, at := range paceSchedule(time.Now(), deadline, n) {
		t.Reset(time.Until(at))
		select {
		case <-done:
			return closed
		case <-ctx.Done():
			return closed
		case <-t.C:
		}
		ses := s.anySession()
		if ses == nil {
			return closed // every one ended on its own
		}
		ses.abort(endDrainTimeout)
		closed++
	}
	return closed
}

// paceSchedule spreads n closes evenly over [start, deadline): the i-th at
// the middle of the i-th of n equal slots, so every second of the drain
// closes the same share and no close falls on a slot's edge.
func paceSchedule(start, deadline time.Time, n int) []time.Time {
	span := deadline.Sub(start)
	if n <= 0 || span <= 0 {
		return nil
	}
	out := make([]time.Time, n)
	for i := range out {
		out[i] = start.Add(time.Duration((float64(i) + 0.5) * float64(span) / float64(n)))
	}
	return out
}

// anySession returns an open session not aborted yet, or nil.
func (s *Server) anySession() *session {
	s.mu.Lock()
	defer s.mu.Unlock()
	for ses := range s.sessions {
		if !ses.aborted.Load() {
			return ses
		}
	}
	return nil
}

// abortAll closes every open session with reason and returns how many.
func (s *Server) abortAll(reason endReason) int {
	s.mu.Lock()
	open := make([]*session, 0, len(s.sessions))
	for ses := range s.sessions {
		open = append(open, ses)
	}
	s.mu.Unlock()
	// Abort outside the lock: a parked session's end unregisters itself.
	for _, ses := range open {
		ses.abort(reason)
	}
	return len(open)
}

func (s *Server) closeParker() {
	if s.parker != nil {
		s.parker.close()
	}
}

// Close closes every listener and session at once.
func (s *Server) Close() error {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.Shutdown(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// SessionsByGateway returns how many spliced sessions are open to each
// gateway ID.
func (s *Server) SessionsByGateway() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]int, len(s.perGW))
	for id, n := range s.perGW {
		out[id] = n
	}
	return out
}

// endReason says why a session ended: the "reason" of its "session end"
// log line and the label of tether_session_ends_total. Every value is
// listed in docs/operating.md.
type endReason string

// Session end reasons.
const (
	// endClosed: both directions ended cleanly (FIN each way).
	endClosed endReason = "closed"
	// endClientError: the client's side reset, timed out or became
	// unreachable, whichever direction noticed.
	endClientError endReason = "client_error"
	// endGatewayError: the gateway's side did.
	endGatewayError endReason = "gateway_error"
	// endDrainTimeout: still open when the drain after SIGTERM ended.
	endDrainTimeout endReason = "drain_timeout"
	// endParkError: epoll would not watch the idle session.
	endParkError endReason = "park_error"
	// Ends before splicing began (not counted as sessions): the server
	// was shutting down, the PROXY header could not be built, or the
	// first write to the gateway failed.
	endShutdown          endReason = "shutdown"
	endInternalError     endReason = "internal_error"
	endGatewayWriteError endReason = "gateway_write_error"
)

// session is one client connection and, once dialled, its gateway.
type session struct {
	client, gw net.Conn
	gwID       string
	id         uint64        // for logs
	start      time.Time     // accepted
	keyHash    uint64        // for logs: raw keys are never logged
	hello      int64         // bytes forwarded before splicing
	peer       net.Addr      // set if client.RemoteAddr is not the client's address (a handed-over session); see peerString
	idle       time.Duration // a TLS direction quiet this long gives back its buffer
	// moved counts the bytes this process moved, client → gateway (the
	// hello included) and gateway → client, as they move; only the mover
	// of a direction adds to it (traffic.go).
	moved [2]atomic.Int64
	// parked, when set (by the parker), learns of an abort after it
	// closed the connections, so a parked session knows it is over.
	parked  atomic.Pointer[parkedSession]
	once    sync.Once
	reason  endReason   // why the session was aborted; set once
	aborted atomic.Bool // abort ran (its end may not be recorded yet)
	// clientLoop, when set: the front registered the client socket in
	// this loop's epoll set (its one-shot spent), so the session parks in
	// that loop and parking it re-arms it.
	clientLoop *evloop
}

// abort closes both sides with RST so both peers learn the session ended
// abnormally, and unblocks both copy directions.
func (ses *session) abort(reason endReason) {
	ses.abortFrom(nil, reason)
}

// abortFrom aborts the session after failed, a side whose connection already
// broke (it was reset or timed out): that side is just closed, since a
// reset there would tell nobody anything, and the other side gets the RST.
func (ses *session) abortFrom(failed net.Conn, reason endReason) {
	aborted := false
	ses.once.Do(func() {
		aborted = true
		ses.reason = reason
		ses.aborted.Store(true)
		for _, c := range []net.Conn{ses.client, ses.gw} {
			switch {
			case c == nil:
			case c == failed:
				c.Close()
			default:
				abort(c)
			}
		}
	})
	if ps := ses.parked.Load(); aborted && ps != nil {
		ps.aborted()
	}
}

// peerString is the client's address (from a PROXY header if one came),
// asked for only when a log or a handoff needs it: building a net.Addr per
// session costs two allocations.
func (ses *session) peerString() string {
	if ses.peer != nil {
		return ses.peer.String()
	}
	return ses.client.RemoteAddr().String()
}

// closeReason ends the session's abort window (a later abort is a no-op)
// and says why it ended.
func (ses *session) closeReason() endReason {
	ses.once.Do(func() { ses.reason = endClosed })
	return ses.reason
}

func (s *Server) handle(c net.Conn) { s.served(s.handleConn(c)) }

// served finishes a handler's part of a connection, given what its
// handshake returned (handleConn, route).
func (s *Server) served(ps *parkedSession) {
	switch ps {
	case nil:
		s.connDone()
	case detached:
		// The session runs in goroutines of its own; this one, whose
		// stack the TLS handshake grew, ends here.
	default:
		// The client → gateway worker runs in this goroutine, once the
		// handshake buffer went back to its pool: one goroutine fewer
		// per session.
		s.parker.runClient(ps)
	}
}

// detached is what handleConn returns for a session that went to goroutines
// of its own (a TLS session: they start with small stacks).
var detached = new(parkedSession)

// connDone is the bookkeeping of a client connection that ended.
func (s *Server) connDone() {
	s.active.Add(-1)
	s.m.Active.Dec()
	s.m.Closed.Inc()
	s.wg.Done()
}

// handleConn runs the handshake and the session. It returns the parker's
// session when the session went to the parker: its end (and connDone) then
// comes from the parker.
func (s *Server) handleConn(c net.Conn) *parkedSession {
	start := time.Now()
	id := s.nextID.Add(1)

	deadline := start.Add(s.cfg.HandshakeTimeout)
	if err := c.SetReadDeadline(deadline); err != nil {
		s.handshakeOver()
		s.handshakeFailed(c, id, reasonReadError, err)
		return nil
	}
	if err := readProxyHeader(c, deadline); err != nil {
		s.handshakeOver()
		s.handshakeFailed(c, id, headerReason(err), err)
		return nil
	}
	if s.cfg.TLS != nil {
		tc, err := s.startTLS(c, deadline)
		if err != nil {
			s.handshakeOver()
			s.handshakeFailed(c, id, tlsReason(err), err)
			return nil
		}
		c = tc
	}
	bufp := s.pool.Get().(*[]byte)
	defer s.pool.Put(bufp)
	buf := *bufp
	n, key, err := s.readKey(c, buf[headroom:])
	if err != nil {
		key, err = s.noKey(err, buf[headroom:headroom+n], c.RemoteAddr().String())
	}
	if err != nil {
		s.handshakeOver()
		s.handshakeFailed(c, id, keyReason(err), err)
		return nil
	}
	return s.route(&handshake{client: c, id: id, start: start, buf: buf, n: n, key: key, keyHash: ring.KeyHash(key)}, deadline)
}

// noKey handles a hello the extractor found no key in (err, from reading
// it): with --no-key hash-source the client's IP address (peer, "ip:port")
// is the key; otherwise err stays, and an HTTP request without the key is
// counted as rejected.
func (s *Server) noKey(err error, hello []byte, peer string) ([]byte, error) {
	switch {
	case !errors.Is(err, proto.ErrNoKey):
	case s.cfg.NoKeyHashSource:
		// Route by client address: stable for a client that does not move.
		if ap, perr := netip.ParseAddrPort(peer); perr == nil {
			s.m.NoKey.WithLabelValues("hash_source").Inc()
			return []byte(ap.Addr().Unmap().String()), nil
		}
	case proto.IsHTTP(hello):
		s.m.NoKey.WithLabelValues("reject").Inc()
	}
	return nil, err
}

// route resolves a handshake's key, dials the gateway and serves the
// session (serveSession), or closes the client. Either way it ends the
// handshake phase. deadline bounds a wait for a --gateway-rate token.
func (s *Server) route(hs *handshake, deadline time.Time) *parkedSession {
	rt, err := s.cfg.Resolver.Resolve(s.ctx, hs.key)
	if err != nil {
		s.routeFailed(hs, err)
		return nil
	}
	s.m.Routes.WithLabelValues(string(rt.Source)).Inc()
	hs.source = rt.Source
	return s.dialRoute(hs, deadline, func(ctx context.Context) (route.Result, error) {
		return s.cfg.Dialer.Dial(ctx, rt.Candidates)
	})
}

// dialRoute dials with dial and serves the session, or closes the client.
func (s *Server) dialRoute(hs *handshake, deadline time.Time, dial func(context.Context) (route.Result, error)) *parkedSession {
	// The dial may wait for a gateway's --gateway-rate token, within
	// the handshake deadline.
	dctx, cancel := s.ctx, context.CancelFunc(nil)
	if s.cfg.GatewayRate != nil {
		dctx, cancel = context.WithDeadline(s.ctx, deadline)
	}
	res, err := dial(dctx)
	if cancel != nil {
		cancel()
	}
	for _, gw := range res.Failed {
		s.m.DialFailures.WithLabelValues(gw.ID).Inc()
	}
	if err != nil {
		s.routeFailed(hs, err)
		return nil
	}
	s.localOK()
	return s.serveSession(hs, res)
}

// routeFailed ends the handshake of a client no gateway could take, and
// closes it with a reset (zero bytes: the client retries).
func (s *Server) routeFailed(hs *handshake, err error) {
	s.handshakeOver()
	c, id := hs.client, hs.id
	reason := "unreachable"
	switch {
	case errors.Is(err, ErrRateLimited):
		// Not a route failure: the gateway is fine, just busy. The client
		// comes back later (zero bytes).
		s.m.Rejected.WithLabelValues("gateway_rate").Inc()
		if ce := s.log.Check(zap.DebugLevel, "gateway rate limit: closing client"); ce != nil {
			ce.Write(zap.Uint64("conn", id), zap.String("key_hash", hashString(hs.keyHash)), zap.Error(err))
		}
		abort(c)
		return
	case errors.Is(err, route.ErrNoGateway):
		reason = "no_gateway"
	case errors.Is(err, route.ErrLocalResources):
		reason = "local_resources"
		s.localFailed("dial", err)
	}
	s.m.RouteFailures.WithLabelValues(reason).Inc()
	if ce := s.log.Check(zap.DebugLevel, "route failed; closing client"); ce != nil {
		ce.Write(zap.Uint64("conn", id), zap.String("client", c.RemoteAddr().String()),
			zap.String("key_hash", hashString(hs.keyHash)), zap.String("reason", reason), zap.Error(err))
	}
	abort(c)
}

// handshakeOver ends a connection's handshake phase (--max-handshakes).
func (s *Server) handshakeOver() {
	s.inHand.Add(-1)
	s.m.InHandshake.Dec()
}

// localFailed records that this process ran out of descriptors or ports;
// the first such failure after a quiet spell is logged.
func (s *Server) localFailed(op string, err error) {
	if s.local.fail(s.cfg.Now()) {
		s.log.Warn("out of local resources (file descriptors or ports): new clients are closed until they free up; gateways are not blamed",
			zap.String("op", op), zap.Error(err), zap.Int("open_connections", s.Active()))
	}
}

// localOK records a connection that got what it needed; after a quiet
// spell it ends the exhaustion state, logged once.
func (s *Server) localOK() {
	if over, n := s.local.ok(s.cfg.Now); over {
		s.log.Warn("local resources available again", zap.Int("failures_meanwhile", n))
	}
}

// readKey reads until the extractor finds the key, within the handshake
// deadline already set and the buffer. It returns how many bytes were read
// (all of which are forwarded) and the key, which aliases buf.
func (s *Server) readKey(c net.Conn, buf []byte) (int, []byte, error) {
	n := 0
	for {
		m, rerr := c.Read(buf[n:])
		n += m
		key, err := s.cfg.Extractor.Extract(buf[:n])
		switch {
		case err == nil:
			if err := c.SetReadDeadline(time.Time{}); err != nil {
				return 0, nil, fmt.Errorf("%s: %w", reasonReadError, err)
			}
			return n, key, nil
		case !errors.Is(err, proto.ErrNeedMore):
			return n, nil, err
		case n == len(buf):
			return n, nil, proto.ErrTooLarge
		case rerr != nil:
			return n, nil, rerr
		}
	}
}

// keyReason labels a failure to read the key.
func keyReason(err error) string {
	switch reason := proto.Reason(err); {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return reasonTimeout
	case errors.Is(err, io.EOF):
		return reasonEOF
	case reason == "other":
		return reasonReadError
	default:
		return reason
	}
}

// badRequest is what an HTTP client without a key gets: a plain 400 that
// names no gateway.
const badRequest = "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 25\r\nConnection: close\r\n\r\nno session key in request"

func (s *Server) handshakeFailed(c net.Conn, id uint64, reason string, err error) {
	s.m.HandshakeFailures.WithLabelValues(reason).Inc()
	if errors.Is(err, proto.ErrNoKey) && !s.cfg.NoKeyHashSource {
		// An HTTP client (only those yield ErrNoKey) learns why.
		_ = c.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = io.WriteString(c, badRequest)
		if ce := s.log.Check(zap.DebugLevel, "handshake failed; closing client without a reply"); ce != nil {
			ce.Write(zap.Uint64("conn", id), zap.String("client", c.RemoteAddr().String()),
				zap.String("reason", reason), zap.Error(err))
		}
		c.Close()
		return
	}
	if ce := s.log.Check(zap.DebugLevel, "handshake failed; closing client without a reply"); ce != nil {
		ce.Write(zap.Uint64("conn", id), zap.String("client", c.RemoteAddr().String()),
			zap.String("reason", reason), zap.Error(err))
	}
	abort(c)
}

// handshake is what a client connection's handshake learned: all that
// serveSession needs to start the session.
type handshake struct {
	client  net.Conn
	id      uint64    // for logs
	start   time.Time // accepted
	buf     []byte    // pooled: headroom for the PROXY header, then the bytes read
	n       int       // bytes read after the headroom (all forwarded)
	key     []byte    // the session key; aliases buf
	keyHash uint64
	source  route.Source // where the owner came from (binding, ring, fallback)
	loop    *evloop      // the loop whose epoll set has the client socket already (the front read its hello), or nil
	out     []byte       // the first bytes still to write to the gateway, once built (helloBytes), or nil
}

// serveSession writes the PROXY header and the first bytes to the gateway,
// then splices until both directions end — in this goroutine, or, when the
// parker adopts the session, from the parker, whose session it returns.
func (s *Server) serveSession(hs *handshake, res route.Result) *parkedSession {
	ses, out := s.startSession(hs, res)
	if ses == nil {
		return nil
	}
	if _, err := ses.gw.Write(out); err != nil {
		s.gatewayWriteFailed(ses, err)
		return nil
	}
	ses.moved[dirUp].Add(ses.hello)
	return s.spliceSession(ses)
}

// startSession ends the handshake phase and makes the session of a client
// whose gateway answered: TLS to the gateway if configured, registration
// (for the drain and the per-gateway count), and the bytes to send it first
// (PROXY header and hello, in hs.buf; once they are written the caller
// counts the hello in ses.moved). On failure both sides are closed and
// it returns nil.
func (s *Server) startSession(hs *handshake, res route.Result) (*session, []byte) {
	s.handshakeOver()
	c, id, n := hs.client, hs.id, hs.n
	gw := res.Conn
	if res.Attempts > 1 {
		s.m.Failovers.WithLabelValues(res.Gateway.ID).Inc()
	}
	if s.cfg.GatewayTLS != nil {
		tgw, err := s.gatewayTLS(gw, res.Gateway.Addr)
		if err != nil {
			s.m.DialFailures.WithLabelValues(res.Gateway.ID).Inc()
			s.m.RouteFailures.WithLabelValues("unreachable").Inc()
			s.log.Warn("TLS to gateway failed", zap.Uint64("conn", id), zap.String("gateway", res.Gateway.ID), zap.Error(err))
			abort(gw)
			abort(c)
			return nil, nil
		}
		gw = tgw
	}
	ses := &session{client: c, gw: gw, gwID: res.Gateway.ID, id: id, start: hs.start, keyHash: hs.keyHash, hello: int64(n), idle: s.idle(),
		clientLoop: hs.loop}
	if !s.register(ses) {
		s.m.Rejected.WithLabelValues("shutdown").Inc()
		ses.abort(endShutdown)
		return nil, nil
	}

	out := hs.out
	if out == nil {
		var err error
		if out, err = s.helloBytes(hs); err != nil {
			s.log.Error("cannot build PROXY v2 header", zap.Uint64("conn", id), zap.Error(err))
			ses.abort(endInternalError)
			s.unregister(ses)
			return nil, nil
		}
	}
	took := time.Since(hs.start)
	s.m.HandshakeSeconds.Observe(took.Seconds())
	if ce := s.log.Check(zap.DebugLevel, "session start"); ce != nil {
		ce.Write(zap.Uint64("conn", id), zap.String("key_hash", hashString(hs.keyHash)), zap.String("gateway", res.Gateway.ID),
			zap.String("source", string(hs.source)), zap.String("client", c.RemoteAddr().String()), zap.Duration("connect", took))
	}
	return ses, out
}

// helloBytes returns what opens the session at the gateway: the PROXY v2
// header (when ProxyProtocolOut is on) and the bytes read, contiguous in
// hs.buf so that they leave in one write — the header is built in the
// headroom right in front of the bytes read.
func (s *Server) helloBytes(hs *handshake) ([]byte, error) {
	buf := hs.buf
	out := buf[headroom : headroom+hs.n]
	if !s.cfg.ProxyProtocolOut {
		return out, nil
	}
	hdr, err := AppendProxyV2(buf[:0:headroom], hs.client.RemoteAddr(), hs.client.LocalAddr(), hs.key)
	if err != nil {
		return nil, err
	}
	if len(hdr) > headroom {
		return nil, fmt.Errorf("PROXY v2 header of %d bytes exceeds the headroom of %d", len(hdr), headroom)
	}
	copy(buf[headroom-len(hdr):], hdr)
	return buf[headroom-len(hdr) : headroom+hs.n], nil
}

// gatewayWriteFailed closes a session whose first write to the gateway
// failed: the gateway is blamed, the client gets a reset.
func (s *Server) gatewayWriteFailed(ses *session, err error) {
	s.m.DialFailures.WithLabelValues(ses.gwID).Inc()
	s.log.Debug("write to gateway failed", zap.Uint64("conn", ses.id), zap.String("gateway", ses.gwID), zap.Error(err))
	ses.abort(endGatewayWriteError)
	s.unregister(ses)
}

// spliceSession hands a started session to the parker (returning its
// session) or splices it: TLS in goroutines of its own (detached), plain
// TCP without parking in this goroutine, until it ends (nil).
func (s *Server) spliceSession(ses *session) *parkedSession {
	if s.parker != nil {
		if ps := s.parker.adopt(ses); ps != nil {
			return ps
		}
	}
	if isTLS(ses.client) || isTLS(ses.gw) {
		go func() {
			up, down := s.splice(ses)
			s.endSession(ses, up, down)
			s.connDone()
		}()
		return detached
	}
	up, down := s.splice(ses)
	s.endSession(ses, up, down)
	return nil
}

// idle is how long a user-space copy waits with a buffer (--park-after).
func (s *Server) idle() time.Duration {
	if s.cfg.ParkAfter > 0 {
		return s.cfg.ParkAfter
	}
	return DefaultParkAfter
}

// parkedEnd is the end of a session the parker held.
func (s *Server) parkedEnd(ses *session, up, down int64) {
	s.endSession(ses, up, down)
	s.connDone()
}

// endSession records a finished session: metrics, the session-end log line,
// and removal from the drain set. up and down are the bytes spliced after
// the hello.
func (s *Server) endSession(ses *session, up, down int64) {
	s.unregister(ses)
	reason := ses.closeReason()
	d := time.Since(ses.start)
	id, keyHash, hello := ses.id, ses.keyHash, ses.hello
	s.m.SessionSeconds.Observe(d.Seconds())
	s.m.SessionEnds.WithLabelValues(string(reason)).Inc()
	// Check first: the fields cost a hash and an address string per
	// session, which a proxy logging at warn should not pay.
	if ce := s.log.Check(zap.InfoLevel, "session end"); ce != nil {
		ce.Write(
			zap.Uint64("conn", id),
			zap.String("key_hash", hashString(keyHash)),
			zap.String("gateway", ses.gwID),
			zap.String("client", ses.peerString()),
			zap.Int64("bytes_in", up+hello),
			zap.Int64("bytes_out", down),
			zap.Duration("duration", d),
			zap.String("reason", string(reason)))
	}
}

func (s *Server) register(ses *session) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ctx.Err() != nil {
		return false
	}
	s.sessions[ses] = struct{}{}
	s.perGW[ses.gwID]++
	return true
}

func (s *Server) unregister(ses *session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.sessions[ses]; !ok {
		return
	}
	s.ended.add(ses)
	delete(s.sessions, ses)
	if s.perGW[ses.gwID]--; s.perGW[ses.gwID] <= 0 {
		delete(s.perGW, ses.gwID)
	}
}

// splice copies both directions until each has ended, then closes both
// connections. It returns the bytes copied client→gateway and
// gateway→client (not counting the hello already written).
func (s *Server) splice(ses *session) (up, down int64) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		up = pipe(ses, ses.gw, ses.client, &ses.moved[dirUp], endClientError)
	}()
	down = pipe(ses, ses.client, ses.gw, &ses.moved[dirDown], endGatewayError)
	<-done
	ses.client.Close()
	ses.gw.Close()
	return up, down
}

// pipe is one direction of a session (a named function so stack dumps show
// it). On EOF it half-closes dst so the peer sees FIN and the other
// direction keeps flowing; on an error it aborts the whole session, which
// also unblocks the other direction.
//
// meter counts the bytes as they move (see spliceCounted).
func pipe(ses *session, dst, src net.Conn, meter *atomic.Int64, reason endReason) int64 {
	var n int64
	var err error
	if isTLS(dst) || isTLS(src) {
		n, err = copyUser(dst, src, ses.idle, meter)
	} else {
		n, err = spliceCounted(dst, src, meter)
	}
	ses.endDirection(dst, src, err, reason)
	return n
}

// liveChunk is how many bytes a --no-park direction splices between
// updates of its byte count.
const liveChunk = 1 << 20

// spliceCounted is io.Copy (splice(2) between TCP sockets) in chunks of
// liveChunk, adding each chunk to meter as it completes: a bulk stream's
// bytes show in tether_bytes_total while it runs, at the cost of one
// extra call per MiB. A direction that moves less than a chunk is counted
// when it ends.
func spliceCounted(dst, src net.Conn, meter *atomic.Int64) (int64, error) {
	var total int64
	for {
		n, err := io.CopyN(dst, src, liveChunk)
		total += n
		meter.Add(n)
		if errors.Is(err, io.EOF) {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// endDirection is what both data paths do when one direction stops: after
// EOF (err nil) half-close dst, so the other direction keeps flowing; after
// an error, or if the half-close fails, abort the session. The session's
// end reason names the side that failed, whichever direction noticed: a
// client that vanished breaks the write toward it as well as the read from
// it. A side that itself broke (reset, timed out, unreachable) is just
// closed: a reset there would tell nobody anything.
func (ses *session) endDirection(dst, src net.Conn, err error, reason endReason) {
	if err == nil {
		if closeWrite(dst) == nil {
			return
		}
		ses.abort(reason)
		return
	}
	failed := brokenSide(dst, src, err)
	switch failed {
	case ses.client:
		reason = endClientError
	case ses.gw:
		reason = endGatewayError
	}
	ses.abortFrom(failed, reason)
}

// brokenSide finds which connection of a direction broke: the one the
// kernel already closed (reset or timed out), else the source for a failed
// read (reset, timeout, unreachable) and the destination for a broken pipe;
// nil when it cannot tell.
func brokenSide(dst, src net.Conn, err error) net.Conn {
	switch {
	case isSrcError(err) && peerError(err):
		return src // the read from src failed: no need to ask the kernel
	case peerGone(src):
		return src
	case peerGone(dst):
		return dst
	case errors.Is(err, syscall.EPIPE):
		return dst
	case peerError(err) || errors.Is(err, os.ErrDeadlineExceeded):
		return src
	}
	return nil
}

// peerError reports whether err is one the peer's side causes: a reset, a
// timeout of the connection, an unreachable host.
func peerError(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ETIMEDOUT) || errors.Is(err, syscall.EHOSTUNREACH)
}

// srcError marks the failure of a read from a direction's source (the
// parker's splice into its pipe), which only the source can cause; a
// failed write, whose ECONNRESET may be either side's, is not marked.
type srcError struct{ error }

func (e srcError) Unwrap() error { return e.error }

// isSrcError is errors.As(err, new(srcError)) without the allocation (it
// runs for every session a peer resets).
func isSrcError(err error) bool {
	switch e := err.(type) {
	case srcError:
		return true
	case interface{ Unwrap() error }:
		return isSrcError(e.Unwrap())
	case interface{ Unwrap() []error }:
		for _, e := range e.Unwrap() {
			if isSrcError(e) {
				return true
			}
		}
	}
	return false
}

// abort closes c with RST (SO_LINGER 0) when it is TCP, so nothing lingers
// in TIME_WAIT and the peer learns the close was abnormal.
func abort(c net.Conn) {
	if tc := tcpOf(c); tc != nil {
		_ = tc.SetLinger(0)
	}
	c.Close()
}

// tcpSocket is what the proxy needs of a TCP connection under any
// wrapper: *net.TCPConn is one, and so is sock.Conn (the lean gateway dial).
type tcpSocket interface {
	net.Conn
	syscall.Conn
	CloseWrite() error
	SetLinger(sec int) error
}

// rawTCP finds the TCP connection under c, or nil.
func rawTCP(c net.Conn) tcpSocket {
	switch t := c.(type) {
	case *net.TCPConn:
		return t
	case *sock.Conn:
		return t
	case interface{ TCPConn() (*net.TCPConn, bool) }:
		if tc, _ := t.TCPConn(); tc != nil {
			return tc
		}
	}
	return nil
}

// hashString renders a key hash for logs: raw keys are never logged.
func hashString(h uint64) string { return strconv.FormatUint(h, 16) }
