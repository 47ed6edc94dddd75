package proxy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"

	"github.com/pires/go-proxyproto"
	"go.uber.org/zap"
)

// ProxyInMode is how the proxy treats PROXY headers from its load
// balancer (--proxy-protocol-in).
type ProxyInMode string

// PROXY protocol modes for --proxy-protocol-in.
const (
	// ProxyInOff reads no PROXY header: the TCP peer is the client.
	ProxyInOff ProxyInMode = "off"
	// ProxyInOptional honours a header from a trusted peer when present;
	// a header from any other peer is rejected, a connection without one is
	// served with its TCP peer address.
	ProxyInOptional ProxyInMode = "optional"
	// ProxyInRequire serves only trusted peers that send a header; every
	// other connection is closed.
	ProxyInRequire ProxyInMode = "require"
)

// Handshake failure reasons for PROXY headers.
const (
	reasonHeaderUntrusted = "proxy_header_untrusted"
	reasonHeaderMissing   = "proxy_header_missing"
	reasonHeaderInvalid   = "proxy_header_invalid"
)

// ProxyProtocolListener wraps ln so PROXY headers are read per mode, only
// from peers inside trusted. Headers are read lazily on the first Read, never
// in Accept, so one slow peer cannot stall the accept loop; timeout bounds
// the read. Connections an untrusted peer opens in require mode are closed
// in Accept (zero bytes written), counted and logged at debug.
func ProxyProtocolListener(ln net.Listener, mode ProxyInMode, trusted []netip.Prefix, timeout time.Duration, m *Metrics, log *zap.Logger) (net.Listener, error) {
	switch mode {
	case ProxyInOff, "":
		return ln, nil
	case ProxyInOptional, ProxyInRequire:
	default:
		return nil, fmt.Errorf("proxy protocol in %q: want off, optional or require", mode)
	}
	if len(trusted) == 0 {
		return nil, fmt.Errorf("proxy protocol in %q needs trusted proxies (e.g. the load balancer's addresses)", mode)
	}
	if m == nil {
		m = NewMetrics(nil)
	}
	if log == nil {
		log = zap.NewNop()
	}
	isTrusted := func(a net.Addr) bool {
		ap, err := netip.ParseAddrPort(a.String())
		if err != nil {
			return false
		}
		ip := ap.Addr().Unmap()
		for _, p := range trusted {
			if p.Contains(ip) {
				return true
			}
		}
		return false
	}
	policy := func(o proxyproto.ConnPolicyOptions) (proxyproto.Policy, error) {
		switch {
		case isTrusted(o.Upstream) && mode == ProxyInRequire:
			return proxyproto.REQUIRE, nil
		case isTrusted(o.Upstream):
			return proxyproto.USE, nil
		case mode == ProxyInOptional:
			return proxyproto.REJECT, nil // a header from here is refused on first read
		}
		m.Rejected.WithLabelValues("untrusted_peer").Inc()
		if ce := log.Check(zap.DebugLevel, "closing connection from an untrusted peer (PROXY header required)"); ce != nil {
			ce.Write(zap.String("peer", o.Upstream.String()))
		}
		return proxyproto.REJECT, fmt.Errorf("%w: %s", proxyproto.ErrInvalidUpstream, o.Upstream)
	}
	return &proxyproto.Listener{Listener: ln, ConnPolicy: policy, ReadHeaderTimeout: timeout}, nil
}

// readProxyHeader makes a PROXY-aware connection read its header now (a
// zero-length read), so header problems are told apart from hello problems.
// A v1 header that arrives in pieces is waited for (go-proxyproto alone
// drops it), within the read deadline already set, which also bounds a
// header that stops half way: that is a timeout, not a missing header.
func readProxyHeader(c net.Conn, deadline time.Time) error {
	pc, ok := c.(*proxyproto.Conn)
	if !ok {
		return nil
	}
	if err := waitV1Line(pc.Raw()); err != nil {
		return err
	}
	_, err := pc.Read(nil)
	if errors.Is(err, proxyproto.ErrNoProxyProtocol) && !time.Now().Before(deadline) {
		return fmt.Errorf("%w: %w", os.ErrDeadlineExceeded, err)
	}
	return err
}

// v1Max is the longest PROXY v1 line, CRLF included.
const v1Max = 107

// waitV1Line waits, by peeking at the socket without consuming, until the
// bytes queued on c are either not the start of a v1 PROXY line, or hold
// its whole line (or more bytes than a line may have, which the parser
// rejects). Senders should write the header at once, but a header split
// over two segments is legal TCP and is served.
func waitV1Line(c net.Conn) error {
	tc := rawTCP(c)
	if tc == nil {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	var buf [v1Max]byte
	var perr error
	err = rc.Read(func(fd uintptr) bool {
		n, _, err := syscall.Recvfrom(int(fd), buf[:], syscall.MSG_PEEK)
		switch {
		case err == syscall.EAGAIN:
			return false // nothing yet: wait for readiness
		case err != nil:
			perr = err
			return true
		case n == 0:
			return true // EOF: the parser reports it
		}
		got := buf[:n]
		if !bytes.HasPrefix(got, v1Sig[:min(n, len(v1Sig))]) {
			return true // not a v1 header
		}
		return n == len(buf) || bytes.IndexByte(got, '\n') >= 0
	})
	if err != nil {
		return err // the read deadline, or a closed connection
	}
	return perr
}

// v1Sig starts every PROXY v1 line.
var v1Sig = []byte("PROXY ")

// headerReason labels a PROXY header failure.
func headerReason(err error) string {
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return reasonTimeout
	case errors.Is(err, proxyproto.ErrSuperfluousProxyHeader):
		return reasonHeaderUntrusted
	case errors.Is(err, proxyproto.ErrNoProxyProtocol):
		return reasonHeaderMissing
	case errors.Is(err, io.EOF):
		return reasonEOF
	default:
		return reasonHeaderInvalid
	}
}
