//go:build linux

package proxy

import (
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/tether-proxy/tether/internal/sock"
)

// The parker, by concern: this file holds its types and lifecycle;
// park_loop_linux.go the epoll event loop (arming, wakeups, parking a
// direction); park_session_linux.go the session state machine (claim, run,
// finish); park_move_linux.go the non-blocking splice moves;
// park_pipes_linux.go the pipe pool.

// parker holds spliced sessions while they are idle without a goroutine or
// a pipe. Each direction has a worker goroutine while it is active: it
// moves what arrives with splice(2) through a pooled pipe (taken only while
// bytes are in it) and waits for more in Go's poller. After a quiet spell
// the worker exits and the direction's source socket is armed in the
// parker's own epoll set (one-shot); the next byte, EOF or error wakes it.
// Go's io.Copy splice path instead keeps a goroutine and a pipe (two
// descriptors) per direction blocked for the session's whole life; on a
// fleet of mostly idle mobile sessions that is most of the cost
// (docs/BENCHMARKS.md).
type parker struct {
	log       *zap.Logger
	m         *Metrics
	parkAfter time.Duration
	now       func() time.Time                   // when a direction parked and woke (not socket deadlines)
	onEnd     func(ses *session, up, down int64) // a session ended; both connections are closed

	// The event loops, each with its own epoll set; a session's sockets
	// live in one of them (parkedSession.l). next picks the loop of a
	// session no loop has seen yet, round robin.
	loops []*evloop
	next  atomic.Uint32

	parkedNow atomic.Int64 // directions waiting in the epoll set
	pipesMade atomic.Int64 // pipes created; the pool should keep it flat

	// Wakeups served in the loop, and those handed to a worker.
	wakesInline, wakesWorker prometheus.Counter

	// Directions that were armed at least once, by slot; the epoll event
	// carries the slot and a generation, so an event that raced the end
	// of its session never reaches the direction that reuses the slot.
	mu      sync.Mutex
	slots   []*parkedDir
	free    []uint32
	nextGen uint32

	pipes chan *pipePair // free pipes
	// The pool is emptied once no move has taken a pipe for parkAfter, so
	// an idle proxy holds none: pipeGets counts takes, trimArmed says a
	// trim is scheduled.
	pipeGets  atomic.Int64
	trimArmed atomic.Bool
	movers    sync.Pool // *mover
	closeMu   sync.Once
	stopOnce  sync.Once
	stopped   chan struct{} // closed when the first loop has returned
	closing   atomic.Bool   // close began: the loops' wakeup errors are expected
	started   bool          // start ran (set before the loops, read by close)

	// spawn runs a direction's worker in another goroutine, a reused one
	// (the server's handlers, workers.go): run, which claims d, or, when
	// the caller claimed it, work. It never blocks.
	spawn func(d *parkedDir, claimed bool)
}

// evloop is one event loop: an epoll set, waited on in Go's poller, and the
// goroutine that serves its events. With several loops (Config.EventLoops)
// every loop accepts on every listener, so handshakes and the small moves
// of parked sessions run on as many cores as there are loops.
type evloop struct {
	p     *parker
	ep    *os.File        // the epoll set, in Go's poller: parked wakeups need no thread of their own
	epRC  syscall.RawConn // the loop waits on the set through it
	done  chan struct{}   // closed when the loop has returned
	front *front          // when set (before start), handles the events of new connections (front_linux.go)

	// epoll_ctl uses the descriptor itself, not epRC.Control: a closure
	// per call escapes to the heap, and there are three calls per
	// connection. epMu keeps the number from being closed (and reused)
	// under a call: closeEpoll takes it alone before it closes ep.
	epMu     sync.RWMutex
	epfd     int
	epClosed bool
}

// ctl is epoll_ctl(2) on the loop's set for fd, which the caller keeps
// open. Once the set is closed it fails with os.ErrClosed.
func (l *evloop) ctl(op, fd int, ev *unix.EpollEvent) error {
	l.epMu.RLock()
	defer l.epMu.RUnlock()
	if l.epClosed {
		return os.ErrClosed
	}
	if err := sock.EpollCtl(l.epfd, op, fd, ev); err != nil {
		return os.NewSyscallError("epoll_ctl", err)
	}
	return nil
}

// closeEpoll closes the loop's set, which wakes the loop with an error;
// the descriptor itself closes once the loop is out of the poller.
func (l *evloop) closeEpoll() {
	l.epMu.Lock()
	l.epClosed = true
	l.epMu.Unlock()
	l.ep.Close()
}

// maxSplice is the most one splice call reads; pipes are sized to it.
const maxSplice = 1 << 20

// maxWrite is the most one splice call writes to a socket: a pipe read
// whole (up to maxSplice) goes out in steps, each sent — and on loopback
// received by the peer, in this thread's softirq — before the next one
// is queued, rather than handed to the kernel at once to be sent later
// from the pacing timer (BBR) or ksoftirqd, where the peers' ACKs and
// sends queue behind it. Measured on loopback: bulk echo through tether
// with 8 streams 3–5% faster than writing whole pipes, ksoftirqd's CPU 40%
// lower, at 64 streams the same (docs/BENCHMARKS.md). It equals
// notSentLowat, the step a streaming destination is refilled in.
const maxWrite = notSentLowat

// A direction that streams — one move of at least streamAt bytes — gets
// TCP_NOTSENT_LOWAT = notSentLowat on its destination, once: the proxy then
// refills that socket in steps of about notSentLowat as the kernel sends,
// instead of splicing a whole pipe into its send buffer to wait there.
// Measured on loopback with BBR (the default congestion control of many
// hosts, which paces every flow): bulk echo through tether 1.1× (8 streams)
// and 1.35× (64 streams) the throughput without it (docs/BENCHMARKS.md);
// the send queue sent by the pacing timer in softirq was what slowed the
// proxy's peers. A chatty session never moves that much at once and pays
// no system call for it.
const (
	streamAt     = 64 << 10
	notSentLowat = 128 << 10
)

// parkedSession is the parker's state of one session. It is one
// allocation, directions included, and holds nothing while the session is
// idle but what it takes to wake it.
type parkedSession struct {
	p   *parker
	l   *evloop // the loop whose epoll set holds the session's sockets
	ses *session

	mu       sync.Mutex
	open     int8 // directions not finished
	running  int8 // workers (or the loop) moving data now
	finished bool // onEnd called, or handed to another process
	// inline: a session the front started. Its wakeups move inline in
	// the loop whenever they are small (not only after a quiet spell), and
	// its EOFs and errors end there too.
	inline bool

	// A handoff (park_handoff_linux.go) sets handoff: directions stop at
	// their next wait instead of waiting or parking, and the last one to
	// stop closes quiet. poked says their deadlines were moved to stop
	// them (a resume clears them).
	handoff atomic.Bool
	quiet   chan struct{} // guarded by mu
	poked   bool          // guarded by mu

	dirs [2]parkedDir
}

// parkedDir is one direction of a session: bytes from src to dst.
type parkedDir struct {
	ps           *parkedSession
	src, dst     net.Conn
	srcRC, dstRC syscall.RawConn
	bytes        int64         // moved so far; only whoever claimed the direction touches it
	meter        *atomic.Int64 // the session's live count of this direction (this process's bytes)
	parkedAt     int64         // when it last parked, UnixNano
	mv           *mover        // while claimed: the move in progress (nil while parked)
	slot, gen    uint32        // its place in parker.slots once armed (slot > 0)
	armed        bool          // in the epoll set (maybe spent); only its claimant touches it
	lowat        bool          // dst has TCP_NOTSENT_LOWAT (the direction streamed); only its claimant touches it
	done         bool          // EOF or error seen; guarded by ps.mu
	parked       bool          // waiting in the epoll set; guarded by ps.mu
}

func newParker(log *zap.Logger, m *Metrics, parkAfter time.Duration, now func() time.Time, onEnd func(*session, int64, int64), spawn func(*parkedDir, bool), loops int) (*parker, error) {
	p := &parker{log: log, m: m, parkAfter: parkAfter, now: now, onEnd: onEnd, spawn: spawn,
		wakesInline: m.Wakeups.WithLabelValues("inline"), wakesWorker: m.Wakeups.WithLabelValues("worker"),
		slots: make([]*parkedDir, 1), // slot 0 means "never armed"
		pipes: make(chan *pipePair, pipePool), stopped: make(chan struct{})}
	for range max(loops, 1) {
		l, err := newEvloop(p)
		if err != nil {
			for _, l := range p.loops {
				l.closeEpoll()
			}
			return nil, err
		}
		p.loops = append(p.loops, l)
	}
	return p, nil
}

func newEvloop(p *parker) (*evloop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	// A non-blocking epoll descriptor is itself pollable: handing it to
	// Go's poller lets the loop wait like any socket read instead of
	// blocking a thread in epoll_wait, so a wakeup costs a goroutine
	// switch, not a thread handoff.
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		return nil, err
	}
	ep := os.NewFile(uintptr(epfd), "tether-park-epoll")
	rc, err := ep.SyscallConn()
	if err != nil {
		ep.Close()
		return nil, err
	}
	return &evloop{p: p, ep: ep, epRC: rc, epfd: epfd, done: make(chan struct{})}, nil
}

// start runs the event loops, with fs (nil for none; else one per loop)
// taking new connections' events.
func (p *parker) start(fs fronts) {
	p.started = true
	for i, l := range p.loops {
		if fs != nil {
			l.front = fs[i]
		}
		go l.run()
	}
}

