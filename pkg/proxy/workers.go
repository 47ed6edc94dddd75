package proxy

import (
	"net"
	"time"
)

// Handler goroutines are reused. A new connection's handler grows its
// stack on the way through the handshake and the dial (Go's connect path
// is deep), and a fresh goroutine per connection paid for that copy every
// time: 7% of the CPU of a connection-rate benchmark. A handler that is
// done waits a moment for the next job instead of exiting. Jobs are new
// connections and the parker's direction workers (a session's gateway →
// client direction, a wakeup the epoll loop hands on).
const (
	// maxIdleHandlers bounds the handlers waiting for work.
	maxIdleHandlers = 128
	// handlerLinger is how long an idle handler waits before it exits,
	// so an idle proxy holds none.
	handlerLinger = time.Second
)

// job is one piece of work for a handler: a new connection, a parked
// direction to run (claimed: the caller already claimed it), or the rest of
// a connection the event loop started (fn).
type job struct {
	c       net.Conn
	d       *parkedDir
	claimed bool
	fn      func()
}

func (s *Server) run(j job) {
	switch {
	case j.fn != nil:
		j.fn()
	case j.c != nil:
		s.handle(j.c)
	case j.claimed:
		s.parker.work(j.d)
	default:
		s.parker.run(j.d)
	}
}

// dispatch gives c to an idle handler, or starts one.
func (s *Server) dispatch(c net.Conn) { s.dispatchJob(job{c: c}) }

// dispatchDir runs a parked direction on a handler (the parker's spawn).
func (s *Server) dispatchDir(d *parkedDir, claimed bool) { s.dispatchJob(job{d: d, claimed: claimed}) }

// dispatchJob gives j to an idle handler, or starts one; it never blocks
// (the parker's epoll loop calls it).
func (s *Server) dispatchJob(j job) {
	select {
	case s.next <- j:
	default:
		s.handlersStarted.Add(1)
		go s.handler(j)
	}
}

// handler runs j, then further jobs dispatchJob hands it, until it has
// waited its linger (handlerLinger) for one, there are enough idle handlers, or the
// server closes.
func (s *Server) handler(j job) {
	var t *time.Timer
	for {
		s.run(j)
		if s.idleHandlers.Add(1) > maxIdleHandlers {
			s.idleHandlers.Add(-1)
			return
		}
		linger := time.Duration(s.linger.Load())
		if t == nil {
			t = time.NewTimer(linger)
		} else {
			t.Reset(linger)
		}
		select {
		case j = <-s.next:
			s.idleHandlers.Add(-1)
			t.Stop() // Go 1.23 timers: no stale tick after Stop or Reset
			continue
		case <-t.C:
		case <-s.ctx.Done():
		}
		s.idleHandlers.Add(-1)
		return
	}
}
