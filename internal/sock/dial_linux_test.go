//go:build linux

package sock

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-proxy/tether/internal/testenv"
)

// listen listens on 127.0.0.1 for the test's duration.
func listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// echoOnce accepts one connection on ln and echoes it until EOF.
func echoOnce(t *testing.T, ln net.Listener) <-chan error {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		_, err = io.Copy(c, c)
		done <- err
	}()
	return done
}

func TestDialEchoesAndHalfCloses(t *testing.T) {
	for _, network := range []string{"tcp4", "tcp6"} {
		t.Run(network, func(t *testing.T) {
			addr := map[string]string{"tcp4": "127.0.0.1:0", "tcp6": "[::1]:0"}[network]
			ln, err := net.Listen(network, addr)
			if err != nil {
				if os.Getenv("CI") == "true" {
					t.Fatalf("no %s loopback: %v", network, err)
				}
				t.Skipf("no %s loopback here: %v", network, err)
			}
			defer ln.Close()
			done := echoOnce(t, ln)
			c, err := Dial(context.Background(), "tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			sc, ok := c.(*Conn)
			if !ok {
				t.Fatalf("Dial gave a %T for an IP address, want *sock.Conn", c)
			}
			if got, want := c.RemoteAddr().String(), ln.Addr().String(); got != want {
				t.Errorf("RemoteAddr = %s, want %s", got, want)
			}
			if la := c.LocalAddr().(*net.TCPAddr); la.Port == 0 || !la.IP.IsLoopback() {
				t.Errorf("LocalAddr = %v, want a loopback address with a port", la)
			}
			nodelay := 0
			rc, _ := sc.SyscallConn()
			_ = rc.Control(func(fd uintptr) {
				nodelay, _ = syscall.GetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_NODELAY)
			})
			if nodelay == 0 {
				t.Error("TCP_NODELAY is off")
			}
			if _, err := c.Write([]byte("hello")); err != nil {
				t.Fatal(err)
			}
			if err := sc.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(c)
			if err != nil || string(got) != "hello" {
				t.Fatalf("echo after half-close = %q, %v; want \"hello\", nil", got, err)
			}
			if err := <-done; err != nil {
				t.Fatalf("echo side: %v", err)
			}
		})
	}
}

func TestDialRefused(t *testing.T) {
	ln := listen(t)
	addr := ln.Addr().String()
	ln.Close()
	_, err := Dial(context.Background(), "tcp", addr)
	var oe *net.OpError
	if !errors.Is(err, syscall.ECONNREFUSED) || !errors.As(err, &oe) || oe.Op != "dial" {
		t.Fatalf("Dial to a closed port = %v, want a dial *net.OpError wrapping ECONNREFUSED", err)
	}
}

// TestDialTimesOut dials a listener whose accept queue is full, so the
// kernel drops the SYN and the connect never completes: the dial must end
// at the context's deadline, and a cancelled context must end it too.
func TestDialTimesOut(t *testing.T) {
	addr := testenv.StalledAddr(t)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	c, err := Dial(ctx, "tcp", addr)
	if err == nil {
		c.Close()
		t.Fatal("the kernel completed a connect to a full accept queue; nothing timed out")
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Dial past its deadline = %v, want context.DeadlineExceeded", err)
	}

	ctx, cancel = context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	if _, err := Dial(ctx, "tcp", addr); !errors.Is(err, context.Canceled) {
		t.Fatalf("Dial with a cancelled context = %v, want context.Canceled", err)
	}
}

func TestClosedConnErrorsAreNets(t *testing.T) {
	ln := listen(t)
	_ = echoOnce(t, ln)
	c, err := Dial(context.Background(), "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	sc := c.(*Conn)
	rc, _ := sc.SyscallConn()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	for name, err := range map[string]error{
		"Read":      func() error { _, err := c.Read(make([]byte, 1)); return err }(),
		"Write":     func() error { _, err := c.Write([]byte("x")); return err }(),
		"Close":     c.Close(),
		"Control":   rc.Control(func(uintptr) {}),
		"SetLinger": sc.SetLinger(0),
	} {
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("%s after Close = %v, want net.ErrClosed", name, err)
		}
		if errors.Is(err, os.ErrClosed) {
			t.Errorf("%s after Close = %v: os.ErrClosed leaks out", name, err)
		}
	}
}

// TestSetLingerZeroResets: a connection closed after SetLinger(0) reaches
// its peer as a reset, which is how the proxy aborts a session.
func TestSetLingerZeroResets(t *testing.T) {
	ln := listen(t)
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
		close(accepted)
	}()
	c, err := Dial(context.Background(), "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	peer := <-accepted
	if peer == nil {
		t.Fatal("accept failed")
	}
	defer peer.Close()
	if err := c.(*Conn).SetLinger(0); err != nil {
		t.Fatal(err)
	}
	c.Close()
	_ = peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := peer.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("peer read after SetLinger(0) + Close = %v, want ECONNRESET", err)
	}
}

func TestDialHostNameFallsBack(t *testing.T) {
	ln := listen(t)
	_ = echoOnce(t, ln)
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	c, err := Dial(context.Background(), "tcp", net.JoinHostPort("localhost", port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, ok := c.(*net.TCPConn); !ok {
		t.Fatalf("Dial of a host name gave a %T, want net.Dialer's *net.TCPConn", c)
	}
}

// TestWriteAsksAConnect: a write is how the event loop learns how a
// connect that Start left in progress is doing — EAGAIN while it still
// is, the connect's own error once it failed, the bytes taken once it is
// up.
func TestWriteAsksAConnect(t *testing.T) {
	t.Run("in progress", func(t *testing.T) {
		ap := netip.MustParseAddrPort(testenv.StalledAddr(t))
		fd, connected, err := Start(ap)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		if connected {
			t.Fatal("a connect to a full accept queue completed")
		}
		if n, err := Write(fd, []byte("hello")); n != 0 || !errors.Is(err, unix.EAGAIN) {
			t.Fatalf("write while connecting = %d, %v; want EAGAIN", n, err)
		}
	})
	t.Run("refused", func(t *testing.T) {
		ln := listen(t)
		ap := ln.Addr().(*net.TCPAddr).AddrPort()
		ln.Close()
		fd, _, err := Start(ap)
		if errors.Is(err, unix.ECONNREFUSED) {
			return // refused by connect itself
		}
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		// Loopback answers the SYN within connect: the refusal is
		// there by the time it returns.
		if _, err := Write(fd, []byte("hello")); !errors.Is(err, unix.ECONNREFUSED) {
			t.Fatalf("write after a refused connect = %v, want ECONNREFUSED", err)
		}
	})
	t.Run("up", func(t *testing.T) {
		ln := listen(t)
		done := echoOnce(t, ln)
		ap := ln.Addr().(*net.TCPAddr).AddrPort()
		fd, _, err := Start(ap)
		if err != nil {
			t.Fatal(err)
		}
		c := NewConn(fd, ap)
		defer c.Close()
		if n, err := Write(fd, []byte("hello")); n != 5 || err != nil {
			t.Fatalf("write on a loopback connect = %d, %v", n, err)
		}
		got := make([]byte, 5)
		if _, err := io.ReadFull(c, got); err != nil || string(got) != "hello" {
			t.Fatalf("echo %q, %v", got, err)
		}
		_ = c.CloseWrite()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})
}
