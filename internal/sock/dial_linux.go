//go:build linux

package sock

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Dial connects to addr ("IP:port"; network "tcp", "tcp4" or "tcp6") with
// TCP_NODELAY on and no keepalive, like net.Dialer{KeepAlive: -1}, for a
// fraction of its system calls and allocations: the socket, its option and
// the connect are raw system calls, the connection is registered once in
// Go's poller, and neither address is asked of the kernel. A loopback or
// LAN connect has usually completed by the time connect returns, so the
// dial seldom waits at all. Host names are resolved by net.Dialer.
func Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || (network != "tcp" && network != "tcp4" && network != "tcp6") {
		return fallback.DialContext(ctx, network, addr)
	}
	ip := ap.Addr().Unmap()
	family := unix.AF_INET
	if ip.Is6() {
		family = unix.AF_INET6
	}
	fd, _, e := unix.RawSyscall(unix.SYS_SOCKET, uintptr(family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if e != 0 {
		return nil, opError("socket", addr, e)
	}
	one := int32(1)
	if _, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, uintptr(unsafe.Pointer(&one)), 4, 0); e != 0 {
		unix.Close(int(fd))
		return nil, opError("setsockopt", addr, e)
	}
	var sa sockaddr
	salen := sa.set(ip, ap.Port())
	switch e := connect(fd, &sa, salen); e {
	case 0, unix.EISCONN:
		return newConn(fd, ap), nil
	case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
	default:
		unix.Close(int(fd))
		return nil, opError("connect", addr, e)
	}
	// Still connecting: wait in Go's poller until the socket is writable.
	c := newConn(fd, ap)
	// The context's end (deadline or cancel) interrupts the wait.
	stop := context.AfterFunc(ctx, func() { _ = c.f.SetWriteDeadline(aLongTimeAgo) })
	var cerr error
	err = c.rc.Write(func(fd uintptr) bool {
		switch e := connect(fd, &sa, salen); e {
		case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
			return false
		case 0, unix.EISCONN:
			cerr = nil
		default:
			cerr = e
		}
		return true
	})
	if !stop() {
		err = ctx.Err() // it ended while connecting (maybe just after)
	}
	if err == nil {
		err = cerr
	}
	if err != nil {
		c.Close()
		return nil, opError("connect", addr, err)
	}
	return c, nil
}

var fallback = &net.Dialer{KeepAlive: -1}

// aLongTimeAgo is a deadline in the past: it interrupts a waiting dial.
var aLongTimeAgo = time.Unix(1, 0)

func opError(op, addr string, err error) error {
	if e, ok := err.(syscall.Errno); ok {
		err = os.NewSyscallError(op, e)
	}
	return &net.OpError{Op: "dial", Net: "tcp", Addr: tcpAddr(addr), Err: err}
}

// tcpAddr is a net.Addr for an address string that already parsed.
type tcpAddr string

func (a tcpAddr) Network() string { return "tcp" }
func (a tcpAddr) String() string  { return string(a) }

// sockaddr holds a raw IPv4 or IPv6 socket address.
type sockaddr struct {
	raw unix.RawSockaddrInet6 // large enough for either
}

func (sa *sockaddr) set(ip netip.Addr, port uint16) uintptr {
	if ip.Is4() {
		s4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(&sa.raw))
		s4.Family = unix.AF_INET
		s4.Port = htons(port)
		s4.Addr = ip.As4()
		return unix.SizeofSockaddrInet4
	}
	sa.raw.Family = unix.AF_INET6
	sa.raw.Port = htons(port)
	sa.raw.Addr = ip.As16()
	return unix.SizeofSockaddrInet6
}

// htons puts port in network byte order in memory, whatever the host's.
func htons(port uint16) uint16 {
	b := [2]byte{byte(port >> 8), byte(port)}
	return *(*uint16)(unsafe.Pointer(&b))
}

