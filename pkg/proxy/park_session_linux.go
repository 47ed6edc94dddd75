//go:build linux

package proxy

import (
	"errors"
	"os"
	"time"
)

// A parked session's state machine. Each of its two directions (client →
// gateway, gateway → client) moves through these states on its own; the
// session ends (onEnd, release) when both are done.
//
//	            adopt
//	              │
//	              ▼
//	   ┌────► claimed ────────────── EOF or error ───────► done
//	   │     (a worker, or the loop      (endDirection:         │
//	   │      moving inline)              half-close or abort)   │
//	   │          │                                             │
//	   │          │ idle for its wait (5 ms .. --park-after)     │
//	   │          ▼                                             │
//	   │       parked ── abort (drain, the other side failed) ──┤
//	   │     (armed once in the                                 │
//	   │      epoll set; no                                     ▼
//	   │      goroutine, no pipe)                 both done: finished
//	   │          │                               (onEnd, slots freed)
//	   └─ wake ───┘
//	   (readiness: claim, then a small message moves inline in the loop
//	    and parks again, anything else gets a worker)
//
// ps.mu guards the transitions; a direction is claimed by one goroutine at
// a time (claim), and only its claimant touches its bytes and mover.

// claim takes a direction out of the parked state for a worker (or the
// loop's inline move), counts it running and gives it a mover; false if
// the session is over.
// During a handoff nothing is claimed: a parked direction woken meanwhile
// stays out of the epoll set (its one-shot event is spent) until the
// handoff resumes it or hands it over.
func (p *parker) claim(d *parkedDir) bool {
	ps := d.ps
	ps.mu.Lock()
	if d.parked {
		d.parked = false
		p.parkedDelta(-1)
	}
	if d.done || ps.finished || ps.handoff.Load() {
		ps.mu.Unlock()
		return false
	}
	ps.running++
	ps.mu.Unlock()
	if d.mv == nil {
		p.getMover(d) // a direction stopped by a failed handoff keeps its mover and pipe
	}
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
	if err != nil && d.ps.handoff.Load() && errors.Is(err, os.ErrDeadlineExceeded) {
		// Stopped for a handoff while the destination was full: the
		// bytes stay in the pipe, which goes along with the session.
		if d.mv.left == 0 {
			p.putMover(d)
		}
		p.finish(d, false)
		return
	}
	p.putMover(d)
	if err != nil || eof {
		d.ps.ses.endDirection(d.dst, d.src, err, d.reason()) // an abort marks every direction done
		p.finish(d, true)
		return
	}
	p.parkDir(d)
	p.finish(d, false)
}

// reason labels a session that ends because this direction failed.
func (d *parkedDir) reason() endReason {
	if d == &d.ps.dirs[1] {
		return endGatewayError
	}
	return endClientError
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
	if ps.running == 0 && ps.quiet != nil {
		close(ps.quiet) // a handoff waits for this
		ps.quiet = nil
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
	p.freeSlots(ps)
	if !ps.ses.aborted.Load() { // an abort closed both already
		ps.ses.client.Close()
		ps.ses.gw.Close()
	}
	p.onEnd(ps.ses, ps.dirs[0].bytes, ps.dirs[1].bytes)
}
