//go:build linux

package proxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/tether-proxy/tether/internal/sock"
	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/pkg/ring"
)

// parkFast parks directions after 30ms idle, so tests see parked sessions
// quickly.
func parkFast() Config {
	cfg := DefaultConfig()
	cfg.ParkAfter = 30 * time.Millisecond
	return cfg
}

// startParking starts a proxy that parks directions after 30ms idle, in
// front of one stub gateway.
func startParking(t *testing.T) *harness {
	t.Helper()
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	return start(t, parkFast(), ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
}

// openSessions opens n sessions with key.
func openSessions(t *testing.T, h *harness, n int, key string) []*net.TCPConn {
	t.Helper()
	conns := make([]*net.TCPConn, 0, n)
	for range n {
		conns = append(conns, openSession(t, h, key))
	}
	return conns
}

// openSession opens a session and reads the gateway's reply.
func openSession(t *testing.T, h *harness, key string) *net.TCPConn {
	t.Helper()
	c := dial(t, h.addr)
	if _, err := c.Write(hello(t, key, "")); err != nil {
		t.Fatal(err)
	}
	if _, _, err := stub.ReadReply(c); err != nil {
		t.Fatal(err)
	}
	return c
}

// openParked opens a session and waits until both of its directions are
// parked in the parker's epoll set.
func openParked(t *testing.T, h *harness, key string, parkedBefore int) *net.TCPConn {
	t.Helper()
	c := openSession(t, h, key)
	waitFor(t, func() bool { return h.srv.parker.parkedCount() == parkedBefore+2 })
	return c
}

// TestParkedSessionsHoldNoGoroutines: 200 idle sessions add (almost) no
// goroutines to the proxy, and every one still echoes.
func TestParkedSessionsHoldNoGoroutines(t *testing.T) {
	h := startParking(t)
	if h.srv.parker == nil {
		t.Fatal("parking is off on Linux")
	}
	// The stub holds a goroutine per session: count only ours by
	// comparing with the stub's own share (one per session).
	base := runtime.NumGoroutine()
	conns := openSessions(t, h, 200, "k")
	waitFor(t, func() bool { return h.srv.parker.parkedCount() == 400 })
	if got := testutil.ToFloat64(h.srv.m.Parked); got != 400 {
		t.Fatalf("tether_parked_directions = %v, want 400", got)
	}
	// 200 stub handler goroutines are expected; the proxy may add a few
	// runtime helpers but nothing per session, once the handlers that
	// served the handshakes have stopped waiting for more (handlerLinger).
	waitFor(t, func() bool { return runtime.NumGoroutine()-base <= 200+20 })
	for i, c := range conns {
		msg := []byte{byte(i), 'x'}
		c.Write(msg)
		got := make([]byte, 2)
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("session %d: %q %v", i, got, err)
		}
	}
}

// TestParkedHalfClose: a session idle in the parker half-closes correctly
// in both orders of events.
func TestParkedHalfClose(t *testing.T) {
	h := startParking(t)
	c := openParked(t, h, "hc", 0)
	if _, err := c.Write([]byte("last words")); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	rest, err := io.ReadAll(c)
	if err != nil || string(rest) != "last words" {
		t.Fatalf("after half-close: %q %v", rest, err)
	}
	waitFor(t, func() bool { return h.srv.Active() == 0 && h.srv.parker.sessionDirs() == 0 })
}

// TestParkedBulkResumes: after idling parked, a session carries 32 MiB each
// way intact.
func TestParkedBulkResumes(t *testing.T) {
	h := startParking(t)
	c := openParked(t, h, "bulk", 0)
	_ = c.SetDeadline(time.Now().Add(60 * time.Second))
	const size = 32 << 20
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i * 7)
	}
	want := sha256.Sum256(data)
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = c.CloseWrite()
		}
		errc <- err
	}()
	hash := sha256.New()
	n, err := io.Copy(hash, c)
	if err != nil || n != size {
		t.Fatalf("echoed %d bytes, %v", n, err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(hash.Sum(nil), want[:]) {
		t.Fatal("echo corrupted")
	}
	waitFor(t, func() bool { return h.srv.Active() == 0 })
}

// TestStreamingBoundsSendQueue: a session that streams (a move of at least
// streamAt bytes) gets TCP_NOTSENT_LOWAT on the destination of each
// direction that streamed; a chatty one keeps the system's default and pays
// no system call. With both handshake paths.
func TestStreamingBoundsSendQueue(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	member := ring.Member{ID: "gw-1", Addr: gw, Weight: 1}
	for _, path := range handshakePaths {
		t.Run(path.name, func(t *testing.T) {
			h := path.start(t, parkFast(), member)
			chatty := openSession(t, h, "chatty")
			bulk := openSession(t, h, "bulk")
			for _, m := range []struct {
				c    *net.TCPConn
				size int
			}{{chatty, 100}, {bulk, 4 << 20}} {
				_ = m.c.SetDeadline(time.Now().Add(30 * time.Second))
				data := bytes.Repeat([]byte{'s'}, m.size)
				errc := make(chan error, 1)
				go func() { _, err := m.c.Write(data); errc <- err }()
				if _, err := io.ReadFull(m.c, make([]byte, m.size)); err != nil {
					t.Fatal(err)
				}
				if err := <-errc; err != nil {
					t.Fatal(err)
				}
			}
			waitFor(t, func() bool { return h.srv.parker.parkedCount() == 4 })
			h.srv.parker.mu.Lock()
			defer h.srv.parker.mu.Unlock()
			seen := 0
			for _, d := range h.srv.parker.slots[1:] {
				if d == nil {
					continue
				}
				seen++
				// d.src is the destination of the session's other direction.
				other := &d.ps.dirs[0]
				if other == d {
					other = &d.ps.dirs[1]
				}
				var got int
				var err error
				_ = d.srcRC.Control(func(fd uintptr) {
					got, err = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT)
				})
				if streamed := other.bytes >= 4<<20; err != nil || (got == notSentLowat) != streamed {
					t.Errorf("a socket that received %d bytes from the proxy has TCP_NOTSENT_LOWAT %d (%v); set by the proxy: want %v", other.bytes, got, err, streamed)
				}
			}
			if seen != 4 {
				t.Fatalf("%d parked directions, want 4", seen)
			}
		})
	}
}

