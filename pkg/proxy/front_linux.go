//go:build linux

package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/tether-proxy/tether/internal/sock"
	"github.com/tether-proxy/tether/pkg/proto"
	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route"
)

// The front runs a new connection's first steps as events of the parker's
// epoll loop (Config.EventLoop), the way HAProxy and nginx do, instead of
// in a goroutine: accept, the hello read, the key lookup on the ring, the
// gateway connect and the first write. The sockets are raw descriptors in
// the parker's epoll set; neither enters Go's poller, and no goroutine,
// deadline timer or channel handoff is spent on the connection. Once the
// hello is forwarded, both directions are parked as they are (already
// registered) and the loop serves their small messages inline; a direction
// that streams gets a worker goroutine as any parked session does.
//
// Anything that may wait is handed to a handler goroutine and runs the
// ordinary path from where the loop stopped: a resolver that does I/O
// (Redis bindings), a failed or slow first connect (the failover to the
// next candidate), an HTTP client's 400 reply, a first write the socket did
// not take whole. Deadlines — the handshake timeout, the connect timeout —
// are two FIFO queues (each has one duration, so arrival order is deadline
// order) served by one timer that wakes the loop through an eventfd.

// frontBit marks an epoll event of the front (its slot in front.conns)
// rather than of a parked direction (its slot in parker.slots).
const frontBit = 1 << 31

// frontState is what a front entry is waiting for.
type frontState uint8

const (
	fsDone     frontState = iota // finished: handed on or closed
	fsWake                       // the loop's eventfd (slot 0)
	fsListener                   // a listening socket
	fsHello                      // a client's hello
	fsConnect                    // the gateway connect
)

// frontConn is a listener or a connection in the front. Only the loop
// goroutine touches a connection's fields.
type frontConn struct {
	state     frontState
	slot, gen uint32 // slot > 0 once it has one
	armed     bool   // fd is registered in the epoll set
	gArmed    bool   // gfd is
	fd        int    // the client socket
	peer      netip.AddrPort
	id        uint64
	start     time.Time
	deadline  time.Time // end of the handshake
	bufp      *[]byte   // pooled: headroom, then the bytes read
	n         int       // bytes read
	key       []byte    // aliases *bufp
	keyHash   uint64
	rt        route.Route
	try       route.Attempt // the candidate being connected to
	gfd       int           // its socket, or -1
	gap       netip.AddrPort
	cdeadline time.Time  // end of the connect
	hs        *handshake // built by sendFirst; its out is what is still to write

	ln *frontListener // state fsListener
}

// frontListener is a listening socket the loop accepts on.
type frontListener struct {
	rc      syscall.RawConn // the listener's: accept runs inside its Control
	backoff time.Duration   // after an accept error (loop only)
	opts    *listenerOpts   // shared by the loops that accept on it
}

// listenerOpts are the options every client connection the loop accepts
// gets: TCP_NODELAY (both sides of a proxied session send small writes at
// once) and Config.ClientKeepAlive. They are set on the listening socket,
// shared by every loop that accepts on it, and Linux copies them into each
// connection the listener creates from then on: accepting needs no
// setsockopt of its own, where setting them on each connection (five
// calls at the default keepalive, each keepalive one re-arming a timer)
// cost 10–13% of the proxy's CPU per connection (docs/BENCHMARKS.md).
// Connections already queued when Serve set them were created without.
// The queue is FIFO, so they are the first ones accepted: while unsure,
// each accepted connection is checked (getsockopt) and given the options
// if it lacks them, and the first that has them ends the check, since
// everything behind it in the queue came later. A listener that refuses
// the options has them set on every connection, and so does one whose
// connections keep lacking them past the number that was queued (a kernel
// that does not copy them): the check is then not paid for ever. With
// keepalive off the listener's keepalive is left as it is.
type listenerOpts struct {
	ka      net.KeepAliveConfig
	early   int64        // connections queued when the options were set (at most this many lack them)
	lacking atomic.Int64 // connections found without them
	perConn atomic.Bool  // set them on every connection: the listener refused them or does not pass them on
	unsure  atomic.Bool  // connections from before the options may still be queued
}

