//go:build linux

package proxy

import (
	"errors"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-proxy/tether/internal/sock"
)

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
		mv.n, mv.rerr = spliceNow(int(fd), mv.pipe.w, maxSplice)
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

// writeOnce is the RawConn.Write callback: move the pipe's bytes to the
// socket, maxWrite per splice, until the pipe is empty, the socket is full
// or the write fails; on would-block let Go's poller wait for the peer to
// drain.
func (mv *mover) writeOnce(fd uintptr) bool {
	if !mv.d.lowat && mv.left >= streamAt {
		_ = sock.SetNotSentLowat(int(fd), notSentLowat) // a hint: a failure changes nothing else
		mv.d.lowat = true
	}
	var moved int64
	mv.rerr = nil
	for mv.left > 0 {
		m, err := spliceNow(mv.pipe.r, int(fd), int(min(mv.left, maxWrite)))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if m == 0 && err == nil {
			err = io.ErrNoProgress // the pipe held less than mv.left says: never loop on it
		}
		if err != nil {
			mv.rerr = err
			break
		}
		mv.left -= m
		moved += m
	}
	mv.d.bytes += moved
	mv.d.meter.Add(moved)
	return !errors.Is(mv.rerr, unix.EAGAIN)
}

// writeNow is the loop's RawConn.Control callback: write until the pipe is
// empty, the socket is full (EAGAIN) or the write fails; never wait.
func (mv *mover) writeNow(fd uintptr) {
	mv.writeOnce(fd)
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
		return srcError{mv.rerr}
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
	// A handoff sets its flag, then moves the deadline into the past; a
	// deadline set here before that is overridden, one set after it is
	// caught by this check (both are sequentially consistent).
	if d.ps.handoff.Load() {
		return false, nil
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
				if d.ps.handoff.Load() {
					return false, nil
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
			return false, srcError{mv.rerr}
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

// spliceNow moves up to n bytes from in to out without waiting (both ends
// are non-blocking). It is a raw system call: the kernel's work is CPU work
// that never sleeps, so the goroutine keeps its P, and Go's sysmon neither
// hands the P to another thread while the call runs nor wakes every 20 µs
// to look (which the scheduler otherwise does when a program spends most
// of its time in short system calls).
func spliceNow(in, out, n int) (int64, error) {
	r, _, e := unix.RawSyscall6(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(n), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
	if e != 0 {
		return int64(r), e
	}
	return int64(r), nil
}
