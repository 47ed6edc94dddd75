//go:build linux

package sock

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The system calls of an event loop are raw (unix.RawSyscall): none of them
// ever sleeps (the descriptors are non-blocking, a close never lingers), so
// the goroutine keeps its P. Through unix.Syscall, one that runs long — a
// loopback close or connect does the peer's TCP work too — lets Go's sysmon
// take the P away and start another thread, and keeps sysmon itself waking
// every 20 µs to look: context switches that cost a connection-rate
// benchmark more than the calls themselves.

// Close closes fd.
func Close(fd int) error {
	if _, _, e := unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0); e != 0 {
		return e
	}
	return nil
}

// EpollCtl is epoll_ctl(2).
func EpollCtl(epfd, op, fd int, ev *unix.EpollEvent) error {
	if _, _, e := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(epfd), uintptr(op), uintptr(fd), uintptr(unsafe.Pointer(ev)), 0, 0); e != 0 {
		return e
	}
	return nil
}

// EpollWaitNow is epoll_wait(2) with a zero timeout: it never waits.
func EpollWaitNow(epfd int, events []unix.EpollEvent) (int, error) {
	if len(events) == 0 {
		return 0, nil
	}
	r, _, e := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

// Write is write(2) on a non-blocking descriptor.
func Write(fd int, b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	r, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

// setTCPOpt sets the IPPROTO_TCP option opt of fd to v.
func setTCPOpt(fd uintptr, opt int, v int32) syscall.Errno {
	_, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, fd, unix.IPPROTO_TCP, uintptr(opt), uintptr(unsafe.Pointer(&v)), 4, 0)
	return e
}

// SetNotSentLowat sets TCP_NOTSENT_LOWAT on fd to n: the socket takes more
// bytes, and reports itself writable, only while fewer than n of the bytes
// it holds are still unsent. A sender that keeps refilling it then holds a
// short queue instead of a send buffer's worth of data nobody has sent yet.
func SetNotSentLowat(fd, n int) error {
	if e := setTCPOpt(uintptr(fd), unix.TCP_NOTSENT_LOWAT, int32(n)); e != 0 {
		return e
	}
	return nil
}

// SetLinger sets SO_LINGER on fd: sec < 0 turns it off, 0 makes a close
// send a reset.
func SetLinger(fd, sec int) error {
	l := unix.Linger{}
	if sec >= 0 {
		l.Onoff, l.Linger = 1, int32(sec)
	}
	if _, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_LINGER, uintptr(unsafe.Pointer(&l)), unsafe.Sizeof(l), 0); e != 0 {
		return e
	}
	return nil
}

// shutdownWrite is shutdown(fd, SHUT_WR).
func shutdownWrite(fd int) error {
	if _, _, e := unix.RawSyscall(unix.SYS_SHUTDOWN, uintptr(fd), unix.SHUT_WR, 0); e != 0 {
		return e
	}
	return nil
}
