//go:build linux

package sock

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Conn is a TCP connection made by Dial, or by NewConn around a socket the
// caller opened. Besides net.Conn it has what *net.TCPConn has and a proxy
// needs: SyscallConn, CloseWrite, SetLinger.
//
// A Conn from NewConn enters Go's poller only when something must wait on
// it (Read, Write, a deadline, RawConn.Read or Write); until then Control,
// CloseWrite, SetLinger, WriteNow and Close are plain system calls. A proxy
// whose own event loop watches its sockets thus pays for no poller
// registration, no finalizer and no poller bookkeeping per connection.
//
// Its errors are net's: a *net.OpError around the system call's error, and
// net.ErrClosed (not os.ErrClosed) once it is closed, so callers cannot
// tell it from a *net.TCPConn by its errors.
type Conn struct {
	fd int // the socket; once registered, reg.f owns it
	// mu guards the unregistered socket: Control holds it shared while
	// it uses fd, Close and registration hold it alone, so fd is never
	// closed (and its number reused) under a Control.
	mu     sync.RWMutex
	reg    atomic.Pointer[registered] // nil until registered in Go's poller
	rc     rawConn
	raddr  netip.AddrPort
	laddr  atomic.Pointer[net.TCPAddr]
	closed atomic.Bool
}

// registered is the socket once it is in Go's poller.
type registered struct {
	f  *os.File
	rc syscall.RawConn
}

// NewConn wraps a connected, non-blocking TCP socket whose peer is raddr.
// The Conn owns fd from now on (Close closes it).
func NewConn(fd int, raddr netip.AddrPort) *Conn {
	c := &Conn{fd: fd, raddr: raddr}
	c.rc.c = c
	return c
}

// newConn wraps a socket and registers it in Go's poller at once (a dial
// that is about to wait on it).
func newConn(fd uintptr, raddr netip.AddrPort) *Conn {
	c := NewConn(int(fd), raddr)
	_, _ = c.registered()
	return c
}

// registered registers the socket in Go's poller on first use.
func (c *Conn) registered() (*registered, error) {
	if r := c.reg.Load(); r != nil {
		return r, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if r := c.reg.Load(); r != nil {
		return r, nil
	}
	if c.closed.Load() {
		return nil, net.ErrClosed
	}
	f := os.NewFile(uintptr(c.fd), "")
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err // not reached: *os.File always has one
	}
	r := &registered{f: f, rc: rc}
	c.reg.Store(r)
	return r, nil
}

// Read reads from the connection.
func (c *Conn) Read(b []byte) (int, error) {
	r, err := c.registered()
	if err != nil {
		return 0, c.opError("read", err)
	}
	n, err := r.f.Read(b)
	if err != nil && err != io.EOF {
		err = c.opError("read", err)
	}
	return n, err
}

// Write writes to the connection.
func (c *Conn) Write(b []byte) (int, error) {
	r, err := c.registered()
	if err != nil {
		return 0, c.opError("write", err)
	}
	n, err := r.f.Write(b)
	if err != nil {
		err = c.opError("write", err)
	}
	return n, err
}

// WriteNow writes what the socket takes now without waiting: it returns
// how much that was, and an error wrapping unix.EAGAIN if not all of b fit.
func (c *Conn) WriteNow(b []byte) (int, error) {
	if fd, ok := c.Hold(); ok {
		n, err := writeAll(fd, b)
		c.Unhold()
		if err != nil {
			return n, c.opError("write", os.NewSyscallError("write", err))
		}
		return n, nil
	}
	var n int
	err := c.controlRaw("write", func(fd int) error {
		var err error
		n, err = writeAll(fd, b)
		return err
	})
	if err != nil {
		return n, c.opError("write", err)
	}
	return n, nil
}

// writeAll writes b to the non-blocking fd until it is all written or
// the socket refuses more (unix.EAGAIN) or fails.
func writeAll(fd int, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := Write(fd, b[n:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return n, err
		}
		n += m
	}
	return n, nil
}

// Close closes the connection.
func (c *Conn) Close() error {
	if c.closed.Swap(true) {
		return c.opError("close", net.ErrClosed)
	}
	c.mu.Lock() // waits out a Control or a registration in progress
	r := c.reg.Load()
	var err error
	if r == nil {
		err = os.NewSyscallError("close", Close(c.fd))
	}
	c.mu.Unlock()
	if r != nil {
		err = r.f.Close()
	}
	if err != nil {
		return c.opError("close", err)
	}
	return nil
}

// opError dresses an os.File error as net's: *net.OpError around the
// system call error, net.ErrClosed once closed.
func (c *Conn) opError(op string, err error) error {
	var pe *os.PathError
	switch {
	case c.closed.Load() || errors.Is(err, os.ErrClosed):
		err = net.ErrClosed
	case errors.Is(err, os.ErrDeadlineExceeded):
		err = os.ErrDeadlineExceeded
	case errors.As(err, &pe):
		err = os.NewSyscallError(op, pe.Err)
	}
	e := &net.OpError{Op: op, Net: "tcp", Addr: c.RemoteAddr(), Err: err}
	if err == net.ErrClosed {
		// No getsockname on a closed socket: the address is known only
		// if it was asked for before.
		if a := c.laddr.Load(); a != nil {
			e.Source = a
		}
	} else {
		e.Source = c.LocalAddr()
	}
	return e
}

// rawConn is the socket's syscall.RawConn with net's error once closed;
// its waits register the socket in Go's poller first.
type rawConn struct{ c *Conn }

