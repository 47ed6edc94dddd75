//go:build linux

package sock

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// rawPair connects a Start socket to a raw Accept socket over loopback and
// returns both, unregistered in Go's poller.
func rawPair(t *testing.T) (client, server *Conn) {
	t.Helper()
	ln := listen(t)
	lap := ln.Addr().(*net.TCPAddr).AddrPort()
	lrc, err := ln.(*net.TCPListener).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	// Accept sets no option: the accepted socket has the listener's.
	var nerr error
	_ = lrc.Control(func(lfd uintptr) { nerr = SetNoDelay(int(lfd)) })
	if nerr != nil {
		t.Fatal(nerr)
	}
	fd, connected, err := Start(lap)
	if err != nil {
		t.Fatal(err)
	}
	if !connected {
		// Wait for writability as an event loop would.
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		if _, err := unix.Poll(pfd, 5000); err != nil {
			t.Fatal(err)
		}
		if err := Connected(fd, lap); err != nil {
			t.Fatal(err)
		}
	}
	client = NewConn(fd, lap)
	t.Cleanup(func() { client.Close() })

	var sfd int
	var peer netip.AddrPort
	var aerr error
	// The listener is non-blocking: wait for the connection, then take it.
	if err := lrc.Control(func(lfd uintptr) {
		pfd := []unix.PollFd{{Fd: int32(lfd), Events: unix.POLLIN}}
		if _, aerr = unix.Poll(pfd, 5000); aerr == nil {
			sfd, peer, aerr = Accept(int(lfd))
		}
	}); err != nil {
		t.Fatal(err)
	}
	if aerr != nil {
		t.Fatal(aerr)
	}
	if local := client.LocalAddr().(*net.TCPAddr).AddrPort(); peer != local {
		t.Fatalf("Accept's peer %v, client's local address %v", peer, local)
	}
	if !HasNoDelay(sfd) {
		t.Fatal("accepted socket lacks the listener's TCP_NODELAY")
	}
	if nd, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY); err != nil || nd == 0 {
		t.Fatalf("started socket TCP_NODELAY = %d, %v", nd, err)
	}
	server = NewConn(sfd, peer)
	t.Cleanup(func() { server.Close() })
	return client, server
}

// TestRawConnLazyRegistration checks a NewConn socket through its life:
// plain system calls first (Control, WriteNow, SetLinger), then Go's poller
// once something waits (Read with a deadline), and net's errors once closed.
func TestRawConnLazyRegistration(t *testing.T) {
	client, server := rawPair(t)

	if n, err := client.WriteNow([]byte("hello")); n != 5 || err != nil {
		t.Fatalf("WriteNow = %d, %v", n, err)
	}
	if client.reg.Load() != nil {
		t.Fatal("WriteNow registered the socket in Go's poller")
	}
	var sawFD bool
	if err := client.rc.Control(func(fd uintptr) { sawFD = int(fd) == client.fd }); err != nil || !sawFD {
		t.Fatalf("Control before registration: %v, saw fd %v", err, sawFD)
	}
	if client.reg.Load() != nil {
		t.Fatal("Control registered the socket")
	}

	// Read waits: it registers; a deadline then works as on a net.Conn.
	buf := make([]byte, 16)
	if err := server.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if n, err := io.ReadFull(server, buf[:5]); err != nil || string(buf[:n]) != "hello" {
		t.Fatalf("Read = %q, %v", buf[:n], err)
	}
	if server.reg.Load() == nil {
		t.Fatal("Read did not register the socket")
	}
	if err := server.SetReadDeadline(time.Now().Add(-time.Second)); err != nil {
		t.Fatal(err)
	}
	var ne net.Error
	if _, err := server.Read(buf); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("Read past its deadline: %v, want a timeout", err)
	}

	// Half close before registration reaches the peer as EOF.
	if err := client.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if err := server.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if n, err := server.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("Read after the peer's CloseWrite = %d, %v; want EOF", n, err)
	}

	// Closing the unregistered socket closes its fd; afterwards every
	// call reports net.ErrClosed.
	fd := client.fd
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != unix.EBADF {
		t.Fatalf("fd %d still open after Close: %v", fd, err)
	}
	for name, err := range map[string]error{
		"Close":   client.Close(),
		"Control": client.rc.Control(func(uintptr) { t.Error("Control ran after Close") }),
		"WriteNow": func() error {
			_, err := client.WriteNow([]byte("x"))
			return err
		}(),
		"Read": func() error {
			_, err := client.Read(buf)
			return err
		}(),
		"SetDeadline": client.SetDeadline(time.Now()),
	} {
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("%s after Close: %v, want net.ErrClosed", name, err)
		}
	}
	if err := server.Close(); err != nil {
		t.Fatalf("closing a registered Conn: %v", err)
	}
	if !errors.Is(server.Close(), net.ErrClosed) {
		t.Fatal("second Close of a registered Conn did not report net.ErrClosed")
	}
}

