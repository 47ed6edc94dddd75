//go:build linux

package proxy

import (
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

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
	onEnd     func(ses *session, up, down int64) // a session ended; both connections are closed
	epfd      int
	ep        *os.File // epfd in Go's poller: parked wakeups need no thread of their own

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
	done      chan struct{} // closed when the loop has returned
	closing   atomic.Bool   // close began: the loop's wakeup error is expected
}

// maxSplice is the most one splice call moves; pipes are sized to it.
const maxSplice = 1 << 20

// pipePool bounds the free pipes kept; pipes exist only while data moves
// (the pool is emptied when moves stop: trim).
const pipePool = 64

type pipePair struct{ r, w int }

// parkedSession is the parker's state of one session. It is one
// allocation, directions included, and holds nothing while the session is
// idle but what it takes to wake it.
type parkedSession struct {
	p   *parker
	ses *session

	mu       sync.Mutex
	open     int8 // directions not finished
	running  int8 // workers (or the loop) moving data now
	finished bool // onEnd called

	dirs [2]parkedDir
}

// parkedDir is one direction of a session: bytes from src to dst.
type parkedDir struct {
	ps           *parkedSession
	src, dst     net.Conn
	srcRC, dstRC syscall.RawConn
	bytes        int64  // moved so far; only whoever claimed the direction touches it
	parkedAt     int64  // when it last parked, UnixNano
	mv           *mover // while claimed: the move in progress (nil while parked)
	slot, gen    uint32 // its place in parker.slots once armed (slot > 0)
	done         bool   // EOF or error seen; guarded by ps.mu
	parked       bool   // waiting in the epoll set; guarded by ps.mu
}

// moverFns are a mover's callbacks for RawConn, bound once when the mover
// is made so that handing them over allocates nothing: read and write wait
// in Go's poller (workers), readNow and writeNow never wait (the loop).
type moverFns struct {
	read, write       func(fd uintptr) bool
	readNow, writeNow func(fd uintptr)
}

// mover is the scratch state of one direction's move while it is claimed;
// pooled, so a parked direction carries none of it and the callbacks handed
// to RawConn are bound once, not per message.
type mover struct {
	d          *parkedDir
	pipe       *pipePair
	n, left    int64 // read into the pipe; still to write out of it
	rerr, perr error // last splice error; pipe error
	eof        bool  // the loop read the source's EOF but did not act on it
	fns        moverFns
}

func (p *parker) getMover(d *parkedDir) *mover {
	mv, _ := p.movers.Get().(*mover)
	if mv == nil {
		mv = &mover{}
		mv.fns = moverFns{read: mv.readOnce, write: mv.writeOnce, readNow: func(fd uintptr) { mv.readOnce(fd) }, writeNow: mv.writeNow}
	}
	mv.d = d
	d.mv = mv
	return mv
}

// putMover returns the direction's mover with its pipe: to the pool if the
// pipe is empty, closed if bytes may be left in it (a failed write).
func (p *parker) putMover(d *parkedDir) {
	mv := d.mv
	if mv.pipe != nil {
		p.putPipe(mv.pipe, mv.left == 0)
	}
	*mv = mover{fns: mv.fns}
	d.mv = nil
	p.movers.Put(mv)
}

