package proxy

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
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
// side. A buffer is taken from the pool only while bytes move: reading a
// plain TCP source first waits until it is readable without one, so an
// idle direction holds none (a TLS source must be read into one).
func copyUser(dst, src net.Conn) (int64, error) {
	var rc syscall.RawConn
	if tc := rawTCP(src); tc != nil {
		rc, _ = tc.SyscallConn()
	}
	var total int64
	for {
		if rc != nil {
			if err := waitReadable(rc); err != nil {
				return total, err
			}
		}
		bp := copyBufs.Get().(*[]byte)
		n, rerr := src.Read(*bp)
		var werr error
		if n > 0 {
			var m int
			m, werr = dst.Write((*bp)[:n])
			total += int64(m)
		}
		copyBufs.Put(bp)
		switch {
		case werr != nil:
			return total, werr
		case errors.Is(rerr, io.EOF):
			return total, nil
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

// isTLS reports whether c is a TLS connection.
func isTLS(c net.Conn) bool {
	_, ok := c.(*tls.Conn)
	return ok
}

// tcpOf finds the TCP connection under c, below TLS too (for resets,
// half-closes and blame; never for splicing).
func tcpOf(c net.Conn) *net.TCPConn {
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