// TestParkedClosedByDrain: Shutdown's paced drain closes parked sessions
// one by one before its deadline and returns.
func TestParkedClosedByDrain(t *testing.T) {
	h := startParking(t)
	conns := openSessions(t, h, 5, "d")
	waitFor(t, func() bool { return h.srv.parker.parkedCount() == 10 })
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := h.srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown = %v, want nil: pacing closes every session before the deadline", err)
	}
	for _, c := range conns {
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatal("parked session survived the drain timeout")
		}
	}
	if h.srv.Active() != 0 || h.srv.parker.parkedCount() != 0 || h.srv.parker.sessionDirs() != 0 {
		t.Fatalf("active %d, parked %d after drain", h.srv.Active(), h.srv.parker.parkedCount())
	}
}

// TestParkedGatewayReset: a gateway that resets a parked session ends it
// for the client too.
func TestParkedGatewayReset(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan *net.TCPConn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c.(*net.TCPConn)
		}
	}()
	cfg := parkFast()
	cfg.ProxyProtocolOut = false
	h := start(t, cfg, ring.Member{ID: "raw", Addr: ln.Addr().String(), Weight: 1})
	c := dial(t, h.addr)
	c.Write(hello(t, "r", ""))
	g := <-accepted
	g.Write([]byte("hi"))
	buf := make([]byte, 2)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return h.srv.parker.parkedCount() == 2 })
	if ses := h.srv.anySession(); ses == nil {
		t.Fatal("no open session")
	} else if _, ok := ses.gw.(*sock.Conn); !ok {
		t.Fatalf("gateway connection is a %T, want the lean dial's *sock.Conn", ses.gw)
	}
	g.SetLinger(0)
	g.Close()
	if _, err := c.Read(buf); err == nil {
		t.Fatal("client not told of the gateway reset")
	}
	waitFor(t, func() bool { return h.srv.Active() == 0 && h.srv.parker.sessionDirs() == 0 })
}

// TestResetSessionsReusePipes: sessions that the client resets (how most
// short sessions end) give their pipes back to the pool instead of
// creating and closing a pipe each.
func TestResetSessionsReusePipes(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	h := start(t, DefaultConfig(), ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
	const sessions = 100
	for range sessions {
		c := openSession(t, h, "r")
		c.SetLinger(0)
		c.Close()
		waitFor(t, func() bool { return h.srv.Active() == 0 })
	}
	// One session at a time uses at most one pipe per direction.
	if made := h.srv.parker.pipesMade.Load(); made > 4 {
		t.Fatalf("%d sessions created %d pipes; want them reused from the pool", sessions, made)
	}
}

// TestIdlePipesTrimmed: once data stops moving, the pooled pipes are closed,
// so idle sessions cost their two sockets and nothing more.
func TestIdlePipesTrimmed(t *testing.T) {
	h := startParking(t)
	conns := openSessions(t, h, 20, "t")
	if h.srv.parker.pipesMade.Load() == 0 {
		t.Fatal("no pipe was used to move data")
	}
	waitFor(t, func() bool { return h.srv.parker.parkedCount() == 40 && h.srv.parker.pooledPipes() == 0 })
	// Parked sessions still move data, taking pipes again.
	c := conns[0]
	c.Write([]byte("hi"))
	if _, err := io.ReadFull(c, make([]byte, 2)); err != nil {
		t.Fatal(err)
	}
}

// TestParkErrorClosesSession: a session that epoll refuses to watch is
// closed (nothing would ever wake it), counted and logged, and leaves no
// state behind. (With the event loop, a broken epoll set accepts nothing
// at all: the goroutine path is the one that can meet this.)
func TestParkErrorClosesSession(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	h := startGoroutines(t, parkFast(), ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
	// A broken epoll set: every arm fails from now on.
	for _, l := range h.srv.parker.loops {
		l.closeEpoll()
		<-l.done
	}
	c := openSession(t, h, "pe")
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("a session that could not park stayed open")
	}
	waitFor(t, func() bool { return h.srv.Active() == 0 })
	if got := testutil.ToFloat64(h.srv.m.ParkErrors); got < 1 {
		t.Fatalf("tether_park_errors_total = %v", got)
	}
	if got := testutil.ToFloat64(h.srv.m.Parked); got != 0 {
		t.Fatalf("tether_parked_directions = %v after the session ended", got)
	}
}

// smallBufListener makes accepted client sockets' send buffers tiny, so a
// client that stops reading fills them after a few KiB.
type smallBufListener struct{ net.Listener }

func (l smallBufListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetWriteBuffer(4096)
	}
	return c, err
}

