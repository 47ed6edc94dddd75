//go:build linux

package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route"
)

// stream writes size seeded pseudo-random bytes to c (then half-closes)
// and checks that the echo is the same bytes in order. Its error arrives
// on the returned channel.
func stream(c *net.TCPConn, seed uint64, size int) <-chan error {
	errc := make(chan error, 2)
	go func() {
		r := rand.New(rand.NewPCG(seed, 1))
		buf := make([]byte, 32<<10)
		for left := size; left > 0; {
			n := min(left, len(buf))
			for i := range buf[:n] {
				buf[i] = byte(r.Uint32())
			}
			if _, err := c.Write(buf[:n]); err != nil {
				errc <- fmt.Errorf("write: %w", err)
				return
			}
			left -= n
		}
		errc <- c.CloseWrite()
	}()
	go func() {
		r := rand.New(rand.NewPCG(seed, 1))
		buf := make([]byte, 32<<10)
		got := 0
		for {
			n, err := c.Read(buf)
			for i := range buf[:n] {
				if buf[i] != byte(r.Uint32()) {
					errc <- fmt.Errorf("byte %d differs: lost, duplicated or reordered", got+i)
					return
				}
			}
			got += n
			if errors.Is(err, io.EOF) && got == size {
				errc <- nil
				return
			}
			if err != nil {
				errc <- fmt.Errorf("read after %d of %d bytes: %w", got, size, err)
				return
			}
		}
	}()
	return errc
}

// dupSend is a send for HandOff that does in-process what SCM_RIGHTS does
// between processes: the receiver gets new descriptors of the same open
// sockets and pipes, and adopts them.
func dupSend(t *testing.T, to *Server, seen *[]HandedSession) func([]HandedSession) error {
	return func(batch []HandedSession) error {
		for _, h := range batch {
			*seen = append(*seen, h)
			fds := make([]int, len(h.FDs))
			for i, fd := range h.FDs {
				nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
				if err != nil {
					t.Fatal(err)
				}
				fds[i] = nfd
			}
			if err := to.Adopt(HandedSession{State: h.State, FDs: fds}); err != nil {
				return err
			}
		}
		return nil
	}
}

// TestHandOffMovesEverySession: idle, busy and stuck sessions move from
// one server to another mid-stream; none notices.
func TestHandOffMovesEverySession(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	member := ring.Member{ID: "gw-1", Addr: gw, Weight: 1}
	a := start(t, parkFast(), member)
	b := start(t, parkFast(), member)

	idle := openSessions(t, a, 20, "idle")
	waitFor(t, func() bool { return a.srv.parker.parkedCount() >= 40 })
	var streams []<-chan error
	for i := range 3 {
		c := openSession(t, a, fmt.Sprintf("bulk-%d", i))
		_ = c.SetDeadline(time.Now().Add(60 * time.Second))
		streams = append(streams, stream(c, uint64(i), 48<<20))
	}
	// A client that stops reading: both directions fill up, and bytes
	// wait in the proxy's pipes when the handoff comes.
	stuck := openSession(t, a, "stuck")
	_ = stuck.SetDeadline(time.Now().Add(60 * time.Second))
	const stuckSize = 8 << 20
	stuckData := bytes.Repeat([]byte("0123456789abcdef"), stuckSize/16)
	var written atomic.Int64
	go func() {
		for off := 0; off < len(stuckData); off += 64 << 10 {
			n, err := stuck.Write(stuckData[off : off+64<<10])
			written.Add(int64(n))
			if err != nil {
				return
			}
		}
	}()
	// Wait until the stuck session stalls: its writes stop progressing
	// because every buffer on the way, the proxy's pipes included, is full.
	last, still := int64(-1), 0
	waitFor(t, func() bool {
		n := written.Load()
		if n == last && n > 0 {
			still++
		} else {
			still = 0
		}
		last = n
		return still >= 20
	})

	var seen []HandedSession
	n, err := a.srv.HandOff(context.Background(), 64, dupSend(t, b.srv, &seen))
	if err != nil {
		t.Fatal(err)
	}
	if want := 24; n != want {
		t.Fatalf("handed %d sessions, want %d", n, want)
	}
	if a.srv.Active() != 0 || a.srv.parker.parkedCount() != 0 || a.srv.parker.sessionDirs() != 0 {
		t.Fatalf("sender still holds: active %d, parked %d, slots %d", a.srv.Active(), a.srv.parker.parkedCount(), a.srv.parker.sessionDirs())
	}
	pending := 0
	for _, h := range seen {
		for _, d := range h.State.Dirs {
			if d.Pending > 0 {
				pending++
			}
		}
	}
	if pending == 0 {
		t.Error("no handed direction had bytes in flight: the stuck session did not test the pipe handover")
	}
	if got := testutil.ToFloat64(b.m.Handoffs.WithLabelValues("received")); got != 24 {
		t.Errorf("received %v, want 24", got)
	}
	if got := testutil.ToFloat64(a.m.Handoffs.WithLabelValues("sent")); got != 24 {
		t.Errorf("sent %v, want 24", got)
	}

	for i, c := range idle {
		msg := fmt.Sprintf("after-%d", i)
		c.Write([]byte(msg))
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
			t.Fatalf("idle session %d after the handoff: %q %v", i, got, err)
		}
	}
	for i, errc := range streams {
		for range 2 {
			if err := <-errc; err != nil {
				t.Fatalf("bulk stream %d: %v", i, err)
			}
		}
	}
	got := make([]byte, stuckSize)
	if _, err := io.ReadFull(stuck, got); err != nil || !bytes.Equal(got, stuckData) {
		t.Fatalf("stuck session: %v, intact %v", err, bytes.Equal(got, stuckData))
	}
	// The bulk sessions ended when their streams did; the others stay.
	waitFor(t, func() bool { return b.srv.Active() == 21 })
}

