package proxy

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// TLS termination (Config.TLS): the listener's connections are TLS; the
// key extractors read the decrypted bytes and the gateway gets cleartext
// (with the PROXY v2 header as usual). A TLS session cannot be spliced in
// the kernel or parked (its bytes must be decrypted in user space), so it
// keeps a goroutine per direction copying through pooled buffers, and it
// is not handed over by a SIGUSR2 upgrade (its keys live in this process):
// it stays in the old process until it ends or --upgrade-timeout.

// Handshake failure reasons of TLS listeners.
const (
	// reasonTLS: the first byte on a TLS listener was not a TLS record
	// (a cleartext client on the TLS port).
	reasonTLS = "tls"
	// reasonTLSHandshake: the TLS handshake failed (no shared version or
	// cipher, bad SNI, a broken client).
	reasonTLSHandshake = "tls_handshake"
)

// errNotTLS is a cleartext client on a TLS listener.
var errNotTLS = errors.New("proxy: not a TLS client hello on a TLS listener")

// errTLSHandshake wraps a failed TLS handshake.
var errTLSHandshake = errors.New("proxy: TLS handshake failed")

// tlsRecordHandshake is the first byte of every TLS client hello record.
const tlsRecordHandshake = 0x16

// startTLS runs the TLS handshake on c within deadline (the handshake
// deadline covers TLS and the hello). Anything but a TLS record first is
// errNotTLS, and nothing has been written to the client then.
func (s *Server) startTLS(c net.Conn, deadline time.Time) (*tls.Conn, error) {
	var first [1]byte
	if _, err := io.ReadFull(c, first[:]); err != nil {
		return nil, err
	}
	if first[0] != tlsRecordHandshake {
		return nil, errNotTLS
	}
	if err := c.SetWriteDeadline(deadline); err != nil {
		return nil, err
	}
	tc := tls.Server(&prefixConn{Conn: c, first: first[0], pending: true}, s.cfg.TLS)
	if err := tc.Handshake(); err != nil {
		var ne net.Error
		if errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ne) && ne.Timeout() {
			return nil, fmt.Errorf("%w: %w", os.ErrDeadlineExceeded, err)
		}
		return nil, fmt.Errorf("%w: %w", errTLSHandshake, err)
	}
	if err := c.SetWriteDeadline(time.Time{}); err != nil {
		return nil, err
	}
	resumed := "false"
	if tc.ConnectionState().DidResume {
		resumed = "true"
	}
	s.m.TLSHandshakes.WithLabelValues(resumed).Inc()
	return tc, nil
}

// prefixConn gives back a byte already read before the rest of Conn.
type prefixConn struct {
	net.Conn
	first   byte
	pending bool
}

func (p *prefixConn) Read(b []byte) (int, error) {
	if p.pending && len(b) > 0 {
		b[0] = p.first
		p.pending = false
		return 1, nil
	}
	return p.Conn.Read(b)
}

// tlsReason labels a failed TLS start.
func tlsReason(err error) string {
	switch {
	case errors.Is(err, errNotTLS):
		return reasonTLS
	case errors.Is(err, errTLSHandshake):
		return reasonTLSHandshake
	}
	return keyReason(err)
}

// copyBufSize is the buffer of a user-space copy: one TLS record's
// plaintext.
const copyBufSize = 16 << 10

var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// copyUser moves src to dst through user space, for sessions with a TLS
// side. A buffer is taken from the pool only while bytes move: a plain TCP
// source is read inside RawConn.Read, which gives the buffer back before
// waiting for more, so an idle direction holds none (a TLS source must be
// read into one).
// Every write is added to meter as it happens.
func copyUser(dst, src net.Conn, idle time.Duration, meter *atomic.Int64) (int64, error) {
	if tc := rawTCP(src); tc != nil {
		if rc, err := tc.SyscallConn(); err == nil {
			return copyFromTCP(dst, rc, meter)
		}
	}
	return copyFromTLS(dst, src, idle, meter)
}

