//go:build linux

package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/tether-proxy/tether/internal/sock"
	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/internal/testenv"
	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route"
)

// pending is how many connections the fronts hold now (in their hello
// or their gateway connect), besides their wakeups and listeners.
func (fs fronts) pending() int {
	n := 0
	for _, f := range fs {
		n += f.pending()
	}
	return n
}

// pending is fronts.pending of one front.
func (f *front) pending() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, fc := range f.conns {
		if fc != nil && (fc.state == fsHello || fc.state == fsConnect) {
			n++
		}
	}
	return n
}

// startLoop is start, checking that the event loop accepts.
func startLoop(t *testing.T, cfg Config, gws ...ring.Member) *harness {
	t.Helper()
	h := start(t, cfg, gws...)
	if h.srv.fronts == nil {
		t.Fatal("the event loop is off on Linux with Park and a *route.Dialer")
	}
	return h
}

// TestFrontHelloInPieces: a hello that arrives a byte at a time waits in
// the front between the pieces, then becomes a session; the front holds
// nothing afterwards.
func TestFrontHelloInPieces(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	h := startLoop(t, DefaultConfig(), ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
	c := dial(t, h.addr)
	_ = c.SetNoDelay(true)
	b := hello(t, "pieces", "")
	if _, err := c.Write(b[:1]); err != nil {
		t.Fatal(err)
	}
	// The first byte was read: the connection waits in the front.
	waitFor(t, func() bool { return h.srv.fronts.pending() == 1 })
	for i := 1; i < len(b); i++ {
		if _, err := c.Write(b[i : i+1]); err != nil {
			t.Fatal(err)
		}
	}
	rep, _, err := stub.ReadReply(c)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Key != "pieces" || rep.Client != c.LocalAddr().String() {
		t.Fatalf("reply %+v", rep)
	}
	if n := h.srv.fronts.pending(); n != 0 {
		t.Fatalf("front holds %d connections after the session started", n)
	}
}

// TestFrontConnectTimeoutFailsOver: a gateway whose connect hangs is given
// up after the dial timeout in the loop, counted against it, and the
// client reaches the next candidate.
func TestFrontConnectTimeoutFailsOver(t *testing.T) {
	live := gateway(t, "live", stub.ProxyRequire)
	stalled := testenv.StalledAddr(t)
	cfg := DefaultConfig()
	cfg.Dialer = &route.Dialer{DialTimeout: 150 * time.Millisecond, Cooldown: -1}
	h := startLoop(t, cfg, ring.Member{ID: "live", Addr: live, Weight: 1}, ring.Member{ID: "stalled", Addr: stalled, Weight: 1})
	r := h.ring.Load()
	key := ""
	for i := range 100 {
		k := "k" + string(rune('a'+i%26)) + string(rune('a'+i/26))
		if m, _ := r.Lookup([]byte(k)); m.ID == "stalled" {
			key = k
			break
		}
	}
	if key == "" {
		t.Fatal("no key owned by the stalled gateway")
	}
	c := dial(t, h.addr)
	if _, err := c.Write(hello(t, key, "")); err != nil {
		t.Fatal(err)
	}
	rep, _, err := stub.ReadReply(c)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Gateway != "live" {
		t.Fatalf("served by %s", rep.Gateway)
	}
	if n := testutil.ToFloat64(h.m.DialFailures.WithLabelValues("stalled")); n != 1 {
		t.Fatalf("dial failures of the stalled gateway = %v, want 1", n)
	}
	if n := testutil.ToFloat64(h.m.Failovers.WithLabelValues("live")); n != 1 {
		t.Fatalf("failovers to live = %v, want 1", n)
	}
}

// waitingResolver is a ring resolver that does not promise to answer
// without waiting, as a Redis binding lookup would not.
type waitingResolver struct {
	r     atomic.Pointer[route.RingResolver]
	calls atomic.Int64
}

func (w *waitingResolver) Resolve(ctx context.Context, key []byte) (route.Route, error) {
	w.calls.Add(1)
	return w.r.Load().Resolve(ctx, key)
}

// TestFrontHandsOffWaitingResolver: with a resolver that may wait, the
// front reads the hello and passes the lookup to a goroutine; the session
// works as any other and the front holds nothing afterwards.
func TestFrontHandsOffWaitingResolver(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	w := &waitingResolver{}
	cfg := DefaultConfig()
	cfg.Resolver = w
	h := startLoop(t, cfg, ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
	w.r.Store(&route.RingResolver{Ring: h.ring})
	if h.srv.fronts[0].immediate {
		t.Fatal("a resolver without ResolvesImmediately is resolved in the loop")
	}
	for i := range 3 {
		c := openSession(t, h, "waits")
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 1)
		if _, err := c.Read(b); err != nil || b[0] != 'x' {
			t.Fatalf("session %d echo %q, %v", i, b, err)
		}
	}
	if n := w.calls.Load(); n != 3 {
		t.Fatalf("resolver called %d times, want 3", n)
	}
	waitFor(t, func() bool { return h.srv.fronts.pending() == 0 })
}

// TestFrontLoopStopped: when an event loop dies (its epoll set fails),
// Serve returns ErrEventLoopStopped instead of silently accepting less,
// and the handshakes the loop held end at once (Close does not hang).
func TestFrontLoopStopped(t *testing.T) {
	cfg := DefaultConfig()
	r, _ := ring.New(nil)
	rh := &ring.Holder{}
	rh.Store(r)
	cfg.Resolver = &route.RingResolver{Ring: rh}
	cfg.Dialer = &route.Dialer{}
	cfg.EventLoop = true
	cfg.EventLoops = 2
	cfg.Metrics = NewMetrics(nil)
	srv, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	// Once a client waits in the front for its hello, break the loop's
	// epoll set: the loop returns.
	c := dial(t, ln.Addr().String())
	waitFor(t, func() bool { return srv.fronts.pending() == 1 })
	for _, f := range srv.fronts {
		if f.pending() == 1 {
			f.l.closeEpoll()
		}
	}
	select {
	case err := <-done:
		if !errors.Is(err, ErrEventLoopStopped) {
			t.Fatalf("Serve returned %v, want ErrEventLoopStopped", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve still running after its event loop stopped")
	}
	// The waiting client is closed, not left hanging, and counted.
	if got, err := io.ReadAll(c); len(got) != 0 || (err != nil && !errors.Is(err, syscall.ECONNRESET)) {
		t.Fatalf("waiting client read %q, %v", got, err)
	}
	if n := testutil.ToFloat64(cfg.Metrics.HandshakeFailures.WithLabelValues(reasonReadError)); n != 1 {
		t.Fatalf("read_error handshake failures = %v, want 1", n)
	}
	if srv.Active() != 0 {
		t.Fatalf("%d connections still open", srv.Active())
	}
}

// TestFrontDrainsEverything: many connections through the front — good
// sessions, bad hellos, clients that leave mid-hello — leave no entry in
// the front and no open connection.
func TestFrontDrainsEverything(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	cfg := DefaultConfig()
	h := startLoop(t, cfg, ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
	for i := range 60 {
		c := dial(t, h.addr)
		switch i % 3 {
		case 0:
			if _, err := c.Write(hello(t, "drain", "")); err != nil {
				t.Fatal(err)
			}
			if _, _, err := stub.ReadReply(c); err != nil {
				t.Fatal(err)
			}
		case 1:
			_, _ = c.Write([]byte{0xde, 0xad, 0xbe, 0xef, 0, 0})
		case 2:
			_, _ = c.Write(hello(t, "drain", "")[:3])
		}
		c.Close()
	}
	waitFor(t, func() bool { return h.srv.Active() == 0 && h.srv.fronts.pending() == 0 })
	if n := testutil.ToFloat64(h.m.HandshakeFailures.WithLabelValues("too_large")); n != 20 {
		t.Fatalf("too_large = %v, want 20", n)
	}
	if n := testutil.ToFloat64(h.m.HandshakeFailures.WithLabelValues("eof")); n != 20 {
		t.Fatalf("eof = %v, want 20", n)
	}
}

// TestLoopsKeepTheirSessions: with two event loops, every session parks in
// the loop whose epoll set already holds its sockets — the front's that
// read its hello, or for the goroutine path the loop it was given — and
// the sessions of both loops still move data when they wake.
func TestLoopsKeepTheirSessions(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	member := ring.Member{ID: "gw-1", Addr: gw, Weight: 1}
	for _, path := range handshakePaths {
		t.Run(path.name, func(t *testing.T) {
			cfg := parkFast()
			cfg.EventLoops = 2
			h := path.start(t, cfg, member)
			if n := len(h.srv.parker.loops); n != 2 {
				t.Fatalf("%d loops, want 2", n)
			}
			conns := openSessions(t, h, 30, "loops")
			waitFor(t, func() bool { return h.srv.parker.parkedCount() == 60 })
			used := map[*evloop]int{}
			h.srv.parker.mu.Lock()
			for _, d := range h.srv.parker.slots[1:] {
				if d == nil {
					continue
				}
				used[d.ps.l]++
				// Adding the socket again to the loop's own set must
				// fail: it is there already.
				var err, nerr error
				nodelay := 0
				_ = d.ps.l.epRC.Control(func(epfd uintptr) {
					_ = d.srcRC.Control(func(fd uintptr) {
						err = sock.EpollCtl(int(epfd), unix.EPOLL_CTL_ADD, int(fd), &unix.EpollEvent{})
						nodelay, nerr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NODELAY)
					})
				})
				if !errors.Is(err, unix.EEXIST) {
					t.Errorf("a parked socket is not in its session's loop: EPOLL_CTL_ADD = %v", err)
				}
				// Both sides of a proxied session send small writes at once.
				if nodelay != 1 || nerr != nil {
					t.Errorf("a parked socket has TCP_NODELAY %d (%v), want 1", nodelay, nerr)
				}
			}
			h.srv.parker.mu.Unlock()
			if path.name == "goroutines" && len(used) != 2 {
				t.Errorf("sessions given to %d loops, want both (round robin)", len(used))
			}
			for i, c := range conns {
				msg := []byte(fmt.Sprintf("ping %d", i))
				if _, err := c.Write(msg); err != nil {
					t.Fatal(err)
				}
				got := make([]byte, len(msg))
				if _, err := io.ReadFull(c, got); err != nil || string(got) != string(msg) {
					t.Fatalf("session %d echoed %q, %v", i, got, err)
				}
			}
		})
	}
}

// TestClientSocketOptions: every client connection the event loop accepts
// has TCP_NODELAY and Config.ClientKeepAlive, both those created after
// Serve gave the listener the options (they inherit them) and those
// already queued before (set one by one); with keepalive off, Serve leaves
// the listener's keepalive as it is.
func TestClientSocketOptions(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	member := ring.Member{ID: "gw-1", Addr: gw, Weight: 1}
	on := net.KeepAliveConfig{Enable: true, Idle: 41 * time.Second, Interval: 9 * time.Second, Count: 3}
	for _, tc := range []struct {
		name string
		ka   net.KeepAliveConfig
		want bool // the client sockets have on
	}{
		{"on", on, true},
		{"off", net.KeepAliveConfig{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := parkFast()
			cfg.ClientKeepAlive = tc.ka
			var early []*net.TCPConn
			h := startWrapped(t, cfg, func(ln net.Listener, _ *Metrics) net.Listener {
				// Connections that wait in the listener's queue before
				// Serve runs.
				for range 5 {
					c := dial(t, ln.Addr().String())
					if _, err := c.Write(hello(t, "early", "")); err != nil {
						t.Fatal(err)
					}
					early = append(early, c)
				}
				return ln
			}, member)
			if h.srv.fronts == nil {
				t.Fatal("the event loop does not accept")
			}
			for _, c := range early {
				if _, _, err := stub.ReadReply(c); err != nil {
					t.Fatal(err)
				}
			}
			openSessions(t, h, 5, "late")
			waitFor(t, func() bool { return h.srv.parker.parkedCount() == 20 })
			clients := 0
			h.srv.parker.mu.Lock()
			for _, d := range h.srv.parker.slots[1:] {
				if d == nil || d != &d.ps.dirs[dirUp] {
					continue // the gateway's side
				}
				clients++
				var has, nodelay bool
				keepalive := -1
				_ = d.srcRC.Control(func(fd uintptr) {
					has = sock.HasKeepAlive(int(fd), on)
					nodelay = sock.HasNoDelay(int(fd))
					keepalive, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE)
				})
				if !nodelay {
					t.Error("a client socket has TCP_NODELAY off")
				}
				if has != tc.want {
					t.Errorf("a client socket has keepalive %v (SO_KEEPALIVE %d), want %v", has, keepalive, tc.want)
				}
				if !tc.want && keepalive != 0 {
					t.Errorf("keepalive off, but a client socket has SO_KEEPALIVE %d", keepalive)
				}
			}
			h.srv.parker.mu.Unlock()
			if clients != 10 {
				t.Fatalf("%d client sockets parked, want 10", clients)
			}
			// The late connections inherited the options: the check of
			// queued ones ended, and accepting costs no system call.
			f := h.srv.fronts[0]
			f.mu.Lock()
			for _, fc := range f.conns {
				if fc == nil || fc.state != fsListener {
					continue
				}
				if lo := fc.ln.opts; lo.perConn.Load() || lo.unsure.Load() {
					t.Errorf("listener options %+v, want inherited", lo)
				}
			}
			f.mu.Unlock()
		})
	}
}

// TestListenerOptsGivesUpChecking: connections that keep lacking the
// options past the number that was queued when the listener got them (a
// kernel that does not copy them) switch the listener to setting them on
// every connection, without a check; each connection has them either way.
func TestListenerOptsGivesUpChecking(t *testing.T) {
	ka := net.KeepAliveConfig{Enable: true, Idle: 41 * time.Second, Interval: 9 * time.Second, Count: 3}
	socket := func() int {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		return fd
	}
	has := func(fd int) bool { return sock.HasNoDelay(fd) && sock.HasKeepAlive(fd, ka) }
	for _, tc := range []struct {
		name        string
		early       int64
		wantPerConn bool
	}{
		{"more lacking than were queued", 2, true},
		{"no more than were queued", 3, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lo := &listenerOpts{ka: ka, early: tc.early}
			lo.unsure.Store(true)
			for i := range 3 {
				fd := socket()
				lo.accepted(fd, lo.unsure.Load())
				if !has(fd) {
					t.Fatalf("connection %d lacks the options", i)
				}
			}
			if lo.perConn.Load() != tc.wantPerConn || lo.unsure.Load() == tc.wantPerConn {
				t.Fatalf("perConn %v unsure %v, want perConn %v", lo.perConn.Load(), lo.unsure.Load(), tc.wantPerConn)
			}
			// Once the check is over, a connection still gets the options
			// if the listener does not pass them on.
			if tc.wantPerConn {
				fd := socket()
				lo.accepted(fd, lo.unsure.Load())
				if !has(fd) {
					t.Fatal("a connection after the switch lacks the options")
				}
			}
		})
	}
}
