package proxy

import (
	"io"
	"testing"
	"time"

	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/pkg/ring"
)

// TestHandlersReused: a handler that finished a connection waits for the
// next one instead of exiting, serves it, and exits after handlerLinger
// with nothing to do.
func TestHandlersReused(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	cfg := DefaultConfig()
	cfg.Park = false
	h := start(t, cfg, ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
	// While reuse is checked the handler waits far longer than a loaded
	// machine can take to see it idle (1 s of real time was missed).
	h.srv.linger.Store(int64(time.Minute))
	session := func() {
		c := dial(t, h.addr)
		defer c.Close()
		if _, err := c.Write(hello(t, "k", "")); err != nil {
			t.Fatal(err)
		}
		if _, _, err := stub.ReadReply(c); err != nil {
			t.Fatal(err)
		}
		_ = c.CloseWrite()
		_, _ = io.ReadAll(c)
	}
	session()
	waitFor(t, func() bool { return h.srv.Active() == 0 && h.srv.idleHandlers.Load() == 1 })
	session()
	waitFor(t, func() bool { return h.srv.Active() == 0 && h.srv.idleHandlers.Load() == 1 })
	if n := h.srv.handlersStarted.Load(); n != 1 {
		t.Fatalf("%d handler goroutines started for two sequential connections, want 1", n)
	}
	// Nothing more to do: with a short linger, the handler that serves a
	// third connection exits after it (real time, bounded by waitFor).
	h.srv.linger.Store(int64(10 * time.Millisecond))
	session()
	waitFor(t, func() bool { return h.srv.Active() == 0 && h.srv.idleHandlers.Load() == 0 })
	if n := h.srv.handlersStarted.Load(); n != 1 {
		t.Fatalf("%d handler goroutines started for three sequential connections, want 1", n)
	}
}