// copyFromTLS is copyUser from a TLS connection. A quiet source (no whole
// record for idle, --park-after: a TLS read timeout is not fatal, and a partial record
// stays buffered in the connection) gives its buffer back and waits for
// the socket to become readable: with no whole record buffered, new bytes
// are the only way forward.
func copyFromTLS(dst, src net.Conn, idle time.Duration, meter *atomic.Int64) (int64, error) {
	var raw syscall.RawConn
	if tc := tcpOf(src); tc != nil {
		raw, _ = tc.SyscallConn()
	}
	var total int64
	var bp *[]byte
	defer func() {
		if bp != nil {
			copyBufs.Put(bp)
		}
	}()
	deadline := time.Time{}
	for {
		if bp == nil {
			bp = copyBufs.Get().(*[]byte)
		}
		if raw != nil {
			if now := time.Now(); deadline.Sub(now) < idle/2 {
				deadline = now.Add(idle)
				if err := src.SetReadDeadline(deadline); err != nil {
					return total, err
				}
			}
		}
		n, rerr := src.Read(*bp)
		if n > 0 {
			m, werr := dst.Write((*bp)[:n])
			total += int64(m)
			meter.Add(int64(m))
			if werr != nil {
				return total, werr
			}
		}
		switch {
		case errors.Is(rerr, io.EOF):
			return total, nil
		case errors.Is(rerr, os.ErrDeadlineExceeded) && raw != nil && n == 0:
			copyBufs.Put(bp)
			bp = nil
			if err := src.SetReadDeadline(time.Time{}); err != nil {
				return total, err
			}
			deadline = time.Time{}
			if err := waitReadable(raw); err != nil {
				return total, err
			}
		case rerr != nil:
			return total, rerr
		}
	}
}

// waitReadable waits in Go's poller until the socket has bytes, EOF or an
// error, without consuming any (a peek: the poller is edge-triggered, so
// bytes already queued must be seen before waiting).
func waitReadable(rc syscall.RawConn) error {
	var b [1]byte
	return rc.Read(func(fd uintptr) bool {
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		return err != syscall.EAGAIN
	})
}

// copyFromTCP is copyUser from a plain TCP socket.
func copyFromTCP(dst net.Conn, rc syscall.RawConn, meter *atomic.Int64) (int64, error) {
	var total int64
	var bp *[]byte
	var n int
	var rerr error
	read := func(fd uintptr) bool {
		if bp == nil {
			bp = copyBufs.Get().(*[]byte)
		}
		for {
			n, rerr = syscall.Read(int(fd), *bp)
			if rerr != syscall.EINTR {
				break
			}
		}
		if rerr == syscall.EAGAIN {
			copyBufs.Put(bp) // nothing to read: wait without a buffer
			bp = nil
			return false
		}
		return true
	}
	for {
		if err := rc.Read(read); err != nil {
			if bp != nil {
				copyBufs.Put(bp)
			}
			return total, err
		}
		if rerr != nil || n <= 0 {
			copyBufs.Put(bp)
			return total, rerr // nil at EOF
		}
		m, werr := dst.Write((*bp)[:n])
		total += int64(m)
		meter.Add(int64(m))
		copyBufs.Put(bp)
		bp = nil
		if werr != nil {
			return total, werr
		}
	}
}

// isTLS reports whether c is a TLS connection.
func isTLS(c net.Conn) bool {
	_, ok := c.(*tls.Conn)
	return ok
}

// tcpOf finds the TCP connection under c, below TLS too (for resets,
// half-closes and blame; never for splicing).
func tcpOf(c net.Conn) tcpSocket {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
		if p, ok := c.(*prefixConn); ok {
			c = p.Conn
		}
	}
	return rawTCP(c)
}

// closeWrite half-closes c: for TLS a close_notify alert, then the TCP FIN.
func closeWrite(c net.Conn) error {
	if tc, ok := c.(*tls.Conn); ok {
		if err := tc.CloseWrite(); err != nil {
			return err
		}
	}
	if tc := tcpOf(c); tc != nil {
		return tc.CloseWrite()
	}
	return errors.New("not TCP")
}

// gatewayTLS runs the TLS handshake with a gateway at addr, verifying its
// certificate for addr's host, within the handshake deadline.
func (s *Server) gatewayTLS(gw net.Conn, addr string) (*tls.Conn, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	cfg := s.cfg.GatewayTLS.Clone()
	cfg.ServerName = host
	tc := tls.Client(gw, cfg)
	if err := gw.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout)); err != nil {
		return nil, err
	}
	if err := tc.Handshake(); err != nil {
		return nil, err
	}
	return tc, gw.SetDeadline(time.Time{})
}
