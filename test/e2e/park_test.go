//go:build e2e

package e2e

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"testing"
	"time"
)

// TestIdleSessionsParked: through the real binaries, 500 idle sessions cost
// the proxy exactly their two sockets each (no goroutine, no pipe), every
// one still echoes after idling (the epoll loop moves the message itself),
// and SIGTERM's drain timeout closes them all and the proxy exits 0.
func TestIdleSessionsParked(t *testing.T) {
	const n = 500
	const drain = time.Second
	gw := gatewayStub(t, 1, 0)
	p := proxyFor(t, []*proc{gw}, "--park-after", "200ms", "--drain-timeout", drain.String())
	_, baseFD := fdCounts(t, p)
	baseG := metrics(t, p)["go_goroutines"]
	conns := holdSessions(t, p.addr, "idle", n)

	var m map[string]float64
	var fds int
	// Handlers that served the handshakes wait a second for more
	// connections before they exit; then nothing but the sessions' two
	// sockets each is left.
	waitFor(t, 15*time.Second, "every session parked, the pipe pool trimmed and idle handlers gone", func() bool {
		m = metrics(t, p)
		_, fds = fdCounts(t, p)
		return m["tether_parked_directions"] == 2*n && fds == baseFD+2*n && m["go_goroutines"] <= baseG+20
	}, func() string {
		return fmt.Sprintf("parked directions %v, descriptors %d (base %d), goroutines %v (base %v)", m["tether_parked_directions"], fds, baseFD, m["go_goroutines"], baseG)
	})

	for i, c := range conns {
		msg := []byte(fmt.Sprintf("wake-%03d", i))
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write(msg); err != nil {
			t.Fatalf("session %d: %v", i, err)
		}
		buf := make([]byte, len(msg))
		if _, err := readFull(c, buf); err != nil || string(buf) != string(msg) {
			t.Fatalf("session %d echoed %q, %v", i, buf, err)
		}
	}
	m = metrics(t, p)
	inline, worker := m[`tether_park_wakeups_total{path="inline"}`], m[`tether_park_wakeups_total{path="worker"}`]
	if inline == 0 {
		t.Fatalf("no wakeup moved inline (worker %v)", worker)
	}
	t.Logf("%d idle sessions: +%d descriptors, %v goroutines (base %v); echo wakeups: %v inline, %v by a worker",
		n, fds-baseFD, m["go_goroutines"], baseG, inline, worker)

	sigAt := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := p.exitCode(drain + 10*time.Second); code != 0 {
		t.Fatalf("exit code %d", code)
	}
	// Idle sessions never end on their own: the proxy waits the whole
	// drain timeout, then closes them.
	if took := time.Since(sigAt); took < drain-100*time.Millisecond {
		t.Fatalf("proxy exited %v after SIGTERM, before the %v drain timeout", took, drain)
	}
	for i, c := range conns {
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("session %d still open after the drain: %v", i, err)
		}
	}
}
