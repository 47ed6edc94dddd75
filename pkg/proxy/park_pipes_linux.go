//go:build linux

package proxy

import (
	"time"

	"golang.org/x/sys/unix"
)

// pipePool bounds the free pipes kept; pipes exist only while data moves
// (the pool is emptied when moves stop: trim).
const pipePool = 64

type pipePair struct{ r, w int }

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
