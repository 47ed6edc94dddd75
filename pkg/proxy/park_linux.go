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

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// parker holds spliced sessions while they are idle without a goroutine or
// a pipe. Each direction has a worker goroutine while it is active: it
// moves what arrives with splice(2) through a pooled pipe (taken only while
// bytes are in it) and waits for more in Go's poller. After parkAfter
// without data the worker exits and the direction's source socket is armed
// in the parker's own epoll set (one-shot); the next byte, EOF or error
// starts a new worker. Go's io.Copy splice path instead keeps a
// goroutine and a pipe (two descriptors) per direction blocked for the
// session's whole life; on a fleet of mostly idle mobile sessions that is
// most of the cost (docs/BENCHMARKS.md).
type parker struct {
	log       *zap.Logger
	m         *Metrics
	parkAfter time.Duration
	epfd      int
	ep        *os.File // epfd in Go's poller: parked wakeups need no thread of their own

	parkedNow atomic.Int64 // directions waiting in the epoll set
	pipesMade atomic.Int64 // pipes created; the pool should keep it flat

	// Wakeups served in the loop, and those it handed to a worker after
	// reading (for tests).
	wakesInline, wakesHandedOff atomic.Int64

	mu     sync.Mutex
	dirs   map[uint64]*parkedDir // parked-at-least-once directions, by epoll ID
	nextID atomic.Uint64
	pipes  chan *pipePair // free pipes

	closeOnce sync.Once
	loopDone  chan struct{}
}

// maxSplice is the most one splice call moves; pipes are sized to it.
const maxSplice = 1 << 20

// pipePool bounds the free pipes kept; pipes exist only while data moves.
const pipePool = 64

type pipePair struct{ r, w int }

// parkedSession tracks the two directions of one session.
type parkedSession struct {
	ses    *session
	onDone func(up, down int64)
	dirs   [2]*parkedDir
	start  time.Time // when the parker took the session over

	mu       sync.Mutex
	open     int  // directions not finished
	running  int  // workers moving data now
	finished bool // onDone called
}

// parkedDir is one direction: bytes from src to dst.
type parkedDir struct {
	ps       *parkedSession
	id       uint64
	src, dst net.Conn
	srcRC    syscall.RawConn
	dstRC    syscall.RawConn
	done     bool  // EOF or error seen; guarded by ps.mu
	parked   bool  // waiting in the epoll set; guarded by ps.mu
	bytes    int64 // moved so far; only the running worker touches it
	armed    bool  // in the dispatch map and the epoll set; only the running worker touches it
	eof      bool  // the source's EOF was read (by the loop) but not yet acted on
	parkedAt time.Time

	// State of the running worker's current read and write, kept here
	// (not in closures) so the callbacks handed to RawConn allocate
	// nothing per message.
	p            *parker
	pipe         *pipePair
	n, left      int64
	rerr, perr   error
	deadline     time.Time
	readFn, wrFn func(fd uintptr) bool
}

