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
	"testing"
	"time"

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
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	h := start(t, parkFast(), ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
	if h.srv.parker == nil {
		t.Fatal("parking is off on Linux")
	}
	// The stub holds a goroutine per session: count only ours by
	// comparing with the stub's own share (one per session).
	base := runtime.NumGoroutine()
	var conns []*net.TCPConn
	for range 200 {
		conns = append(conns, openSession(t, h, "k"))
	}
	waitFor(t, func() bool { return h.srv.parker.parkedCount() == 400 })
	grown := runtime.NumGoroutine() - base
	// 200 stub handler goroutines are expected; the proxy may add a few
	// runtime helpers but nothing per session.
	if grown > 200+20 {
		t.Fatalf("200 parked sessions grew goroutines by %d (stub accounts for 200)", grown)
	}
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
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	h := start(t, parkFast(), ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
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
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	h := start(t, parkFast(), ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
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

// TestParkedClosedByDrain: Shutdown's drain timeout closes parked sessions
// and returns.
func TestParkedClosedByDrain(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	h := start(t, parkFast(), ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
	var conns []*net.TCPConn
	for range 5 {
		conns = append(conns, openSession(t, h, "d"))
	}
	waitFor(t, func() bool { return h.srv.parker.parkedCount() == 10 })
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := h.srv.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v", err)
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