// readOnce is the RawConn.Read callback: splice what the socket has into
// the pipe; on would-block give the pipe back and let Go's poller wait.
func (mv *mover) readOnce(fd uintptr) bool {
	p := mv.d.ps.p
	if mv.pipe == nil {
		if mv.pipe, mv.perr = p.getPipe(); mv.perr != nil {
			return true
		}
	}
	for {
		mv.n, mv.rerr = unix.Splice(int(fd), nil, mv.pipe.w, nil, maxSplice, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		if !errors.Is(mv.rerr, unix.EINTR) {
			break
		}
	}
	if errors.Is(mv.rerr, unix.EAGAIN) {
		p.putPipe(mv.pipe, true) // empty: nothing was read
		mv.pipe = nil
		return false // wait for data, EOF or the deadline
	}
	return true
}

// writeOnce is the RawConn.Write callback: move pipe bytes to the socket;
// on would-block let Go's poller wait for the peer to drain.
func (mv *mover) writeOnce(fd uintptr) bool {
	var m int64
	for {
		m, mv.rerr = unix.Splice(mv.pipe.r, nil, int(fd), nil, int(mv.left), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		if !errors.Is(mv.rerr, unix.EINTR) {
			break
		}
	}
	if mv.rerr == nil {
		mv.left -= m
		mv.d.bytes += m
	}
	return !errors.Is(mv.rerr, unix.EAGAIN)
}

// writeNow is the loop's RawConn.Control callback: write until the pipe is
// empty, the socket is full (EAGAIN) or the write fails; never wait.
func (mv *mover) writeNow(fd uintptr) {
	for mv.left > 0 && mv.writeOnce(fd) && mv.rerr == nil {
	}
}

func newParker(log *zap.Logger, m *Metrics, parkAfter time.Duration, onEnd func(*session, int64, int64)) (*parker, error) {
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
	p := &parker{log: log, m: m, parkAfter: parkAfter, onEnd: onEnd, epfd: epfd, ep: ep,
		wakesInline: m.Wakeups.WithLabelValues("inline"), wakesWorker: m.Wakeups.WithLabelValues("worker"),
		slots: make([]*parkedDir, 1), // slot 0 means "never armed"
		pipes: make(chan *pipePair, pipePool), done: make(chan struct{})}
	go p.loop(rc)
	return p, nil
}

// close stops the event loop; sessions still parked must have been
// aborted first (Server.Shutdown does).
func (p *parker) close() {
	p.closeMu.Do(func() {
		p.closing.Store(true)
		p.ep.Close() // wakes the loop with an error; the descriptor closes once it is out
		<-p.done
		p.drainPipes()
	})
}

// loop waits in Go's poller until the epoll set has events, then takes
// them all without blocking and wakes each direction.
func (p *parker) loop(rc syscall.RawConn) {
	defer close(p.done)
	events := make([]unix.EpollEvent, 256)
	var werr error
	drain := func(fd uintptr) bool {
		for {
			n, err := unix.EpollWait(int(fd), events, 0)
			if err != nil {
				if errors.Is(err, unix.EINTR) {
					continue
				}
				werr = err
				return true
			}
			now := time.Now().UnixNano()
			for _, ev := range events[:n] {
				if d := p.lookup(uint32(ev.Fd), uint32(ev.Pad)); d != nil {
					p.wake(d, ev.Events, now)
				}
			}
			if n < len(events) {
				// Drained: the poller is edge-triggered on the set,
				// so wait for the next event to arrive.
				return false
			}
		}
	}
	err := rc.Read(drain)
	switch {
	case werr != nil:
		p.log.Error("park: epoll_wait failed; parked sessions stall", zap.Error(werr))
	case err != nil && !errors.Is(err, os.ErrClosed) && !p.closing.Load():
		p.log.Error("park: waiting for parked sessions failed; they stall", zap.Error(err))
	}
}

func (p *parker) lookup(slot, gen uint32) *parkedDir {
	p.mu.Lock()
	defer p.mu.Unlock()
	if int(slot) < len(p.slots) {
		if d := p.slots[slot]; d != nil && d.gen == gen {
			return d
		}
	}
	return nil
}

// park takes over a session whose hello was forwarded. It returns nil
// (and changes nothing) if the connections are not plain TCP; otherwise
// the session belongs to the parker, which calls onEnd when it ends, and
// the caller must run its client → gateway direction with runClient.
func (p *parker) park(ses *session) *parkedSession {
	cRC, ok1 := rawConn(ses.client)
	gRC, ok2 := rawConn(ses.gw)
	if !ok1 || !ok2 {
		return nil
	}
	ps := &parkedSession{p: p, ses: ses, open: 2}
	ps.dirs[0] = parkedDir{ps: ps, src: ses.client, dst: ses.gw, srcRC: cRC, dstRC: gRC}
	ps.dirs[1] = parkedDir{ps: ps, src: ses.gw, dst: ses.client, srcRC: gRC, dstRC: cRC}
	ses.parked = ps
	// Both directions wait in Go's poller before parking, so a short
	// session or the hello/reply exchange of a long one never touches the
	// epoll set. The gateway → client one gets a fresh goroutine; the
	// client → gateway one runs in the handler's (runClient), whose large
	// stack is then held only for the first, short wait: a reconnect storm
	// keeps few stacks alive at a time.
	go p.run(&ps.dirs[1])
	return ps
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

// arm (re)registers a direction's source for one readiness event.
func (p *parker) arm(d *parkedDir, op int) error {
	ev := unix.EpollEvent{
		Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT,
		Fd:     int32(d.slot),
		Pad:    int32(d.gen),
	}
	var err error
	cerr := d.srcRC.Control(func(fd uintptr) { err = unix.EpollCtl(p.epfd, op, int(fd), &ev) })
	return errors.Join(cerr, err)
}

// claim takes a direction out of the parked state for a worker (or the
// loop's inline move), counts it running and gives it a mover; false if
// the session is over.
func (p *parker) claim(d *parkedDir) bool {
	ps := d.ps
	ps.mu.Lock()
	if d.parked {
		d.parked = false
		p.parkedDelta(-1)
	}
	if d.done || ps.finished {
		ps.mu.Unlock()
		return false
	}
	ps.running++
	ps.mu.Unlock()
	p.getMover(d)
	return true
}

// run is a direction's worker goroutine: started when the session is
// handed over, and on a wakeup the loop does not serve inline.
func (p *parker) run(d *parkedDir) {
	if p.claim(d) {
		p.work(d)
	}
}

// work moves data until the direction has been idle for its wait, then
// parks it, or ends it at EOF or on error. The direction is claimed.
func (p *parker) work(d *parkedDir) {
	eof, err := p.serve(d)
	p.putMover(d)
	if err != nil || eof {
		d.ps.ses.endDirection(d.dst, d.src, err, d.reason()) // an abort marks every direction done
		p.finish(d, true)
		return
	}
	p.sleep(d)
	p.finish(d, false)
}

// reason labels a session that ends because this direction failed.
func (d *parkedDir) reason() endReason {
	if d == &d.ps.dirs[1] {
		return endGatewayError
	}
	return endClientError
}

// inlineMax is the most a wakeup moves in the loop itself; a direction
// that brings more is streaming and gets a worker.
const inlineMax = 64 << 10

// wake handles a readiness event of a parked direction, in the loop's
// goroutine. A direction quiet for parkAfter that brings a small message
// (a heartbeat, a push) is served right here: two non-blocking splices and
// a re-arm, no goroutine, which keeps the first message after a long idle
// nearly as fast as on an unparked session. Everything else — a chatty or
// streaming direction, EOF, a hangup, a destination that cannot take the
// bytes now — goes to a worker goroutine, so the loop never blocks and
// busy sessions keep their own goroutines.
func (p *parker) wake(d *parkedDir, events uint32, now int64) {
	if !p.claim(d) {
		return
	}
	if events&unix.EPOLLIN == 0 || events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 ||
		time.Duration(now-d.parkedAt) < p.parkAfter {
		p.wakesWorker.Inc()
		go p.work(d)
		return
	}
	mv := d.mv
	err := p.moveOnce(d)
	switch {
	case err != nil:
		p.putMover(d)
		d.ps.ses.endDirection(d.dst, d.src, err, d.reason())
		p.finish(d, true)
	case mv.left == 0 && !mv.eof && mv.n < inlineMax:
		// Moved (or, if the event raced a read, found nothing): park again.
		p.wakesInline.Inc()
		p.putMover(d)
		p.sleep(d)
		p.finish(d, false)
	default:
		// EOF, a stream, or a destination that is full: the worker
		// flushes what is left and carries on.
		p.wakesWorker.Inc()
		go p.work(d)
	}
}

// moveOnce is the loop's non-blocking move: one splice from the source
// into a pipe and as much of it to the destination as it takes now. The
// mover records what was read (mv.n, 0 if nothing was there), an EOF
// (mv.eof), and what the destination did not take (mv.left, in mv.pipe).
func (p *parker) moveOnce(d *parkedDir) error {
	mv := d.mv
	if err := d.srcRC.Control(mv.fns.readNow); err != nil {
		return err
	}
	switch {
	case mv.perr != nil:
		return mv.perr
	case errors.Is(mv.rerr, unix.EAGAIN):
		mv.n = 0
		return nil
	case mv.rerr != nil:
		return mv.rerr
	case mv.n == 0:
		mv.eof = true
		return nil
	}
	mv.left = mv.n
	if err := d.dstRC.Control(mv.fns.writeNow); err != nil {
		return err
	}
	if mv.rerr != nil && !errors.Is(mv.rerr, unix.EAGAIN) {
		return mv.rerr
	}
	return nil
}

// sleep parks a direction whose worker is about to end: it is marked parked
// and armed for one readiness event, which wakes it again (maybe before
// this worker has returned). If epoll refuses the socket the session is
// aborted, since nothing would ever wake the direction.
func (p *parker) sleep(d *parkedDir) {
	ps := d.ps
	op := unix.EPOLL_CTL_MOD
	if d.slot == 0 {
		op = unix.EPOLL_CTL_ADD
		p.addSlot(d) // before the first arm: its event may come at once
	}
	d.parkedAt = time.Now().UnixNano()
	ps.mu.Lock()
	d.parked = true
	p.parkedDelta(1)
	ps.mu.Unlock()
	if err := p.arm(d, op); err != nil {
		// Closed meanwhile: an abort or drain already finished every
		// direction, and this abort does nothing. Otherwise the epoll
		// set is full (fs.epoll.max_user_watches) or broken.
		if !errors.Is(err, net.ErrClosed) {
			p.m.ParkErrors.Inc()
			p.log.Warn("park: cannot watch an idle session; closing it", zap.Error(err))
		}
		ps.ses.abort(endParkError)
	}
}

func (p *parker) addSlot(d *parkedDir) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.nextGen++
	d.gen = p.nextGen
	if n := len(p.free); n > 0 {
		d.slot = p.free[n-1]
		p.free = p.free[:n-1]
		p.slots[d.slot] = d
	} else {
		d.slot = uint32(len(p.slots))
		p.slots = append(p.slots, d)
	}
}

// serve moves data while the direction is active and returns when it has
// been idle for its wait (eof and err nil: park it), at EOF, or on error.
// It first finishes what the loop's inline move left: an EOF it read, or
// bytes the destination had no room for.
//
// Reads happen inside RawConn.Read: a splice that would block releases the
// pipe and lets Go's poller wait for the next byte (Go prepares the wait
// before the first attempt, so no wakeup is lost between the two), bounded
// by a read deadline. That is the same three system calls per message as
// io.Copy's splice path, without holding a pipe while waiting.
func (p *parker) serve(d *parkedDir) (eof bool, err error) {
	mv := d.mv
	if mv.eof {
		return true, nil
	}
	if err := p.flush(mv); err != nil {
		return false, err
	}
	now := time.Now()
	wait := p.waitFor(d.ps, now)
	deadline := now.Add(wait)
	if err := d.src.SetReadDeadline(deadline); err != nil {
		return false, err
	}
	for moved := false; ; moved = true {
		// Once data flows, move the idle deadline forward only when half
		// of the wait is used up: one timer update per wait/2, not one
		// per message.
		if moved {
			if now = time.Now(); deadline.Sub(now) < wait/2 {
				wait = p.waitFor(d.ps, now)
				deadline = now.Add(wait)
				if err := d.src.SetReadDeadline(deadline); err != nil {
					return false, err
				}
			}
		}
		mv.n, mv.rerr, mv.perr = 0, nil, nil
		err := d.srcRC.Read(mv.fns.read)
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			return false, d.src.SetReadDeadline(time.Time{}) // idle: park
		case err != nil:
			return false, err
		case mv.perr != nil:
			return false, mv.perr
		case mv.rerr != nil:
			return false, mv.rerr
		case mv.n == 0:
			return true, nil
		}
		mv.left = mv.n
		if err := p.flush(mv); err != nil {
			return false, err
		}
	}
}

// flush writes the mv.left bytes waiting in mv.pipe, waiting in Go's
// poller while the destination is full.
func (p *parker) flush(mv *mover) error {
	for mv.left > 0 {
		mv.rerr = nil
		if err := mv.d.dstRC.Write(mv.fns.write); err != nil {
			return err
		}
		if mv.rerr != nil {
			return mv.rerr
		}
	}
	return nil
}

// waitFor is how long a direction of ps waits for data in Go's poller
// before parking: as long as the session has lived, at least firstLinger,
// at most parkAfter. A new session's hello/reply exchange does not keep
// goroutines for a whole parkAfter (a reconnect storm would pile up their
// stacks), while a chatty session soon waits the full parkAfter between
// messages instead of parking after each.
func (p *parker) waitFor(ps *parkedSession, now time.Time) time.Duration {
	return min(p.parkAfter, max(firstLinger, now.Sub(ps.ses.start)))
}

// finish ends a worker's turn; done marks its direction finished (a
// direction that is not done was parked by sleep). The last one out closes
// the session.
func (p *parker) finish(d *parkedDir, done bool) {
	ps := d.ps
	ps.mu.Lock()
	ps.running--
	if done && !d.done {
		d.done = true
		ps.open--
	}
	last := ps.endedLocked()
	ps.mu.Unlock()
	if last {
		p.release(ps)
	}
}

// endedLocked reports, with ps.mu held, whether the session just ended:
// every direction finished and no worker running. It says so only once.
func (ps *parkedSession) endedLocked() bool {
	if ps.open == 0 && ps.running == 0 && !ps.finished {
		ps.finished = true
		return true
	}
	return false
}

// aborted runs after the session's connections were closed by an abort:
// directions parked in epoll will never fire again (closing a descriptor
// removes it from the set), so they are finished here.
func (ps *parkedSession) aborted() {
	p := ps.p
	ps.mu.Lock()
	for i := range ps.dirs {
		d := &ps.dirs[i]
		if d.parked {
			d.parked = false
			p.parkedDelta(-1)
		}
		if !d.done {
			d.done = true
			ps.open--
		}
	}
	last := ps.endedLocked()
	ps.mu.Unlock()
	if last {
		p.release(ps)
	}
}

func (p *parker) release(ps *parkedSession) {
	if ps.dirs[0].slot != 0 || ps.dirs[1].slot != 0 {
		p.mu.Lock()
		for i := range ps.dirs {
			if d := &ps.dirs[i]; d.slot != 0 {
				p.slots[d.slot] = nil
				p.free = append(p.free, d.slot)
			}
		}
		p.mu.Unlock()
	}
	ps.ses.client.Close()
	ps.ses.gw.Close()
	p.onEnd(ps.ses, ps.dirs[0].bytes, ps.dirs[1].bytes)
}

func (p *parker) getPipe() (*pipePair, error) {
	p.pipeGets.Add(1)
	select {
	case pp := <-p.pipes:
		return pp, nil
	default:
	}
	p.pipesMade.Add(1)
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return nil, err
	}
	// Larger pipes move bulk data in fewer calls; the kernel allocates the
	// pages only while data sits in them.
	_, _ = unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, maxSplice)
	return &pipePair{r: fds[0], w: fds[1]}, nil
}