// TestWriteNowPartial checks that WriteNow never waits: a peer that reads
// nothing fills the socket and WriteNow reports how much it took and EAGAIN.
func TestWriteNowPartial(t *testing.T) {
	client, _ := rawPair(t)
	_ = client.control("setsockopt", func(fd int) error {
		return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 4096)
	})
	big := make([]byte, 64<<20)
	n, err := client.WriteNow(big)
	if !errors.Is(err, unix.EAGAIN) || n <= 0 || n >= len(big) {
		t.Fatalf("WriteNow of 64 MiB to a stalled peer = %d, %v; want part of it and EAGAIN", n, err)
	}
	var oe *net.OpError
	if !errors.As(err, &oe) || oe.Op != "write" {
		t.Fatalf("WriteNow's error %v is not a *net.OpError for write", err)
	}
}

func TestStartRefusedAndConnectedErrors(t *testing.T) {
	ln := listen(t)
	ap := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	fd, connected, err := Start(ap)
	if err == nil {
		// The refusal may arrive after Start returns: Connected names it.
		if connected {
			unix.Close(fd)
			t.Fatal("connect to a closed port reported up")
		}
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		_, _ = unix.Poll(pfd, 5000)
		err = Connected(fd, ap)
		unix.Close(fd)
	}
	if !errors.Is(err, unix.ECONNREFUSED) {
		t.Fatalf("err = %v, want ECONNREFUSED", err)
	}
	var oe *net.OpError
	if !errors.As(err, &oe) || oe.Op != "dial" && oe.Op != "connect" {
		t.Fatalf("err %v is not a *net.OpError naming the connect", err)
	}
	if _, _, err := Accept(-1); !errors.Is(err, unix.EBADF) {
		t.Fatalf("Accept(-1) = %v", err)
	}
}

func TestSetKeepAlive(t *testing.T) {
	client, _ := rawPair(t)
	get := func(level, opt int) int {
		var v int
		_ = client.control("getsockopt", func(fd int) (err error) {
			v, err = unix.GetsockoptInt(fd, level, opt)
			return err
		})
		return v
	}
	if err := SetKeepAlive(client.fd, net.KeepAliveConfig{}); err != nil || get(unix.SOL_SOCKET, unix.SO_KEEPALIVE) != 0 {
		t.Fatalf("zero config turned keepalive on (%v)", err)
	}
	ka := net.KeepAliveConfig{Enable: true, Idle: 30 * time.Second, Interval: 10 * time.Second, Count: 4}
	if HasKeepAlive(client.fd, ka) {
		t.Fatal("HasKeepAlive before SetKeepAlive")
	}
	if !HasKeepAlive(client.fd, net.KeepAliveConfig{}) {
		t.Fatal("HasKeepAlive false for keepalive off, which sets nothing")
	}
	if err := SetKeepAlive(client.fd, ka); err != nil {
		t.Fatal(err)
	}
	if !HasKeepAlive(client.fd, ka) {
		t.Fatal("HasKeepAlive false after SetKeepAlive")
	}
	if other := (net.KeepAliveConfig{Enable: true, Idle: 31 * time.Second, Interval: 10 * time.Second, Count: 4}); HasKeepAlive(client.fd, other) {
		t.Fatal("HasKeepAlive true for another idle time")
	}
	for _, c := range []struct {
		name       string
		level, opt int
		want       int
	}{
		{"SO_KEEPALIVE", unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{"TCP_KEEPIDLE", unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 30},
		{"TCP_KEEPINTVL", unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 10},
		{"TCP_KEEPCNT", unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 4},
	} {
		if got := get(c.level, c.opt); got != c.want {
			t.Errorf("%s = %d, want %d", c.name, got, c.want)
		}
	}
}

// TestKeepAliveFromListener: the kernel behaviour the event loop relies on
// to accept without a setsockopt — a connection the listener creates after
// it got keepalive and TCP_NODELAY has them too (Linux copies the
// options), one created before does not. Go's listeners are Multipath TCP sockets by default;
// both kinds are checked.
func TestKeepAliveFromListener(t *testing.T) {
	ka := net.KeepAliveConfig{Enable: true, Idle: 42 * time.Second, Interval: 7 * time.Second, Count: 3}
	for _, mptcp := range []struct{ listener, client bool }{{false, false}, {true, false}, {true, true}} {
		t.Run(fmt.Sprintf("mptcp listener=%v client=%v", mptcp.listener, mptcp.client), func(t *testing.T) {
			var lc net.ListenConfig
			lc.SetMultipathTCP(mptcp.listener)
			ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			rc, err := ln.(*net.TCPListener).SyscallConn()
			if err != nil {
				t.Fatal(err)
			}
			var lfd int
			_ = rc.Control(func(fd uintptr) { lfd = int(fd) })
			accept := func() int {
				t.Helper()
				var d net.Dialer
				d.SetMultipathTCP(mptcp.client)
				c, err := d.Dial("tcp", ln.Addr().String())
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.Close() })
				if mp, _ := c.(*net.TCPConn).MultipathTCP(); mp != mptcp.client {
					t.Fatalf("client connection is MPTCP %v, want %v (a kernel without Multipath TCP? sysctl net.mptcp.enabled)", mp, mptcp.client)
				}
				pfd := []unix.PollFd{{Fd: int32(lfd), Events: unix.POLLIN}}
				if _, err := unix.Poll(pfd, 5000); err != nil {
					t.Fatal(err)
				}
				fd, _, err := Accept(lfd)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { Close(fd) })
				return fd
			}
			before := accept()
			// Two more wait in the queue: AcceptQueueLen counts them (once
			// the kernel has queued them), then they are taken, so that
			// the next accept is a connection made after the options.
			for range 2 {
				c, err := net.Dial("tcp", ln.Addr().String())
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.Close() })
			}
			n, err := AcceptQueueLen(lfd)
			for i := 0; err == nil && n < 2 && i < 1000; i++ {
				time.Sleep(time.Millisecond)
				n, err = AcceptQueueLen(lfd)
			}
			if err != nil || n != 2 {
				t.Errorf("AcceptQueueLen = %d, %v; want 2", n, err)
			}
			for range 2 {
				fd, _, err := Accept(lfd)
				if err != nil {
					t.Fatal(err)
				}
				Close(fd)
			}
			if err := SetKeepAlive(lfd, ka); err != nil {
				t.Fatalf("keepalive on the listener: %v", err)
			}
			if err := SetNoDelay(lfd); err != nil {
				t.Fatalf("TCP_NODELAY on the listener: %v", err)
			}
			after := accept()
			if HasKeepAlive(before, ka) || HasNoDelay(before) {
				t.Error("a connection created before the listener had the options has them")
			}
			if !HasKeepAlive(after, ka) || !HasNoDelay(after) {
				t.Errorf("a connection created after the listener had the options lacks them: keepalive %v, nodelay %v", HasKeepAlive(after, ka), HasNoDelay(after))
			}
		})
	}
}