func connect(fd uintptr, sa *sockaddr, n uintptr) syscall.Errno {
	_, _, e := unix.RawSyscall(unix.SYS_CONNECT, fd, uintptr(unsafe.Pointer(sa)), n)
	return e
}

// Conn is a TCP connection made by Dial. Besides net.Conn it has what
// *net.TCPConn has and a proxy needs: SyscallConn, CloseWrite, SetLinger.
//
// Its errors are net's: a *net.OpError around the system call's error, and
// net.ErrClosed (not os.ErrClosed) once it is closed, so callers cannot
// tell it from a *net.TCPConn by its errors.
type Conn struct {
	f      *os.File
	rc     rawConn
	raddr  netip.AddrPort
	laddr  atomic.Pointer[net.TCPAddr]
	closed atomic.Bool
}

func newConn(fd uintptr, raddr netip.AddrPort) *Conn {
	f := os.NewFile(fd, "")
	c := &Conn{f: f, raddr: raddr}
	c.rc.c = c
	c.rc.rc, _ = f.SyscallConn()
	return c
}

// Read reads from the connection.
func (c *Conn) Read(b []byte) (int, error) {
	n, err := c.f.Read(b)
	if err != nil && err != io.EOF {
		err = c.opError("read", err)
	}
	return n, err
}

// Write writes to the connection.
func (c *Conn) Write(b []byte) (int, error) {
	n, err := c.f.Write(b)
	if err != nil {
		err = c.opError("write", err)
	}
	return n, err
}

// Close closes the connection.
func (c *Conn) Close() error {
	if c.closed.Swap(true) {
		return c.opError("close", net.ErrClosed)
	}
	if err := c.f.Close(); err != nil {
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
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}

// rawConn is the socket's syscall.RawConn with net's error once closed.
type rawConn struct {
	c  *Conn
	rc syscall.RawConn
}

func (r *rawConn) Control(f func(fd uintptr)) error { return r.err(r.rc.Control(f)) }
func (r *rawConn) Read(f func(fd uintptr) bool) error {
	return r.err(r.rc.Read(f))
}
func (r *rawConn) Write(f func(fd uintptr) bool) error {
	return r.err(r.rc.Write(f))
}

// err maps the poller's "use of closed file" to net.ErrClosed.
func (r *rawConn) err(err error) error {
	if err != nil && r.c.closed.Load() {
		return net.ErrClosed
	}
	return err
}

// SetDeadline sets the read and write deadlines.
func (c *Conn) SetDeadline(t time.Time) error { return c.f.SetDeadline(t) }

// SetReadDeadline sets the read deadline.
func (c *Conn) SetReadDeadline(t time.Time) error { return c.f.SetReadDeadline(t) }

// SetWriteDeadline sets the write deadline.
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.f.SetWriteDeadline(t) }

// SyscallConn gives raw access to the socket, waits in Go's poller included.
func (c *Conn) SyscallConn() (syscall.RawConn, error) { return &c.rc, nil }

// RemoteAddr is the address dialed.
func (c *Conn) RemoteAddr() net.Addr { return net.TCPAddrFromAddrPort(c.raddr) }

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
	return c.control("shutdown", func(fd int) error { return unix.Shutdown(fd, unix.SHUT_WR) })
}

// SetLinger is net.TCPConn.SetLinger: 0 makes Close send a reset.
func (c *Conn) SetLinger(sec int) error {
	l := unix.Linger{}
	if sec >= 0 {
		l.Onoff, l.Linger = 1, int32(sec)
	}
	return c.control("setsockopt", func(fd int) error { return unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &l) })
}

// control runs the system call op (f) on the socket.
func (c *Conn) control(op string, f func(fd int) error) error {
	var err error
	if cerr := c.rc.Control(func(fd uintptr) { err = f(int(fd)) }); cerr != nil {
		return cerr
	}
	if err != nil {
		return os.NewSyscallError(op, err)
	}
	return nil
}