// newListenerOpts sets the client options on the listening socket rc.
func newListenerOpts(rc syscall.RawConn, ka net.KeepAliveConfig) *listenerOpts {
	lo := &listenerOpts{ka: ka, early: math.MaxInt64}
	var err error
	if cerr := rc.Control(func(fd uintptr) {
		if err = lo.set(int(fd)); err == nil {
			if n, qerr := sock.AcceptQueueLen(int(fd)); qerr == nil {
				lo.early = int64(n)
			}
		}
	}); cerr != nil || err != nil {
		lo.perConn.Store(true)
	}
	lo.unsure.Store(true)
	return lo
}

// set gives fd the options.
func (lo *listenerOpts) set(fd int) error {
	if err := sock.SetNoDelay(fd); err != nil {
		return err
	}
	return sock.SetKeepAlive(fd, lo.ka)
}

// accepted gives a connection just accepted the options it lacks. unsure
// is lo.unsure as it was before the accept4 that returned fd: a connection
// dequeued after the check ended is one that inherited them.
func (lo *listenerOpts) accepted(fd int, unsure bool) {
	switch {
	case lo.perConn.Load():
		_ = lo.set(fd) // as Go's accept, which ignores a failure here
	case unsure:
		if sock.HasNoDelay(fd) && sock.HasKeepAlive(fd, lo.ka) { // true for keepalive off
			lo.unsure.Store(false)
			return
		}
		if lo.lacking.Add(1) > lo.early {
			lo.perConn.Store(true)
			lo.unsure.Store(false)
		}
		_ = lo.set(fd)
	}
}

// front is the event-loop handshake of one Server in one of its loops.
type front struct {
	s           *Server
	p           *parker
	l           *evloop // the loop it runs in
	dialer      *route.Dialer
	immediate   bool // the resolver never waits: resolve in the loop
	dialTimeout time.Duration
	wfd         int // eventfd: the timer wakes the loop through it

	mu      sync.Mutex // guards conns, free, nextGen: listeners register from Serve's goroutine
	conns   []*frontConn
	free    []uint32
	nextGen uint32

	// The loop's own, from here.
	hq, cq  []*frontConn // waiting for a hello / a connect, oldest first
	timer   *time.Timer  // wakes the loop at the first deadline
	timerAt time.Time    // when it is set to fire; zero when not set
}

// fronts are a Server's fronts, one per event loop of its parker; every
// one accepts on every listener Serve is given.
type fronts []*front

// newFronts sets up the fronts of s on p's loops, or returns nil if s's
// configuration needs what only the goroutine path does (TLS, a gateway
// rate, a dialer other than *route.Dialer).
func newFronts(s *Server, p *parker) (fronts, error) {
	cfg := s.cfg
	d, ok := cfg.Dialer.(*route.Dialer)
	if !cfg.EventLoop || p == nil || !ok || d.Admit != nil || cfg.TLS != nil || cfg.GatewayTLS != nil || cfg.GatewayRate != nil {
		return nil, nil
	}
	var fs fronts
	for _, l := range p.loops {
		f, err := newFront(s, l, d)
		if err != nil {
			for _, f := range fs {
				f.close()
			}
			return nil, err
		}
		fs = append(fs, f)
	}
	return fs, nil
}

// newFront sets up the front of s in loop l.
func newFront(s *Server, l *evloop, d *route.Dialer) (*front, error) {
	cfg := s.cfg
	wfd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("eventfd", err)
	}
	f := &front{s: s, p: l.p, l: l, dialer: d, wfd: wfd, dialTimeout: d.DialTimeout}
	if f.dialTimeout <= 0 {
		f.dialTimeout = route.DefaultDialTimeout
	}
	if im, ok := cfg.Resolver.(route.Immediate); ok {
		f.immediate = im.ResolvesImmediately()
	}
	wake := &frontConn{state: fsWake, gfd: -1}
	f.conns = []*frontConn{wake}
	if err := f.ctl(unix.EPOLL_CTL_ADD, wfd, wake, unix.EPOLLIN); err != nil {
		unix.Close(wfd)
		return nil, err
	}
	f.timer = time.AfterFunc(time.Hour, f.poke)
	f.timer.Stop()
	return f, nil
}