// TestHold: a held descriptor stays open until Unhold (Close waits for
// it); a closed or registered Conn cannot be held.
func TestHold(t *testing.T) {
	c, _ := rawPair(t)
	fd, ok := c.Hold()
	if !ok || fd < 0 {
		t.Fatalf("Hold of an open, unregistered Conn: %d, %v", fd, ok)
	}
	closed := make(chan error, 1)
	go func() { closed <- c.Close() }()
	for !c.closed.Load() { // Close has begun
		time.Sleep(time.Millisecond)
	}
	// It cannot finish while fd is held: the socket still answers.
	if _, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil {
		t.Fatalf("held descriptor: %v", err)
	}
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) under a Hold", err)
	default:
	}
	c.Unhold()
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	if _, ok := c.Hold(); ok {
		t.Fatal("a closed Conn was held")
	}

	r, _ := rawPair(t)
	if err := r.SetReadDeadline(time.Now().Add(time.Hour)); err != nil { // registers it
		t.Fatal(err)
	}
	if _, ok := r.Hold(); ok {
		t.Fatal("a registered Conn was held")
	}
}

// TestNoAllocs: the calls an event loop makes per connection on an
// unregistered Conn allocate nothing (no closure escapes through
// RawConn.Control).
func TestNoAllocs(t *testing.T) {
	c, s := rawPair(t)
	b := []byte("x")
	for name, f := range map[string]func(){
		"WriteNow":  func() { _, _ = c.WriteNow(b) },
		"SetLinger": func() { _ = c.SetLinger(-1) },
		"Hold":      func() { _, _ = c.Hold(); c.Unhold() },
	} {
		if n := testing.AllocsPerRun(100, f); n != 0 {
			t.Errorf("%s: %v allocations per call, want 0", name, n)
		}
	}
	if n := testing.AllocsPerRun(1, func() { _ = s.CloseWrite() }); n != 0 {
		t.Errorf("CloseWrite: %v allocations, want 0", n)
	}
	// A second Close is net's error, with no local address asked of a
	// closed socket.
	s.Close()
	var oe *net.OpError
	if err := s.Close(); !errors.Is(err, net.ErrClosed) || !errors.As(err, &oe) || oe.Source != nil {
		t.Fatalf("second Close: %#v, want a *net.OpError around net.ErrClosed without a source", err)
	}
}
