//go:build linux

package proxy

import (
	"errors"
	"net"
	"os"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/tether-proxy/tether/internal/sock"
)

// run is the loop: it waits in Go's poller until the epoll set has
// events, then takes them all without blocking and wakes each direction.
func (l *evloop) run() {
	p := l.p
	defer close(l.done)
	defer p.stopOnce.Do(func() { close(p.stopped) })
	events := make([]unix.EpollEvent, 256)
	var werr error
	drain := func(fd uintptr) bool {
		for {
			n, err := sock.EpollWaitNow(int(fd), events)
			if err != nil {
				if errors.Is(err, unix.EINTR) {
					continue
				}
				werr = err
				return true
			}
			now := p.now().UnixNano()
			for _, ev := range events[:n] {
				if slot := uint32(ev.Fd); slot&frontBit != 0 {
					l.front.event(slot&^frontBit, uint32(ev.Pad), ev.Events)
				} else if d := p.lookup(slot, uint32(ev.Pad)); d != nil {
					p.wake(d, ev.Events, now)
				}
			}
			if l.front != nil {
				l.front.tick()
			}
			if n < len(events) {
				// Drained: the poller is edge-triggered on the set,
				// so wait for the next event to arrive.
				return false
			}
		}
	}
	err := l.epRC.Read(drain)
	switch {
	case werr != nil:
		p.log.Error("park: epoll_wait failed; parked sessions stall", zap.Error(werr))
	case err != nil && !errors.Is(err, os.ErrClosed) && !p.closing.Load():
		p.log.Error("park: waiting for parked sessions failed; they stall", zap.Error(err))
	}
	if l.front != nil {
		l.front.abandon() // nothing would finish the handshakes it holds
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

// arm (re)registers a direction's source for one readiness event. The
// source is held open during the epoll_ctl (Hold, or inside its RawConn's
// Control), so its number cannot be reused under the call.
func (p *parker) arm(d *parkedDir, op int) error {
	ev := unix.EpollEvent{
		Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT,
		Fd:     int32(d.slot),
		Pad:    int32(d.gen),
	}
	if c, ok := d.src.(*sock.Conn); ok {
		if fd, ok := c.Hold(); ok {
			err := d.ps.l.ctl(op, fd, &ev)
			c.Unhold()
			return err
		}
	}
	return armRaw(d, op, ev)
}

// armRaw is arm for a source that cannot be held: inside its RawConn's
// Control (a separate function so only this path pays for the closure).
func armRaw(d *parkedDir, op int, ev unix.EpollEvent) error {
	var err error
	if cerr := d.srcRC.Control(func(fd uintptr) { err = d.ps.l.ctl(op, int(fd), &ev) }); cerr != nil {
		return cerr
	}
	return err
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
	inline := d.ps.inline
	if !inline && (events&unix.EPOLLIN == 0 || events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 ||
		time.Duration(now-d.parkedAt) < p.parkAfter) {
		p.wakesWorker.Inc()
		p.spawn(d, true)
		return
	}
	mv := d.mv
	err := p.moveOnce(d)
	switch {
	case err != nil:
		p.putMover(d)
		d.ps.ses.endDirection(d.dst, d.src, err, d.reason())
		p.finish(d, true)
	case inline && mv.eof && mv.left == 0:
		// EOF with nothing left to pass on: the half-close, here.
		p.wakesInline.Inc()
		p.putMover(d)
		d.ps.ses.endDirection(d.dst, d.src, nil, d.reason())
		p.finish(d, true)
	case mv.left == 0 && !mv.eof && mv.n < inlineMax:
		// Moved (or, if the event raced a read, found nothing): park again.
		p.wakesInline.Inc()
		p.putMover(d)
		p.parkDir(d)
		p.finish(d, false)
	default:
		// EOF, a stream, or a destination that is full: the worker
		// flushes what is left and carries on.
		p.wakesWorker.Inc()
		p.spawn(d, true)
	}
}

// parkDir parks a direction whose worker is about to end: it is marked parked
// and armed for one readiness event, which wakes it again (maybe before
// this worker has returned). If epoll refuses the socket the session is
// aborted, since nothing would ever wake the direction.
func (p *parker) parkDir(d *parkedDir) {
	ps := d.ps
	d.parkedAt = p.now().UnixNano()
	ps.mu.Lock()
	if ps.handoff.Load() {
		// A handoff is under way: the direction stops here, unarmed,
		// and the handoff passes it on (or resumes it).
		ps.mu.Unlock()
		return
	}
	d.parked = true
	p.parkedDelta(1)
	ps.mu.Unlock()
	if d.slot == 0 {
		p.addSlot(d) // before the first arm: its event may come at once
	}
	op := unix.EPOLL_CTL_MOD // the front may have registered the socket already
	if !d.armed {
		op = unix.EPOLL_CTL_ADD
		d.armed = true // before the arm: the direction is not ours after it
	}
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
