package proxy

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/pires/go-proxyproto"
	"go.uber.org/zap"
)

// PROXY protocol modes for --proxy-protocol-in.
const (
	// ProxyInOff reads no PROXY header: the TCP peer is the client.
	ProxyInOff = "off"
	// ProxyInOptional honours a header from a trusted peer when present;
	// a header from any other peer is rejected, a connection without one is
	// served with its TCP peer address.
	ProxyInOptional = "optional"
	// ProxyInRequire serves only trusted peers that send a header; every
	// other connection is closed.
	ProxyInRequire = "require"
)

// Handshake failure reasons for PROXY headers.
const (
	reasonHeaderUntrusted = "proxy_header_untrusted"
	reasonHeaderMissing   = "proxy_header_missing"
	reasonHeaderInvalid   = "proxy_header_invalid"
)

// ParsePrefixes parses --trusted-proxies: comma-separated CIDRs or single
// addresses.
func ParsePrefixes(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		if !strings.Contains(part, "/") {
			a, err := netip.ParseAddr(part)
			if err != nil {
				return nil, fmt.Errorf("trusted proxy %q: %w", part, err)
			}
			out = append(out, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
			continue
		}
		p, err := netip.ParsePrefix(part)
		if err != nil {
			return nil, fmt.Errorf("trusted proxy %q: %w", part, err)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// ProxyProtocolListener wraps ln so PROXY headers are read per mode, only
// from peers inside trusted. Headers are read lazily on the first Read, never
// in Accept, so one slow peer cannot stall the accept loop; timeout bounds
// the read. Connections an untrusted peer opens in require mode are closed
// in Accept (zero bytes written), counted and logged at debug.
func ProxyProtocolListener(ln net.Listener, mode string, trusted []netip.Prefix, timeout time.Duration, m *Metrics, log *zap.Logger) (net.Listener, error) {
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
func readProxyHeader(c net.Conn) error {
	pc, ok := c.(*proxyproto.Conn)
	if !ok {
		return nil
	}
	_, err := pc.Read(nil)
	return err
}

// headerReason labels a PROXY header failure.
func headerReason(err error) string {
	switch {
	case errors.Is(err, proxyproto.ErrSuperfluousProxyHeader):
		return reasonHeaderUntrusted
	case errors.Is(err, proxyproto.ErrNoProxyProtocol):
		return reasonHeaderMissing
	case errors.Is(err, os.ErrDeadlineExceeded):
		return reasonTimeout
	case errors.Is(err, io.EOF):
		return reasonEOF
	default:
		return reasonHeaderInvalid
	}
}