// close stops the event loops; sessions still parked must have been
// aborted first (Server.Shutdown does).
func (p *parker) close() {
	p.closeMu.Do(func() {
		p.closing.Store(true)
		for _, l := range p.loops {
			l.closeEpoll()
		}
		for _, l := range p.loops {
			if p.started {
				<-l.done
			}
			if l.front != nil {
				l.front.close()
			}
		}
		p.drainPipes()
	})
}

// pick is the loop for a session that is in no epoll set yet.
func (p *parker) pick() *evloop {
	if len(p.loops) == 1 {
		return p.loops[0]
	}
	return p.loops[p.next.Add(1)%uint32(len(p.loops))]
}

// adopt takes over a session whose hello was forwarded. It returns nil
// (and changes nothing) if the connections are not plain TCP; otherwise
// the session belongs to the parker, which calls onEnd when it ends, and
// the caller must run its client → gateway direction with runClient.
func (p *parker) adopt(ses *session) *parkedSession {
	cRC, ok1 := rawConn(ses.client)
	gRC, ok2 := rawConn(ses.gw)
	if !ok1 || !ok2 {
		return nil
	}
	l := ses.clientLoop
	if l == nil {
		l = p.pick()
	}
	ps := p.newSession(ses, cRC, gRC, false, l)
	ses.parked.Store(ps)
	// Both directions wait in Go's poller before parking, so a short
	// session or the hello/reply exchange of a long one never touches the
	// epoll set. The gateway → client one gets a fresh goroutine; the
	// client → gateway one runs in the handler's (runClient), whose large
	// stack is then held only for the first, short wait: a reconnect storm
	// keeps few stacks alive at a time.
	p.spawn(&ps.dirs[1], false)
	return ps
}

func (p *parker) newSession(ses *session, cRC, gRC syscall.RawConn, gwInEpoll bool, l *evloop) *parkedSession {
	ps := &parkedSession{p: p, l: l, ses: ses, open: 2}
	ps.dirs[0] = parkedDir{ps: ps, src: ses.client, dst: ses.gw, srcRC: cRC, dstRC: gRC, meter: &ses.moved[dirUp], armed: ses.clientLoop != nil}
	ps.dirs[1] = parkedDir{ps: ps, src: ses.gw, dst: ses.client, srcRC: gRC, dstRC: cRC, meter: &ses.moved[dirDown], armed: gwInEpoll}
	return ps
}

// adoptParked takes over a session the front started (both sockets are
// *sock.Conn, outside Go's poller) and parks both directions at once, in
// the goroutine of l, whose epoll set holds the client socket (and the
// gateway's if gwInEpoll): the gateway's reply and the client's next
// message wake them there and move inline (parkedSession.inline).
func (p *parker) adoptParked(ses *session, gwInEpoll bool, l *evloop) {
	cRC, _ := rawConn(ses.client)
	gRC, _ := rawConn(ses.gw)
	ps := p.newSession(ses, cRC, gRC, gwInEpoll, l)
	ps.inline = true
	ps.running = 2 // both directions are this caller's until parked
	ses.parked.Store(ps)
	for i := range ps.dirs {
		d := &ps.dirs[i]
		p.parkDir(d)
		p.finish(d, false)
	}
}

// runClient runs a parked session's client → gateway direction until it
// parks or ends, in the caller's goroutine.
func (p *parker) runClient(ps *parkedSession) { p.run(&ps.dirs[0]) }

// firstLinger is the shortest wait in Go's poller before a direction parks
// (parkAfter, if shorter). Parking a new session's directions outright
// costs a connection-rate benchmark about 7% (an epoll_ctl and a wakeup
// through the epoll set for the close that follows).
const firstLinger = 5 * time.Millisecond

// rawConn returns the syscall.RawConn of a TCP connection (also under a
// PROXY protocol wrapper, whose bytes were all consumed by the handshake).
func rawConn(c net.Conn) (syscall.RawConn, bool) {
	tc := rawTCP(c)
	if tc == nil {
		return nil, false
	}
	if pc, ok := c.(interface{ Raw() net.Conn }); ok && pc.Raw() != net.Conn(tc) {
		return nil, false
	}
	rc, err := tc.SyscallConn()
	return rc, err == nil
}

// parkedDelta counts directions entering (+1) or leaving (-1) the epoll set.
func (p *parker) parkedDelta(d int64) {
	p.parkedNow.Add(d)
	p.m.Parked.Add(float64(d))
}

// parkedCount is the number of directions parked in the epoll set now.
func (p *parker) parkedCount() int { return int(p.parkedNow.Load()) }

// sessionDirs is the number of directions of live sessions that were armed
// at least once (for tests).
func (p *parker) sessionDirs() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.slots) - 1 - len(p.free) // slot 0 is never used
}