// rawGateway accepts one connection on a fresh listener and hands it over.
func rawGateway(t *testing.T) (addr string, conn <-chan *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ch := make(chan *net.TCPConn, 1)
	go func() {
		if c, err := ln.Accept(); err == nil {
			ch <- c.(*net.TCPConn)
		}
	}()
	return ln.Addr().String(), ch
}

// TestParkedWakeInline: a message to a session parked for longer than
// --park-after is moved by the epoll loop itself (no goroutine), both
// ways, and the session parks again at once.
func TestParkedWakeInline(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	clock := newStepClock()
	cfg := parkFast()
	cfg.Now = clock.Now
	h := start(t, cfg, ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
	c := openParked(t, h, "inline", 0)
	p := h.srv.parker
	// The event loop served the gateway's reply inline already.
	before := testutil.ToFloat64(p.wakesInline)
	for i := range 5 {
		waitFor(t, func() bool { return p.parkedCount() == 2 })
		clock.Step(2 * p.parkAfter) // quiet for longer than parkAfter
		msg := []byte{'m', byte('0' + i)}
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("message %d: %q %v", i, got, err)
		}
		waitFor(t, func() bool { return p.parkedCount() == 2 })
	}
	// Each message woke both directions, parked for longer than
	// parkAfter by the clock: every wakeup was served inline.
	if n := testutil.ToFloat64(p.wakesInline) - before; n != 10 {
		t.Fatalf("%v wakeups served inline, want all 10", n)
	}
}

// TestParkedWakeSlowClient: when a parked session's client has stopped
// reading, the loop's inline move cannot write everything; a worker takes
// over the leftover bytes and nothing is lost or reordered.
func TestParkedWakeSlowClient(t *testing.T) {
	gwAddr, accepted := rawGateway(t)
	cfg := parkFast()
	cfg.ProxyProtocolOut = false
	h := startWrapped(t, cfg, func(ln net.Listener, _ *Metrics) net.Listener { return smallBufListener{ln} },
		ring.Member{ID: "raw", Addr: gwAddr, Weight: 1})
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		return errors.Join(err, serr)
	}}
	conn, err := d.Dial("tcp", h.addr)
	if err != nil {
		t.Fatal(err)
	}
	c := conn.(*net.TCPConn)
	defer c.Close()
	c.Write(hello(t, "slow", ""))
	g := <-accepted
	defer g.Close()
	if _, err := io.ReadFull(g, make([]byte, len(hello(t, "slow", "")))); err != nil {
		t.Fatal(err)
	}
	p := h.srv.parker
	waitFor(t, func() bool { return p.parkedCount() == 2 })
	// 20 chunks of 8 KiB, each after the session was quiet for longer
	// than parkAfter, to a client that reads nothing until the end.
	const chunks, size = 20, 8 << 10
	var want []byte
	for i := range chunks {
		// Real time, not a clock: the direction's worker must really
		// go idle for parkAfter in Go's poller before it parks.
		time.Sleep(2 * p.parkAfter)
		chunk := bytes.Repeat([]byte{byte('a' + i)}, size)
		want = append(want, chunk...)
		if _, err := g.Write(chunk); err != nil {
			t.Fatal(err)
		}
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("bytes lost or reordered")
	}
	if in, w := testutil.ToFloat64(p.wakesInline), testutil.ToFloat64(p.wakesWorker); in == 0 || w == 0 {
		t.Fatalf("inline %v, worker %v: want both paths taken", in, w)
	}
}

// stepClock is a clock tests step by hand.
type stepClock struct {
	mu  sync.Mutex
	now time.Time
}

func newStepClock() *stepClock { return &stepClock{now: time.Unix(1_000_000, 0)} }

func (c *stepClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }

func (c *stepClock) Step(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }
