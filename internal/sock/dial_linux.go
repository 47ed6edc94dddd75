//go:build linux

package sock

import (
	"context"
	"net"
	"net/netip"
	"os"
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
	if e := setTCPOpt(fd, unix.TCP_NODELAY, 1); e != 0 {
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
	stop := context.AfterFunc(ctx, func() { _ = c.SetWriteDeadline(aLongTimeAgo) })
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

// Start begins a non-blocking connect to ap (TCP_NODELAY on, TCP_QUICKACK
// off, no keepalive) and returns the socket without waiting: connected
// reports whether connect said it was up at once. Usually it says "in
// progress" even on loopback, where the handshake has in fact completed by
// the time it returns: the caller then writes its first bytes, and the
// write tells (EAGAIN while still connecting, the connect's error if it
// failed); on EAGAIN it waits for the socket to become writable and asks
// Connected. With TCP_QUICKACK off the handshake's last ACK waits for
// those first bytes and leaves with them, as HAProxy's tcp-smart-connect
// does. The caller owns fd: NewConn wraps it, Close drops it.
func Start(ap netip.AddrPort) (fd int, connected bool, err error) {
	ip := ap.Addr().Unmap()
	family := unix.AF_INET
	if ip.Is6() {
		family = unix.AF_INET6
	}
	addr := ap.String()
	sfd, _, e := unix.RawSyscall(unix.SYS_SOCKET, uintptr(family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if e != 0 {
		return -1, false, opError("socket", addr, e)
	}
	if e := setTCPOpt(sfd, unix.TCP_NODELAY, 1); e != 0 {
		_ = Close(int(sfd))
		return -1, false, opError("setsockopt", addr, e)
	}
	_ = setTCPOpt(sfd, unix.TCP_QUICKACK, 0)
	var sa sockaddr
	salen := sa.set(ip, ap.Port())
	switch e := connect(sfd, &sa, salen); e {
	case 0, unix.EISCONN:
		return int(sfd), true, nil
	case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
		return int(sfd), false, nil
	default:
		_ = Close(int(sfd))
		return -1, false, opError("connect", addr, e)
	}
}

// Connected reports how a connect that Start left in progress ended, once
// its socket is writable (or reported an error): nil when it is up.
func Connected(fd int, ap netip.AddrPort) error {
	v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err == nil && v != 0 {
		err = syscall.Errno(v)
	}
	if err != nil {
		return opError("connect", ap.String(), err)
	}
	return nil
}

// Accept takes one connection from the listening socket lfd without
// waiting (unix.EAGAIN when there is none) and returns it non-blocking,
// with its peer's address. It sets no option: a connection has the
// listener's options as they were when the kernel created it (Linux copies
// them), which is how the event loop gives every client TCP_NODELAY and
// keepalive without a system call per connection.
func Accept(lfd int) (int, netip.AddrPort, error) {
	var rsa unix.RawSockaddrAny
	n := uint32(unix.SizeofSockaddrAny)
	r, _, e := unix.RawSyscall6(unix.SYS_ACCEPT4, uintptr(lfd), uintptr(unsafe.Pointer(&rsa)), uintptr(unsafe.Pointer(&n)), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
	if e != 0 {
		return -1, netip.AddrPort{}, e
	}
	return int(r), addrPort(&rsa), nil
}

// AcceptQueueLen is how many connections wait in the accept queue of the
// listening socket lfd (a listener's TCP_INFO tcpi_unacked).
func AcceptQueueLen(lfd int) (int, error) {
	info, err := unix.GetsockoptTCPInfo(lfd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0, os.NewSyscallError("getsockopt", err)
	}
	return int(info.Unacked), nil
}

// SetNoDelay turns TCP_NODELAY on for fd.
func SetNoDelay(fd int) error {
	if e := setTCPOpt(uintptr(fd), unix.TCP_NODELAY, 1); e != 0 {
		return os.NewSyscallError("setsockopt", e)
	}
	return nil
}

// HasNoDelay reports whether fd has TCP_NODELAY on.
func HasNoDelay(fd int) bool {
	v, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY)
	return err == nil && v != 0
}

// addrPort converts a raw IPv4 or IPv6 socket address.
func addrPort(rsa *unix.RawSockaddrAny) netip.AddrPort {
	switch rsa.Addr.Family {
	case unix.AF_INET:
		s4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		return netip.AddrPortFrom(netip.AddrFrom4(s4.Addr), ntohs(s4.Port))
	case unix.AF_INET6:
		s6 := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
		return netip.AddrPortFrom(netip.AddrFrom16(s6.Addr), ntohs(s6.Port))
	}
	return netip.AddrPort{}
}

func ntohs(p uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(&p))
	return uint16(b[0])<<8 | uint16(b[1])
}

// SetKeepAlive applies ka to a socket as net.ListenConfig's KeepAliveConfig
// does for accepted connections; a zero ka leaves keepalive off.
func SetKeepAlive(fd int, ka net.KeepAliveConfig) error {
	for _, o := range keepAliveOpts(ka) {
		if err := unix.SetsockoptInt(fd, o[0], o[1], o[2]); err != nil {
			return os.NewSyscallError("setsockopt", err)
		}
	}
	return nil
}

// HasKeepAlive reports whether fd already has keepalive as SetKeepAlive(fd, ka)
// would set it — on a connection accepted from a listener that had the
// options, Linux copies them — so the caller can skip the four calls. With
// ka off there is nothing to set, and the answer is true.
func HasKeepAlive(fd int, ka net.KeepAliveConfig) bool {
	for _, o := range keepAliveOpts(ka) {
		if v, err := unix.GetsockoptInt(fd, o[0], o[1]); err != nil || v != o[2] {
			return false
		}
	}
	return true
}

// keepAliveOpts are the socket options (level, name, value) that give a
// socket ka; none when it is off.
func keepAliveOpts(ka net.KeepAliveConfig) [][3]int {
	if !ka.Enable {
		return nil
	}
	opts := [][3]int{{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1}}
	if ka.Idle > 0 {
		opts = append(opts, [3]int{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, int(max(ka.Idle/time.Second, 1))})
	}
	if ka.Interval > 0 {
		opts = append(opts, [3]int{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, int(max(ka.Interval/time.Second, 1))})
	}
	if ka.Count > 0 {
		opts = append(opts, [3]int{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, ka.Count})
	}
	return opts
}