// close releases the front once the loop has returned.
func (f *front) close() {
	f.timer.Stop()
	unix.Close(f.wfd)
}

// poke wakes the loop (the deadline timer).
func (f *front) poke() {
	one := uint64(1)
	_, _ = unix.Write(f.wfd, (*[8]byte)(unsafe.Pointer(&one))[:])
}

// ctl registers (op) fd in the epoll set for events, as fc's.
func (f *front) ctl(op, fd int, fc *frontConn, events uint32) error {
	ev := unix.EpollEvent{Events: events, Fd: int32(frontBit | fc.slot), Pad: int32(fc.gen)}
	return f.l.ctl(op, fd, &ev)
}

func (f *front) addSlot(fc *frontConn) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.nextGen++
	fc.gen = f.nextGen
	if n := len(f.free); n > 0 {
		fc.slot = f.free[n-1]
		f.free = f.free[:n-1]
		f.conns[fc.slot] = fc
		return
	}
	fc.slot = uint32(len(f.conns))
	f.conns = append(f.conns, fc)
}

func (f *front) freeSlot(fc *frontConn) {
	if fc.slot == 0 {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.conns[fc.slot] = nil
	f.free = append(f.free, fc.slot)
	fc.slot = 0
}

// event handles one epoll event of the front, in the loop goroutine.
func (f *front) event(slot, gen, events uint32) {
	f.mu.Lock()
	var fc *frontConn
	if int(slot) < len(f.conns) {
		if c := f.conns[slot]; c != nil && c.gen == gen {
			fc = c
		}
	}
	f.mu.Unlock()
	if fc == nil {
		return
	}
	switch fc.state {
	case fsWake:
		var b [8]byte
		_, _ = unix.Read(f.wfd, b[:]) // tick, after this batch, serves the deadlines
	case fsListener:
		f.accept(fc)
	case fsHello:
		f.hello(fc)
	case fsConnect:
		f.connectDone(fc)
	}
}

// serve accepts on ln in every loop until stop is closed (nil) or a loop
// stops (ErrEventLoopStopped); rc is ln's. Each loop holds the listener
// one-shot in its own epoll set: a new connection wakes the loops that
// are armed, the first to call accept takes it (and what else is queued,
// up to acceptBatch), the others find nothing and re-arm.
func (fs fronts) serve(rc syscall.RawConn, stop <-chan struct{}) error {
	opts := newListenerOpts(rc, fs[0].s.cfg.ClientKeepAlive)
	for _, f := range fs {
		fc := &frontConn{state: fsListener, gfd: -1, ln: &frontListener{rc: rc, opts: opts}}
		f.addSlot(fc)
		defer f.freeSlot(fc)
		if err := f.armListener(fc, unix.EPOLL_CTL_ADD); err != nil {
			return fmt.Errorf("proxy: watch listener: %w", err)
		}
	}
	select {
	case <-stop:
		return nil
	case <-fs[0].p.stopped:
		return ErrEventLoopStopped
	}
}

// unwatchListener takes a listener out of every loop's epoll set before
// it is closed (Serve's stop).
func (fs fronts) unwatchListener(rc syscall.RawConn) {
	for _, f := range fs {
		f.unwatchListener(rc)
	}
}

// armListener (re)registers a listener for one readiness event: one-shot,
// so a listener closed here but still open in another process (a handoff
// passed it on) cannot keep waking the loop.
func (f *front) armListener(fc *frontConn, op int) error {
	var err error
	if cerr := fc.ln.rc.Control(func(lfd uintptr) {
		err = f.ctl(op, int(lfd), fc, unix.EPOLLIN|unix.EPOLLONESHOT)
	}); cerr != nil {
		return cerr
	}
	return err
}

// unwatchListener takes a listener out of the epoll set before it is
// closed (Serve's stop).
func (f *front) unwatchListener(rc syscall.RawConn) {
	_ = rc.Control(func(lfd uintptr) { _ = f.l.ctl(unix.EPOLL_CTL_DEL, int(lfd), nil) })
}

// acceptBatch is the most connections one listener event accepts, so a
// storm on one listener does not starve the sessions' events.
const acceptBatch = 64

type accepted struct {
	fd     int
	peer   netip.AddrPort
	unsure bool // its options must be checked (listenerOpts)
}

// accept takes what the listener has (up to acceptBatch) and starts each
// connection's handshake, then re-arms the listener.
func (f *front) accept(fc *frontConn) {
	l := fc.ln
	var batch [acceptBatch]accepted
	n := 0
	var aerr error
	if cerr := l.rc.Control(func(lfd uintptr) {
		for n < acceptBatch {
			unsure := l.opts.unsure.Load() // before the accept: see listenerOpts
			fd, peer, err := sock.Accept(int(lfd))
			switch {
			case err == nil:
				batch[n] = accepted{fd, peer, unsure}
				n++
				continue
			case errors.Is(err, unix.EINTR) || errors.Is(err, unix.ECONNABORTED):
				continue
			case !errors.Is(err, unix.EAGAIN):
				aerr = os.NewSyscallError("accept4", err)
			}
			return
		}
	}); cerr != nil {
		return // closed: Serve is returning
	}
	for _, a := range batch[:n] {
		l.opts.accepted(a.fd, a.unsure)
		f.started(a.fd, a.peer)
	}
	if aerr == nil {
		l.backoff = 0
		_ = f.armListener(fc, unix.EPOLL_CTL_MOD) // fails only once the listener is closed
		return
	}
	// Out of descriptors and the like: back off and keep serving the
	// sessions we have, as Serve does.
	s := f.s
	l.backoff = min(max(2*l.backoff, 5*time.Millisecond), time.Second)
	s.m.AcceptErrors.Inc()
	if route.IsLocalResourceError(aerr) {
		s.localFailed("accept", aerr)
	} else {
		s.log.Warn("accept failed; backing off", zap.Error(aerr), zap.Duration("backoff", l.backoff))
	}
	time.AfterFunc(l.backoff, func() { _ = f.armListener(fc, unix.EPOLL_CTL_MOD) })
}

// started begins the handshake of an accepted connection.
func (f *front) started(fd int, peer netip.AddrPort) {
	s := f.s
	if !s.admit() {
		resetFD(fd)
		return
	}
	now := time.Now()
	fc := &frontConn{state: fsHello, fd: fd, gfd: -1, peer: peer, id: s.nextID.Add(1), start: now,
		deadline: now.Add(s.cfg.HandshakeTimeout), bufp: s.pool.Get().(*[]byte)}
	f.hello(fc)
}

// resetFD closes a raw socket with a reset.
func resetFD(fd int) {
	_ = sock.SetLinger(fd, 0)
	_ = sock.Close(fd)
}

// hello reads what the client sent so far; once the extractor has the key
// the connection goes on to its gateway, otherwise it waits for more.
func (f *front) hello(fc *frontConn) {
	buf := (*fc.bufp)[headroom:]
	ex := f.s.cfg.Extractor
	for {
		r, _, e := unix.RawSyscall(unix.SYS_READ, uintptr(fc.fd), uintptr(unsafe.Pointer(&buf[fc.n])), uintptr(len(buf)-fc.n))
		switch {
		case e == unix.EINTR:
			continue
		case e == unix.EAGAIN:
			f.waitHello(fc)
			return
		case e != 0:
			f.fail(fc, os.NewSyscallError("read", e))
			return
		case r == 0:
			f.fail(fc, io.EOF)
			return
		}
		fc.n += int(r)
		key, err := ex.Extract(buf[:fc.n])
		switch {
		case err == nil:
			fc.key = key
			f.helloDone(fc)
			return
		case !errors.Is(err, proto.ErrNeedMore):
			f.fail(fc, err)
			return
		case fc.n == len(buf):
			f.fail(fc, proto.ErrTooLarge)
			return
		}
	}
}

// waitHello arms the client for its next bytes; the first time, it also
// takes a slot and a place in the handshake deadline queue.
func (f *front) waitHello(fc *frontConn) {
	if fc.slot == 0 {
		f.addSlot(fc)
		f.hq = append(f.hq, fc)
	}
	op := unix.EPOLL_CTL_MOD
	if !fc.armed {
		op = unix.EPOLL_CTL_ADD
		fc.armed = true
	}
	if err := f.ctl(op, fc.fd, fc, unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLONESHOT); err != nil {
		f.fail(fc, err)
	}
}

// errHandshakeTimeout is a handshake that outlived HandshakeTimeout in the
// front (the goroutine path gets os.ErrDeadlineExceeded from its read).
var errHandshakeTimeout = fmt.Errorf("handshake: %w", os.ErrDeadlineExceeded)

// fail ends a handshake that found no key (err says why), as handleConn's
// failures do: counted, and the client closed without a byte — except an
// HTTP client, which gets a 400 from a goroutine (the write may wait), and
// one routed by its address under --no-key hash-source.
func (f *front) fail(fc *frontConn, err error) {
	s := f.s
	hello := (*fc.bufp)[headroom : headroom+fc.n]
	key, err := s.noKey(err, hello, fc.peer.String())
	if err == nil {
		fc.key = key
		f.helloDone(fc)
		return
	}
	id := fc.id
	c := f.release(fc)
	s.handshakeOver()
	if errors.Is(err, proto.ErrNoKey) {
		s.dispatchJob(job{fn: func() {
			s.handshakeFailed(c, id, keyReason(err), err)
			s.connDone()
		}})
		return
	}
	s.handshakeFailed(c, id, keyReason(err), err)
	s.connDone()
}

// release takes fc out of the front (slot, buffer) and returns its client
// socket as a connection.
func (f *front) release(fc *frontConn) *sock.Conn {
	f.freeSlot(fc)
	fc.state = fsDone
	if fc.bufp != nil {
		f.s.pool.Put(fc.bufp)
		fc.bufp = nil
	}
	fc.key = nil
	return sock.NewConn(fc.fd, fc.peer)
}

// handOff passes a connection whose key was read to a handler goroutine,
// which carries on with rest (resolve and dial, or dial) as handleConn
// would; the buffer goes along.
func (f *front) handOff(fc *frontConn, rest func(hs *handshake) *parkedSession) {
	s := f.s
	hs := f.handshake(fc)
	bufp := fc.bufp
	fc.bufp = nil
	f.release(fc)
	s.dispatchJob(job{fn: func() {
		ps := rest(hs)
		s.pool.Put(bufp)
		s.served(ps)
	}})
}

// handshake is what fc's handshake learned, for the session.
func (f *front) handshake(fc *frontConn) *handshake {
	hs := &handshake{client: sock.NewConn(fc.fd, fc.peer), id: fc.id, start: fc.start, buf: *fc.bufp, n: fc.n,
		key: fc.key, keyHash: fc.keyHash, source: fc.rt.Source}
	if fc.armed {
		hs.loop = f.l
	}
	return hs
}

// helloDone routes a connection whose key was read: on the ring in the
// loop, then a non-blocking connect to the first candidate the dialer
// would try.
func (f *front) helloDone(fc *frontConn) {
	s := f.s
	fc.keyHash = ring.KeyHash(fc.key)
	deadline := fc.deadline
	if !f.immediate {
		f.handOff(fc, func(hs *handshake) *parkedSession { return s.route(hs, deadline) })
		return
	}
	rt, err := s.cfg.Resolver.Resolve(s.ctx, fc.key)
	if err != nil {
		hs := f.handshake(fc)
		f.release(fc)
		s.routeFailed(hs, err)
		s.connDone()
		return
	}
	s.m.Routes.WithLabelValues(string(rt.Source)).Inc()
	fc.rt = rt
	try, ok := f.dialer.Pick(rt.Candidates)
	var ap netip.AddrPort
	if ok {
		ap, err = netip.ParseAddrPort(try.Gateway.Addr)
	}
	if !ok || err != nil {
		// A host name, or nothing the loop can try by itself.
		f.handOff(fc, func(hs *handshake) *parkedSession {
			return s.dialRoute(hs, deadline, func(ctx context.Context) (route.Result, error) { return f.dialer.Dial(ctx, rt.Candidates) })
		})
		return
	}
	fc.try, fc.gap = try, ap
	gfd, connected, err := sock.Start(ap)
	if err != nil {
		f.failover(fc, err)
		return
	}
	fc.gfd = gfd
	if connected {
		f.connected(fc)
		return
	}
	if f.sendFirst(fc) {
		return
	}
	fc.state = fsConnect
	if fc.slot == 0 {
		f.addSlot(fc)
	}
	fc.cdeadline = time.Now().Add(f.dialTimeout)
	f.cq = append(f.cq, fc)
	if err := f.ctl(unix.EPOLL_CTL_ADD, gfd, fc, unix.EPOLLOUT|unix.EPOLLONESHOT); err != nil {
		f.failover(fc, err)
		return
	}
	fc.gArmed = true
}

// sendFirst writes the first bytes to a gateway whose connect may still
// be in flight, as HAProxy does: a socket still connecting refuses the
// write (EAGAIN), and the loop waits for it to become writable; one whose
// connect failed returns the connect's error, for the failover; one that
// is up takes the bytes, and the session starts. On loopback the connect
// has nearly always completed, so the write replaces the second connect()
// that would have asked. It reports whether fc went on (started or failed
// over).
func (f *front) sendFirst(fc *frontConn) bool {
	hs := f.handshake(fc)
	out, err := f.s.helloBytes(hs)
	if err != nil {
		return false // startSession fails it, once connected
	}
	hs.out, fc.hs = out, hs // connected writes what is left of out
	n, err := sock.Write(fc.gfd, out)
	switch {
	case errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR):
		return false
	case err != nil:
		f.failover(fc, fmt.Errorf("connect: %w", err))
		return true
	}
	hs.out = out[n:]
	f.connected(fc)
	return true
}