// TestHandOffFailedSendResumes: when the other process refuses a batch,
// its sessions carry on here as if nothing happened.
func TestHandOffFailedSendResumes(t *testing.T) {
	h := startParking(t)
	idle := openSessions(t, h, 10, "stay")
	busy := openSession(t, h, "busy")
	_ = busy.SetDeadline(time.Now().Add(60 * time.Second))
	errc := stream(busy, 7, 32<<20)
	waitFor(t, func() bool { return h.srv.parker.parkedCount() >= 20 })
	refused := errors.New("refused")
	calls := 0
	var mu sync.Mutex
	n, err := h.srv.HandOff(context.Background(), 12, func([]HandedSession) error {
		mu.Lock()
		defer mu.Unlock()
		calls++
		return refused
	})
	if !errors.Is(err, refused) || n != 0 || calls != 1 {
		t.Fatalf("HandOff = %d, %v after %d sends; want 0, refused, 1", n, err, calls)
	}
	if h.srv.Active() != 11 {
		t.Fatalf("active %d after a failed handoff, want 11", h.srv.Active())
	}
	for i, c := range idle {
		c.Write([]byte("still"))
		got := make([]byte, 5)
		if _, err := io.ReadFull(c, got); err != nil || string(got) != "still" {
			t.Fatalf("session %d after the failed handoff: %q %v", i, got, err)
		}
	}
	for range 2 {
		if err := <-errc; err != nil {
			t.Fatalf("busy session: %v", err)
		}
	}
	// The resumed sessions park again.
	waitFor(t, func() bool { return h.srv.parker.parkedCount() == 20 })
}

// TestStopAcceptingKeepsSessions: Serve returns ErrAcceptStopped, the
// sessions stay, and a new Serve on the same socket accepts again.
func TestStopAcceptingKeepsSessions(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	r, err := ring.New([]ring.Member{{ID: "gw-1", Addr: gw, Weight: 1}})
	if err != nil {
		t.Fatal(err)
	}
	cfg := parkFast()
	var holder ring.Holder
	holder.Store(r)
	cfg.Resolver = &route.RingResolver{Ring: &holder}
	srv, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dup, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer dup.Close()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	h := &harness{srv: srv, addr: ln.Addr().String()}
	c := openSession(t, h, "k")
	h.srv.StopAccepting()
	if err := <-errc; !errors.Is(err, ErrAcceptStopped) {
		t.Fatalf("Serve = %v, want ErrAcceptStopped", err)
	}
	echo := func() {
		c.Write([]byte("x"))
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatalf("session after StopAccepting: %v", err)
		}
	}
	echo()
	again, err := net.FileListener(dup)
	if err != nil {
		t.Fatal(err)
	}
	go func() { errc <- h.srv.Serve(again) }()
	c2 := dial(t, again.Addr().String())
	c2.Write(hello(t, "k2", ""))
	if _, _, err := stub.ReadReply(c2); err != nil {
		t.Fatalf("no session on the resumed listener: %v", err)
	}
	echo()
}
