package proxy

import (
	"net"

	"golang.org/x/sys/unix"
)

// tcpClose is the kernel's TCP_CLOSE socket state (include/net/tcp_states.h),
// where a connection goes when it is reset or times out.
const tcpClose = 7

// peerGone reports whether c's TCP connection is already closed by the
// network (reset by the peer, or timed out): the side to blame when a
// session breaks. It costs one getsockopt, on error paths only.
func peerGone(c net.Conn) bool {
	tc := tcpOf(c)
	if tc == nil {
		return false
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return false
	}
	gone := false
	_ = rc.Control(func(fd uintptr) {
		info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
		gone = err == nil && info.State == tcpClose
	})
	return gone
}
