package proxy

import (
	"net"
	"time"
)

// Handler goroutines are reused. A new connection's handler grows its
// stack on the way through the handshake and the dial (Go's connect path
// is deep), and a fresh goroutine per connection paid for that copy every
// time: 7% of the CPU of a connection-rate benchmark. A handler that is
// done waits a moment for the next connection instead of exiting.
const (
	// maxIdleHandlers bounds the handlers waiting for work.
	maxIdleHandlers = 128
	// handlerLinger is how long an idle handler waits before it exits,
	// so an idle proxy holds none.
	handlerLinger = time.Second
)

// dispatch gives c to an idle handler, or starts one.
func (s *Server) dispatch(c net.Conn) {
	select {
	case s.next <- c:
	default:
		s.handlersStarted.Add(1)
		go s.handler(c)
	}
}

// handler serves c, then further connections dispatch hands it, until it
// has waited handlerLinger for one, there are enough idle handlers, or the
// server closes.
func (s *Server) handler(c net.Conn) {
	var t *time.Timer
	for {
		s.handle(c)
		if s.idleHandlers.Add(1) > maxIdleHandlers {
			s.idleHandlers.Add(-1)
			return
		}
		if t == nil {
			t = time.NewTimer(handlerLinger)
		} else {
			t.Reset(handlerLinger)
		}
		select {
		case c = <-s.next:
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