// readOnce is the RawConn.Read callback: splice what the socket has into
// the pipe; on would-block give the pipe back and let Go's poller wait.
func (d *parkedDir) readOnce(fd uintptr) bool {
	if d.pipe == nil {
		if d.pipe, d.perr = d.p.getPipe(); d.perr != nil {
			return true
		}
	}
	for {
		d.n, d.rerr = unix.Splice(int(fd), nil, d.pipe.w, nil, maxSplice, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		if !errors.Is(d.rerr, unix.EINTR) {
			break
		}
	}
	if errors.Is(d.rerr, unix.EAGAIN) {
		d.p.putPipe(d.pipe, true) // empty: nothing was read
		d.pipe = nil
		return false // wait for data, EOF or the deadline
	}
	return true
}

// writeOnce is the RawConn.Write callback: move pipe bytes to the socket;
// on would-block let Go's poller wait for the peer to drain.
func (d *parkedDir) writeOnce(fd uintptr) bool {
	var m int64
	for {
		m, d.rerr = unix.Splice(d.pipe.r, nil, int(fd), nil, int(d.left), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		if !errors.Is(d.rerr, unix.EINTR) {
			break
		}
	}
	if d.rerr == nil {
		d.left -= m
		d.bytes += m
	}
	return !errors.Is(d.rerr, unix.EAGAIN)
}

func newParker(log *zap.Logger, m *Metrics, parkAfter time.Duration) (*parker, error) {
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
	p := &parker{log: log, m: m, parkAfter: parkAfter, epfd: epfd, ep: ep, dirs: map[uint64]*parkedDir{},
		pipes: make(chan *pipePair, pipePool), loopDone: make(chan struct{})}
	go p.loop(rc)
	return p, nil
}

// close stops the event loop; sessions still parked must have been
// aborted first (Server.Shutdown does).
func (p *parker) close() {
	p.closeOnce.Do(func() {
		p.ep.Close() // wakes the loop with an error; the descriptor closes once it is out
		<-p.loopDone
		for {
			select {
			case pp := <-p.pipes:
				closePipe(pp)
			default:
				return
			}
		}
	})
}

// loop waits in Go's poller until the epoll set has events, then takes
// them all without blocking and starts a worker for each.
func (p *parker) loop(rc syscall.RawConn) {
	defer close(p.loopDone)
	events := make([]unix.EpollEvent, 256)
	var werr error
	drain := func(fd uintptr) bool {
		for {
			n, err := unix.EpollWait(int(fd), events, 0)
			now := time.Now()
			if err != nil {
				if errors.Is(err, unix.EINTR) {
					continue
				}
				werr = err
				return true
			}
			for _, ev := range events[:n] {
				id := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
				p.mu.Lock()
				d := p.dirs[id]
				p.mu.Unlock()
				if d != nil {
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
	case err != nil && !errors.Is(err, os.ErrClosed):
		p.log.Error("park: waiting for parked sessions failed; they stall", zap.Error(err))
	}
}

// park takes over a session whose hello was forwarded. It returns false
// (and changes nothing) if the connections are not plain TCP; otherwise
// the session belongs to the parker, which calls onDone when it ends.
func (p *parker) park(ses *session, onDone func(up, down int64)) bool {
	cRC, ok1 := rawConn(ses.client)
	gRC, ok2 := rawConn(ses.gw)
	if !ok1 || !ok2 {
		return false
	}
	ps := &parkedSession{ses: ses, onDone: onDone, open: 2, start: time.Now()}
	for i, pair := range [2][2]net.Conn{{ses.client, ses.gw}, {ses.gw, ses.client}} {
		// IDs are never 0 (the wake eventfd's); a direction enters the
		// dispatch map only when it first parks, so short sessions never
		// take the parker's lock.
		d := &parkedDir{ps: ps, id: p.nextID.Add(1), src: pair[0], dst: pair[1], p: p}
		d.readFn, d.wrFn = d.readOnce, d.writeOnce
		d.srcRC, d.dstRC = cRC, gRC
		if i == 1 {
			d.srcRC, d.dstRC = gRC, cRC
		}
		ps.dirs[i] = d
	}
	ses.onAbort = func() { p.aborted(ps) }
	// Each direction starts in a fresh goroutine (the handler's, whose
	// stack grew during the handshake and dial, ends now) and waits
	// firstLinger in Go's poller before parking: a short session or the
	// hello/reply exchange of a long one never touches the epoll set, and
	// a reconnect storm holds few goroutine stacks at a time.
	go p.run(ps.dirs[0])
	go p.run(ps.dirs[1])
	return true
}

// firstLinger is how long a new session's directions wait for data in Go's
// poller before parking (parkAfter, if shorter). Parking a direction
// outright costs a connection-rate benchmark about 7% (an epoll_ctl and a
// wakeup through the epoll set for the close that follows).
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
		Fd:     int32(uint32(d.id)),
		Pad:    int32(uint32(d.id >> 32)),
	}
	var err error
	cerr := d.srcRC.Control(func(fd uintptr) { err = unix.EpollCtl(p.epfd, op, int(fd), &ev) })
	return errors.Join(cerr, err)
}

// claim takes a direction out of the parked state for a worker (or the
// loop's inline move) and counts it running; false if the session is over.
func (p *parker) claim(d *parkedDir) bool {
	ps := d.ps
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if d.parked {
		d.parked = false
		p.parkedDelta(-1)
	}
	if d.done || ps.finished {
		return false
	}
	ps.running++
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
	if err != nil || eof {
		d.ps.ses.endDirection(d.dst, d.src, err, d.reason()) // an abort marks every direction done
		p.finish(d, true)
		return
	}
	p.sleep(d)
	p.finish(d, false)
}

// reason labels a session that ends because this direction failed.
func (d *parkedDir) reason() string {
	if d == d.ps.dirs[1] {
		return "gateway_error"
	}
	return "client_error"
}

// inlineMax is the most a wakeup moves in the loop itself; a direction
// that brings more is streaming and gets a worker.
const inlineMax = 64 << 10

// wake handles a readiness event of a parked direction, in the loop's
// goroutine. A direction quiet for parkAfter that brings a small message
// (a heartbeat, a push) is served right here: two non-blocking splices and
// a re-arm, no goroutine, which is what keeps the first message after a
// long idle as fast as on an unparked session. Everything else — a
// chatty or streaming direction, EOF, a hangup, a destination that cannot
// take the bytes now — goes to a worker goroutine, so the loop never
// blocks and busy sessions keep their own goroutines.
func (p *parker) wake(d *parkedDir, events uint32, now time.Time) {
	if !p.claim(d) {
		return
	}
	if events&unix.EPOLLIN == 0 || events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 ||
		now.Sub(d.parkedAt) < p.parkAfter {
		go p.work(d)
		return
	}
	n, err := p.moveOnce(d)
	switch {
	case err != nil:
		p.putPipe(d.pipe, d.left == 0)
		d.pipe = nil
		d.ps.ses.endDirection(d.dst, d.src, err, d.reason())
		p.finish(d, true)
	case d.left == 0 && !d.eof && n < inlineMax:
		// Moved (or, if the event raced a read, found nothing): park again.
		p.wakesInline.Add(1)
		p.putPipe(d.pipe, true)
		d.pipe = nil
		p.sleep(d)
		p.finish(d, false)
	default:
		// EOF, a stream, or a destination that is full: the worker
		// flushes what is left and carries on.
		p.wakesHandedOff.Add(1)
		go p.work(d)
	}
}

// moveOnce is the loop's non-blocking move: one splice from the source
// into a pipe and as much of it to the destination as it takes now. It
// returns the bytes read (0 with d.eof set at EOF; 0 if nothing was
// there); bytes the destination did not take stay in d.pipe (d.left).
func (p *parker) moveOnce(d *parkedDir) (int64, error) {
	var err error
	if d.pipe, err = p.getPipe(); err != nil {
		return 0, err
	}
	d.n, d.rerr = 0, nil
	if cerr := d.srcRC.Control(func(fd uintptr) {
		for {
			d.n, d.rerr = unix.Splice(int(fd), nil, d.pipe.w, nil, maxSplice, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			if !errors.Is(d.rerr, unix.EINTR) {
				return
			}
		}
	}); cerr != nil {
		return 0, cerr
	}
	switch {
	case errors.Is(d.rerr, unix.EAGAIN):
		return 0, nil
	case d.rerr != nil:
		return 0, d.rerr
	case d.n == 0:
		d.eof = true
		return 0, nil
	}
	d.left = d.n
	if cerr := d.dstRC.Control(func(fd uintptr) {
		// Until it is all out, the socket is full (EAGAIN) or fails.
		for d.left > 0 && d.writeOnce(fd) && d.rerr == nil {
		}
	}); cerr != nil {
		return d.n, cerr
	}
	if d.rerr != nil && !errors.Is(d.rerr, unix.EAGAIN) {
		return d.n, d.rerr
	}
	return d.n, nil
}

// sleep parks a direction whose worker is about to end: it is marked parked
// and armed for one readiness event, which starts the next worker (maybe
// before this one has returned). If epoll refuses the socket the session
// is aborted, since nothing would ever wake the direction.
func (p *parker) sleep(d *parkedDir) {
	ps := d.ps
	op := unix.EPOLL_CTL_MOD
	if !d.armed {
		op = unix.EPOLL_CTL_ADD
		p.mu.Lock()
		p.dirs[d.id] = d // before the first arm: its event may come at once
		p.mu.Unlock()
		d.armed = true // in the map from now on; release removes it
	}
	d.parkedAt = time.Now()
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
		ps.ses.abort("park_error")
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
	defer func() {
		if d.pipe != nil {
			// Every read is written out before the next one, so the
			// pipe holds data only if a write failed: a reset client
			// (most short sessions end that way) gives back an empty
			// pipe for reuse.
			p.putPipe(d.pipe, d.left == 0)
			d.pipe = nil
		}
	}()
	if d.eof {
		d.eof = false
		return true, nil
	}
	if err := p.flush(d); err != nil {
		return false, err
	}
	now := time.Now()
	wait := p.waitFor(d.ps, now)
	d.deadline = now.Add(wait)
	if err := d.src.SetReadDeadline(d.deadline); err != nil {
		return false, err
	}
	for moved := false; ; moved = true {
		// Once data flows, move the idle deadline forward only when half
		// of the wait is used up: one timer update per wait/2, not one
		// per message.
		if moved {
			now = time.Now()
		}
		if moved && d.deadline.Sub(now) < wait/2 {
			wait = p.waitFor(d.ps, now)
			d.deadline = now.Add(wait)
			if err := d.src.SetReadDeadline(d.deadline); err != nil {
				return false, err
			}
		}
		d.n, d.rerr, d.perr = 0, nil, nil
		err := d.srcRC.Read(d.readFn)
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			return false, d.src.SetReadDeadline(time.Time{}) // idle: park
		case err != nil:
			return false, err
		case d.perr != nil:
			return false, d.perr
		case d.rerr != nil:
			return false, d.rerr
		case d.n == 0:
			return true, nil
		}
		d.left = d.n
		if err := p.flush(d); err != nil {
			return false, err
		}
	}
}

// flush writes the d.left bytes waiting in d.pipe, waiting in Go's poller
// while the destination is full.
func (p *parker) flush(d *parkedDir) error {
	for d.left > 0 {
		d.rerr = nil
		if err := d.dstRC.Write(d.wrFn); err != nil {
			return err
		}
		if d.rerr != nil {
			return d.rerr
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
	return min(p.parkAfter, max(firstLinger, now.Sub(ps.start)))
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
func (p *parker) aborted(ps *parkedSession) {
	ps.mu.Lock()
	for _, d := range ps.dirs {
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
	if ps.dirs[0].armed || ps.dirs[1].armed {
		p.mu.Lock()
		for _, d := range ps.dirs {
			delete(p.dirs, d.id)
		}
		p.mu.Unlock()
	}
	ps.ses.client.Close()
	ps.ses.gw.Close()
	ps.onDone(ps.dirs[0].bytes, ps.dirs[1].bytes)
}

func (p *parker) getPipe() (*pipePair, error) {
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
			return
		default:
		}
	}
	closePipe(pp)
}

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

// sessionDirs is the number of directions of live sessions (for tests).
func (p *parker) sessionDirs() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.dirs)
}