// failover hands a connection whose first connect failed (err) to a
// handler goroutine, which records the failure and tries the next
// candidates (route.Dialer.DialAfter).
func (f *front) failover(fc *frontConn, err error) {
	if fc.gfd >= 0 {
		_ = sock.Close(fc.gfd)
		fc.gfd, fc.gArmed = -1, false
	}
	s, rt, try, deadline := f.s, fc.rt, fc.try, fc.deadline
	err = fmt.Errorf("dial gateway %s: %w", try.Gateway.ID, err)
	f.handOff(fc, func(hs *handshake) *parkedSession {
		return s.dialRoute(hs, deadline, func(ctx context.Context) (route.Result, error) {
			return f.dialer.DialAfter(ctx, rt.Candidates, try, err)
		})
	})
}

// connectDone handles the gateway socket's writability: the connect ended.
func (f *front) connectDone(fc *frontConn) {
	if err := sock.Connected(fc.gfd, fc.gap); err != nil {
		f.failover(fc, err)
		return
	}
	f.connected(fc)
}

// connected starts the session of a connection whose gateway answered:
// the header and hello go out in one non-blocking write, and both
// directions are parked as they are.
func (f *front) connected(fc *frontConn) {
	s := f.s
	f.dialer.Connected(fc.try)
	s.localOK()
	hs := fc.hs
	if hs == nil {
		hs = f.handshake(fc)
	}
	gw := sock.NewConn(fc.gfd, fc.gap)
	bufp := fc.bufp
	fc.bufp = nil
	gwID, gwInEpoll := fc.try.Gateway, fc.gArmed
	f.release(fc)
	ses, out := s.startSession(hs, route.Result{Conn: gw, Gateway: gwID, Attempts: 1})
	if ses == nil {
		s.pool.Put(bufp)
		s.connDone()
		return
	}
	n, err := gw.WriteNow(out)
	switch {
	case err == nil:
		s.pool.Put(bufp)
		ses.moved[dirUp].Add(ses.hello)
		s.parker.adoptParked(ses, gwInEpoll, f.l)
	case errors.Is(err, unix.EAGAIN):
		// The socket did not take it all (never seen on a new
		// connection): the rest waits in a handler goroutine.
		rest := out[n:]
		s.dispatchJob(job{fn: func() {
			_, err := gw.Write(rest)
			s.pool.Put(bufp)
			if err != nil {
				s.gatewayWriteFailed(ses, err)
				s.connDone()
				return
			}
			ses.moved[dirUp].Add(ses.hello)
			s.served(s.spliceSession(ses))
		}})
	default:
		s.pool.Put(bufp)
		s.gatewayWriteFailed(ses, err)
		s.connDone()
	}
}