// putPipe returns an empty pipe to the pool; a pipe that may hold data
// (after an error) is closed instead.
func (p *parker) putPipe(pp *pipePair, empty bool) {
	if empty {
		select {
		case p.pipes <- pp:
			p.armTrim()
			return
		default:
		}
	}
	closePipe(pp)
}

// armTrim schedules a trim of the pipe pool unless one is scheduled.
func (p *parker) armTrim() {
	if !p.trimArmed.Swap(true) {
		gets := p.pipeGets.Load()
		time.AfterFunc(p.parkAfter, func() { p.trim(gets) })
	}
}

// trim closes the pooled pipes if none was taken since the trim was
// scheduled (gets then); pipes still pooled (in use meanwhile, or put back
// since) get another look after parkAfter.
func (p *parker) trim(gets int64) {
	p.trimArmed.Store(false)
	if p.pipeGets.Load() == gets {
		p.drainPipes()
	}
	if len(p.pipes) > 0 {
		p.armTrim()
	}
}

// drainPipes closes every pooled pipe.
func (p *parker) drainPipes() {
	for {
		select {
		case pp := <-p.pipes:
			closePipe(pp)
		default:
			return
		}
	}
}

// pooledPipes is the number of free pipes kept now (for tests).
func (p *parker) pooledPipes() int { return len(p.pipes) }

func closePipe(pp *pipePair) {
	unix.Close(pp.r)
	unix.Close(pp.w)
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