func (r *rawConn) Control(f func(fd uintptr)) error {
	c := r.c
	if reg := c.reg.Load(); reg != nil {
		return r.err(reg.rc.Control(f))
	}
	c.mu.RLock()
	if reg := c.reg.Load(); reg != nil {
		c.mu.RUnlock()
		return r.err(reg.rc.Control(f))
	}
	if c.closed.Load() {
		c.mu.RUnlock()
		return net.ErrClosed
	}
	f(uintptr(c.fd))
	c.mu.RUnlock()
	return nil
}

func (r *rawConn) Read(f func(fd uintptr) bool) error {
	reg, err := r.c.registered()
	if err != nil {
		return r.err(err)
	}
	return r.err(reg.rc.Read(f))
}

func (r *rawConn) Write(f func(fd uintptr) bool) error {
	reg, err := r.c.registered()
	if err != nil {
		return r.err(err)
	}
	return r.err(reg.rc.Write(f))
}

// err maps the poller's "use of closed file" to net.ErrClosed.
func (r *rawConn) err(err error) error {
	if err != nil && r.c.closed.Load() {
		return net.ErrClosed
	}
	return err
}

// SetDeadline sets the read and write deadlines.
func (c *Conn) SetDeadline(t time.Time) error {
	return c.deadline(func(f *os.File) error { return f.SetDeadline(t) })
}

// SetReadDeadline sets the read deadline.
func (c *Conn) SetReadDeadline(t time.Time) error {
	return c.deadline(func(f *os.File) error { return f.SetReadDeadline(t) })
}

// SetWriteDeadline sets the write deadline.
func (c *Conn) SetWriteDeadline(t time.Time) error {
	return c.deadline(func(f *os.File) error { return f.SetWriteDeadline(t) })
}

func (c *Conn) deadline(set func(*os.File) error) error {
	r, err := c.registered()
	if err != nil {
		return c.opError("set", err)
	}
	return set(r.f)
}

// SyscallConn gives raw access to the socket, waits in Go's poller included.
func (c *Conn) SyscallConn() (syscall.RawConn, error) { return &c.rc, nil }

// RemoteAddr is the peer's address (the address dialed).
func (c *Conn) RemoteAddr() net.Addr { return net.TCPAddrFromAddrPort(c.raddr) }

// RemoteAddrPort is RemoteAddr without an allocation.
func (c *Conn) RemoteAddrPort() netip.AddrPort { return c.raddr }

// LocalAddr asks the kernel for the local address on first use.
func (c *Conn) LocalAddr() net.Addr {
	if a := c.laddr.Load(); a != nil {
		return a
	}
	var a *net.TCPAddr
	_ = c.rc.Control(func(fd uintptr) {
		sa, err := unix.Getsockname(int(fd))
		if err != nil {
			return
		}
		switch sa := sa.(type) {
		case *unix.SockaddrInet4:
			a = &net.TCPAddr{IP: sa.Addr[:], Port: sa.Port}
		case *unix.SockaddrInet6:
			a = &net.TCPAddr{IP: sa.Addr[:], Port: sa.Port}
		}
	})
	if a == nil {
		return &net.TCPAddr{}
	}
	c.laddr.Store(a)
	return a
}

// CloseWrite shuts down the sending side (a FIN).
func (c *Conn) CloseWrite() error {
	return c.control("shutdown", shutdownWrite)
}

// SetLinger is net.TCPConn.SetLinger: 0 makes Close send a reset.
func (c *Conn) SetLinger(sec int) error {
	// Held here, not by control: the closure over sec would escape
	// through control's RawConn path and cost an allocation per call.
	if fd, ok := c.Hold(); ok {
		err := SetLinger(fd, sec)
		c.Unhold()
		return syscallError("setsockopt", err)
	}
	return c.controlRaw("setsockopt", func(fd int) error { return SetLinger(fd, sec) })
}

// Hold pins the descriptor of a Conn that is not in Go's poller, so a
// caller can make a system call on it without a closure (RawConn.Control
// takes one, and it escapes to the heap: several allocations per call on a
// path that runs per connection). ok is false, and nothing is held, once
// the Conn is closed or registered; the caller then goes through
// SyscallConn. Otherwise fd stays open until Unhold, which must follow
// soon: Close waits for it.
func (c *Conn) Hold() (fd int, ok bool) {
	c.mu.RLock()
	if c.reg.Load() != nil || c.closed.Load() {
		c.mu.RUnlock()
		return -1, false
	}
	return c.fd, true
}

// Unhold releases a Hold that succeeded.
func (c *Conn) Unhold() { c.mu.RUnlock() }

// control runs the system call op (f) on the socket: on the held
// descriptor when it can be held, else through its RawConn. f should be a
// plain function, not a closure: it escapes through the RawConn path.
func (c *Conn) control(op string, f func(fd int) error) error {
	if fd, ok := c.Hold(); ok {
		err := f(fd)
		c.Unhold()
		return syscallError(op, err)
	}
	return c.controlRaw(op, f)
}

// controlRaw is control through the RawConn (a separate function so the
// held path does not pay for the closure's captured error).
func (c *Conn) controlRaw(op string, f func(fd int) error) error {
	var err error
	if cerr := c.rc.Control(func(fd uintptr) { err = f(int(fd)) }); cerr != nil {
		return cerr
	}
	return syscallError(op, err)
}

// syscallError is os.NewSyscallError without the interface conversion of
// a nil errno.
func syscallError(op string, err error) error {
	if err == nil {
		return nil
	}
	return os.NewSyscallError(op, err)
}