// abandon ends every handshake the front holds, once the loop has
// stopped: their clients are closed and counted as handshakes that failed.
// It runs in the loop goroutine, as it returns.
func (f *front) abandon() {
	f.mu.Lock()
	var held []*frontConn
	for _, fc := range f.conns {
		if fc != nil && (fc.state == fsHello || fc.state == fsConnect) {
			held = append(held, fc)
		}
	}
	f.mu.Unlock()
	for _, fc := range held {
		if fc.gfd >= 0 {
			_ = sock.Close(fc.gfd)
			fc.gfd = -1
		}
		f.fail(fc, ErrEventLoopStopped)
	}
	f.hq, f.cq = nil, nil
}

// tick serves the deadlines that passed, after each batch of events, and
// sets the timer for the next one.
func (f *front) tick() {
	if len(f.hq) == 0 && len(f.cq) == 0 {
		return
	}
	now := time.Now()
	for len(f.hq) > 0 {
		fc := f.hq[0]
		if fc.state == fsHello && now.Before(fc.deadline) {
			break
		}
		f.hq[0] = nil
		f.hq = f.hq[1:]
		if fc.state == fsHello {
			f.fail(fc, errHandshakeTimeout)
		}
	}
	for len(f.cq) > 0 {
		fc := f.cq[0]
		if fc.state == fsConnect && now.Before(fc.cdeadline) {
			break
		}
		f.cq[0] = nil
		f.cq = f.cq[1:]
		if fc.state == fsConnect {
			f.failover(fc, fmt.Errorf("connect: %w", os.ErrDeadlineExceeded))
		}
	}
	var next time.Time
	if len(f.hq) > 0 {
		next = f.hq[0].deadline
	}
	if len(f.cq) > 0 && (next.IsZero() || f.cq[0].cdeadline.Before(next)) {
		next = f.cq[0].cdeadline
	}
	if next.IsZero() {
		return
	}
	if f.timerAt.IsZero() || next.Before(f.timerAt) || !now.Before(f.timerAt) {
		f.timerAt = next
		f.timer.Reset(next.Sub(now))
	}
}

// listenerConn is the raw access to a TCP listener the front accepts on,
// or nil for listeners it cannot (PROXY protocol, TLS, not TCP).
func listenerConn(ln net.Listener) syscall.RawConn {
	sc, ok := ln.(interface {
		syscall.Conn
		Addr() net.Addr
	})
	if !ok {
		return nil
	}
	if _, tcp := sc.Addr().(*net.TCPAddr); !tcp {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}
