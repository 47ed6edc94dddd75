//go:build linux

package proxy

import (
	"context"
	"errors"
	"time"

	"golang.org/x/sys/unix"
)

// Handing a parked session to another process (handoff.go has the
// Server's side). A session can move only while nothing moves in it:
//
//	stop     handoff set; directions with a worker are woken (deadlines in
//	         the past) and stop at their next wait instead of waiting or
//	         parking; a parked one woken meanwhile is not claimed.
//	quiet    no worker left: each direction is done, parked (armed in the
//	         epoll set) or stopped, maybe with bytes in its pipe that the
//	         destination had no room for.
//	export   its state and descriptors are read (handedState).
//	commit   the other process has them: the epoll entries go, this
//	         process's descriptors close (no shutdown, no reset: the
//	         sockets live on over there) and the session is forgotten.
//	resume   or the other process failed: the stopped directions get
//	         their workers back and the session carries on here.

// pastDeadline wakes a worker waiting in Go's poller at once.
var pastDeadline = time.Unix(1, 0)

// stop asks ps to stop moving for a handoff. It returns the channel that
// is closed once no worker runs, or nil if the session already ended.
func (p *parker) stop(ps *parkedSession) <-chan struct{} {
	ps.mu.Lock()
	if ps.finished {
		ps.mu.Unlock()
		return nil
	}
	ps.handoff.Store(true)
	quiet := make(chan struct{})
	if ps.running == 0 {
		close(quiet)
		ps.mu.Unlock()
		return quiet
	}
	ps.quiet = quiet
	ps.poked = true
	ps.mu.Unlock()
	// After the flag: a worker that sets its deadline after this sees
	// the flag, one that set it before has it overridden here.
	for _, c := range [2]interface{ SetDeadline(time.Time) error }{rawTCP(ps.ses.client), rawTCP(ps.ses.gw)} {
		_ = c.SetDeadline(pastDeadline)
	}
	return quiet
}

// waitQuiet waits for the channels of stop until ctx is done.
func waitQuiet(ctx context.Context, quiet []<-chan struct{}) error {
	for _, q := range quiet {
		if q == nil {
			continue
		}
		select {
		case <-q:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// handedState reads a stopped session's directions: bytes moved, done, and
// the pipe and byte count of a direction stopped with bytes in flight. ok
// is false if the session ended meanwhile.
func (p *parker) handedState(ps *parkedSession) (dirs [2]DirState, pipes [2]*pipePair, ok bool) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if ps.finished || ps.running != 0 {
		return dirs, pipes, false
	}
	for i := range ps.dirs {
		d := &ps.dirs[i]
		dirs[i] = DirState{Bytes: d.bytes, Done: d.done}
		if mv := d.mv; mv != nil && mv.left > 0 && !d.done {
			dirs[i].Pending = mv.left
			pipes[i] = mv.pipe
		}
	}
	return dirs, pipes, true
}

// commit forgets a session the other process took: its epoll entries go,
// its descriptors here close, and the session is finished without onEnd.
// The caller closes the connections afterwards.
func (p *parker) commit(ps *parkedSession) {
	ps.mu.Lock()
	ps.finished = true
	for i := range ps.dirs {
		d := &ps.dirs[i]
		if d.parked {
			d.parked = false
			p.parkedDelta(-1)
		}
	}
	ps.mu.Unlock()
	for i := range ps.dirs {
		d := &ps.dirs[i]
		if d.armed {
			// The socket lives on in the other process: without this
			// the entry would outlive this descriptor.
			_ = d.srcRC.Control(func(fd uintptr) { _ = ps.l.ctl(unix.EPOLL_CTL_DEL, int(fd), nil) })
			d.armed = false
		}
		if mv := d.mv; mv != nil {
			if mv.pipe != nil {
				closePipe(mv.pipe) // the other process has its copy and the bytes
				mv.pipe = nil
			}
			mv.left = 0
			p.putMover(d)
		}
	}
	p.freeSlots(ps)
}

// resume gives a stopped session back its workers after a failed handoff.
func (p *parker) resume(ps *parkedSession) {
	var run []*parkedDir
	ps.mu.Lock()
	ps.handoff.Store(false)
	poked := ps.poked
	ps.poked = false
	if !ps.finished {
		for i := range ps.dirs {
			// Parked ones are still armed; the others (stopped, or
			// woken while stopped) need a worker.
			if d := &ps.dirs[i]; !d.done && !d.parked {
				ps.running++
				run = append(run, d)
			}
		}
	}
	ps.mu.Unlock()
	if poked {
		_ = rawTCP(ps.ses.client).SetDeadline(time.Time{})
		_ = rawTCP(ps.ses.gw).SetDeadline(time.Time{})
	}
	for _, d := range run {
		if d.mv == nil {
			p.getMover(d)
		}
		p.spawn(d, true)
	}
}

// adoptHanded takes over a session handed from another process: done
// directions stay done, one with bytes in flight gets a worker that writes
// them first, the others park at once (an idle session costs no goroutine
// here either; one with data waiting wakes right away).
func (p *parker) adoptHanded(ses *session, dirs [2]DirState, pipes [2]*pipePair) error {
	cRC, ok1 := rawConn(ses.client)
	gRC, ok2 := rawConn(ses.gw)
	if !ok1 || !ok2 {
		return errors.New("handed session is not plain TCP")
	}
	ps := &parkedSession{p: p, l: p.pick(), ses: ses}
	ps.dirs[0] = parkedDir{ps: ps, src: ses.client, dst: ses.gw, srcRC: cRC, dstRC: gRC, meter: &ses.moved[dirUp]}
	ps.dirs[1] = parkedDir{ps: ps, src: ses.gw, dst: ses.client, srcRC: gRC, dstRC: cRC, meter: &ses.moved[dirDown]}
	var live []*parkedDir
	for i := range ps.dirs {
		d := &ps.dirs[i]
		d.bytes, d.done = dirs[i].Bytes, dirs[i].Done
		if !d.done {
			ps.open++
			live = append(live, d)
		}
	}
	ses.parked.Store(ps)
	// Every live direction counts as claimed until it is parked or has
	// its worker, so no early end sees a half-built session.
	ps.running = int8(len(live))
	if len(live) == 0 {
		ps.running = 1
		p.finish(&ps.dirs[0], true) // both ends were done: just close
		return nil
	}
	for _, d := range live {
		i := 0
		if d == &ps.dirs[1] {
			i = 1
		}
		if pipes[i] != nil {
			mv := p.getMover(d)
			mv.pipe, mv.left = pipes[i], dirs[i].Pending
			p.spawn(d, true)
			continue
		}
		p.parkDir(d)
		p.finish(d, false)
	}
	return nil
}

// freeSlots gives the session's epoll slots back.
func (p *parker) freeSlots(ps *parkedSession) {
	if ps.dirs[0].slot == 0 && ps.dirs[1].slot == 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := range ps.dirs {
		if d := &ps.dirs[i]; d.slot != 0 {
			p.slots[d.slot] = nil
			p.free = append(p.free, d.slot)
			d.slot = 0
		}
	}
}
