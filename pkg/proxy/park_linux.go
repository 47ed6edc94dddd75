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
	parkAfter time.Duration
	epfd      int
	wakefd    int // eventfd that stops the loop

	parkedNow atomic.Int64 // directions waiting in the epoll set
	pipesMade atomic.Int64 // pipes created; the pool should keep it flat

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

func newParker(log *zap.Logger, parkAfter time.Duration) (*parker, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, err
	}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wake, &unix.EpollEvent{Events: unix.EPOLLIN}); err != nil {
		unix.Close(epfd)
		unix.Close(wake)
		return nil, err
	}
	p := &parker{log: log, parkAfter: parkAfter, epfd: epfd, wakefd: wake, dirs: map[uint64]*parkedDir{},
		pipes: make(chan *pipePair, pipePool), loopDone: make(chan struct{})}
	go p.loop()
	return p, nil
}

// close stops the event loop; sessions still parked must have been
// aborted first (Server.Shutdown does).
func (p *parker) close() {
	p.closeOnce.Do(func() {
		one := []byte{1, 0, 0, 0, 0, 0, 0, 0}
		_, _ = unix.Write(p.wakefd, one)
		<-p.loopDone
		unix.Close(p.epfd)
		unix.Close(p.wakefd)
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

func (p *parker) loop() {
	defer close(p.loopDone)
	events := make([]unix.EpollEvent, 256)
	for {
		n, err := unix.EpollWait(p.epfd, events, -1)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			p.log.Error("park: epoll_wait failed; parked sessions stall", zap.Error(err))
			return
		}
		for _, ev := range events[:n] {
			id := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			if id == 0 {
				return // woken by close
			}
			p.mu.Lock()
			d := p.dirs[id]
			p.mu.Unlock()
			if d != nil {
				go p.run(d, p.parkAfter)
			}
		}
	}
}

// park takes over a session whose hello was forwarded. It returns false
// (and changes nothing) if the connections are not plain TCP. Otherwise
// the client → gateway direction runs in a new goroutine and run is the
// gateway → client direction's worker, for the caller's goroutine (saving a
// goroutine per session).
func (p *parker) park(ses *session, onDone func(up, down int64)) (run func(), ok bool) {
	cRC, ok1 := rawConn(ses.client)
	gRC, ok2 := rawConn(ses.gw)
	if !ok1 || !ok2 {
		return nil, false
	}
	ps := &parkedSession{ses: ses, onDone: onDone, open: 2}
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
	// Both directions start active, but park after firstLinger without
	// data rather than parkAfter: a short session (or the hello/reply
	// exchange of a long one) never touches the epoll set, and a session
	// that goes quiet right after it gives its goroutines back at once.
	go p.run(ps.dirs[0], firstLinger)
	return func() { p.run(ps.dirs[1], firstLinger) }, true
}

// firstLinger is how long a new session's directions wait for data in Go's
// poller before parking (parkAfter, if shorter).
const firstLinger = 50 * time.Millisecond

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

// run is a direction's worker: started when the session is parked-in and
// for every readiness event after that.
func (p *parker) run(d *parkedDir, linger time.Duration) {
	ps := d.ps
	ps.mu.Lock()
	if d.parked {
		d.parked = false
		p.parkedNow.Add(-1)
	}
	if d.done || ps.finished {
		ps.mu.Unlock()
		return
	}
	ps.running++
	ps.mu.Unlock()

	eof, err := p.serve(d, min(linger, p.parkAfter))
	switch {
	case err != nil || eof:
		reason := "client_error"
		if d == ps.dirs[1] {
			reason = "gateway_error"
		}
		ps.ses.endDirection(d.dst, d.src, err, reason) // an abort marks every direction done
		p.finish(d, true)
	default:
		op := unix.EPOLL_CTL_MOD
		if !d.armed {
			op = unix.EPOLL_CTL_ADD
			p.mu.Lock()
			p.dirs[d.id] = d // before the first arm: its event may come at once
			p.mu.Unlock()
			d.armed = true // in the map from now on; release removes it
		}
		if aerr := p.arm(d, op); aerr != nil {
			// Closed meanwhile (abort or drain): the abort marked it done.
			p.finish(d, true)
			return
		}
		p.finish(d, false)
	}
}

// serve moves data while the direction is active and returns when it has
// been idle for parkAfter (eof and err nil: park it), at EOF, or on error.
//
// Reads happen inside RawConn.Read: a splice that would block releases the
// pipe and lets Go's poller wait for the next byte (Go prepares the wait
// before the first attempt, so no wakeup is lost between the two), bounded
// by a read deadline of parkAfter. That is the same three system calls per
// message as io.Copy's splice path, without holding a pipe while waiting.
func (p *parker) serve(d *parkedDir, linger time.Duration) (eof bool, err error) {
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
	d.left = 0
	d.deadline = time.Now().Add(linger)
	if err := d.src.SetReadDeadline(d.deadline); err != nil {
		return false, err
	}
	for moved := false; ; moved = true {
		// Once data flows, move the idle deadline forward only when half
		// of parkAfter is used up: one timer update per parkAfter/2, not
		// one per message.
		if now := time.Now(); moved && d.deadline.Sub(now) < p.parkAfter/2 {
			d.deadline = now.Add(p.parkAfter)
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
		for d.left = d.n; d.left > 0; {
			if err := d.dstRC.Write(d.wrFn); err != nil {
				return false, err
			}
			if d.rerr != nil {
				return false, d.rerr
			}
		}
	}
}

// finish ends a worker's turn; done marks its direction finished. The last
// one out closes the session.
func (p *parker) finish(d *parkedDir, done bool) {
	ps := d.ps
	ps.mu.Lock()
	ps.running--
	if done && !d.done {
		d.done = true
		ps.open--
	}
	if !done && !d.done {
		d.parked = true
		p.parkedNow.Add(1)
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
			p.parkedNow.Add(-1)
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

// parkedCount is the number of directions parked in the epoll set now.
func (p *parker) parkedCount() int { return int(p.parkedNow.Load()) }

// sessionDirs is the number of directions of live sessions (for tests).
func (p *parker) sessionDirs() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.dirs)
}
