package gateway

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/pires/go-proxyproto"
	"go.uber.org/zap"

	"github.com/tether-proxy/tether/pkg/proto"
	"github.com/tether-proxy/tether/pkg/ring"
)

// ProxyMode says how a Listener treats PROXY protocol headers.
type ProxyMode string

// PROXY protocol modes.
const (
	// ProxyRequire serves only peers in TrustedProxies that send a header
	// (tether proxies do, by default). Anything else is closed.
	ProxyRequire ProxyMode = "require"
	// ProxyOptional uses a header from a trusted peer when present, and
	// the TCP peer address otherwise; a header from any other peer is
	// refused, so a client cannot claim another address.
	ProxyOptional ProxyMode = "optional"
	// ProxyOff never reads a header (proxies run --proxy-protocol-out
	// off); the key then comes from the hello alone.
	ProxyOff ProxyMode = "off"
)

// KeyTLV is the PROXY v2 TLV type in which tether proxies send the session
// key (0xE0, in the range the PROXY spec leaves to applications).
const KeyTLV = proto.KeyTLV

// Defaults of Config.
const (
	// DefaultHandshakeTimeout bounds the PROXY header and the hello.
	DefaultHandshakeTimeout = 5 * time.Second
	// DefaultMaxPending bounds handshakes in flight: enough for a
	// reconnect storm of thousands of sessions arriving at once (each
	// costs a goroutine and an 8 KiB buffer until its hello is read, about
	// 16 KiB: 128 MiB at the bound).
	DefaultMaxPending = 8192
)

// Handshake outcomes, as given to Config.OnReject. Hello errors from
// package proto (proto.ErrBadHello and its variants) are reported as they
// are.
var (
	// ErrUntrustedProxy means a PROXY header (or, in ProxyRequire mode,
	// any connection) came from a peer outside TrustedProxies.
	ErrUntrustedProxy = errors.New("gateway: PROXY header from an untrusted peer")
	// ErrNoProxyHeader means ProxyRequire and the peer sent no header.
	ErrNoProxyHeader = errors.New("gateway: no PROXY header")
	// ErrBadProxyHeader means the PROXY header did not parse.
	ErrBadProxyHeader = errors.New("gateway: malformed PROXY header")
	// ErrNoKey means neither a key TLV nor a hello frame named a key.
	ErrNoKey = errors.New("gateway: no session key")
	// ErrKeyMismatch means the key TLV and the hello name different keys.
	ErrKeyMismatch = errors.New("gateway: PROXY key TLV and hello key differ")
	// ErrTimeout means the header and hello did not arrive within
	// HandshakeTimeout.
	ErrTimeout = errors.New("gateway: handshake timed out")
	// ErrOverloaded means MaxPending handshakes were already under way.
	ErrOverloaded = errors.New("gateway: too many pending handshakes")
)

// Config configures a Listener. The zero value is not usable: set
// TrustedProxies, or Proxy to ProxyOff.
type Config struct {
	// Proxy is how PROXY headers are read; "" means ProxyRequire.
	Proxy ProxyMode
	// TrustedProxies are the addresses (as prefixes) of the tether
	// proxies, whose PROXY headers are believed. Required unless Proxy is
	// ProxyOff.
	TrustedProxies []netip.Prefix
	// HandshakeTimeout bounds reading the PROXY header and the hello; 0
	// means DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// MaxHello bounds a hello frame's length field; 0 means
	// proto.DefaultMaxHello.
	MaxHello int
	// MaxPending bounds handshakes under way plus connections ready but
	// not yet taken by Accept; more are closed at once (ErrOverloaded). 0
	// means DefaultMaxPending.
	MaxPending int
	// KeylessHTTP serves HTTP requests that came without a key TLV (a
	// proxy running --proxy-protocol-out off, or no proxy at all): Key is
	// then empty and the application finds the session itself. Otherwise
	// they are closed with ErrNoKey.
	KeylessHTTP bool
	// KeepOlder turns newest-session-wins off: an older connection for
	// the same key stays open.
	KeepOlder bool
	// OnReplaced, if set, is called when a new connection for a key
	// replaces an older one still open, before the older one is reset and
	// before the new one is returned by Accept: the place to move state.
	// It runs in the new connection's handshake goroutine; keep it short.
	OnReplaced func(older, newer *Conn)
	// OnReject, if set, is called for every connection closed during the
	// handshake, with the reason (one of the errors above, or a
	// proto.ErrBadHello variant). For metrics; it must not block.
	OnReject func(peer net.Addr, err error)
	// Logger receives debug lines for rejected handshakes and an info line
	// per replaced session (with a key hash, never the key); nil means
	// none.
	Logger *zap.Logger
}

// Stats are a Listener's counters since it was created.
type Stats struct {
	// Accepted counts connections taken from the wrapped listener.
	Accepted uint64
	// Served counts connections returned by Accept.
	Served uint64
	// Rejected counts connections closed during the handshake.
	Rejected uint64
	// Replaced counts older sessions reset because a newer one for the
	// same key arrived.
	Replaced uint64
	// Open is the number of served connections not closed yet.
	Open int
}

// Listener accepts connections from tether proxies and returns them with
// their handshake done. It implements net.Listener; Accept's net.Conn is a
// *Conn. Safe for concurrent use.
type Listener struct {
	ln      net.Listener
	cfg     Config
	log     *zap.Logger
	ready   chan *Conn
	done    chan struct{}
	pending atomic.Int64
	wg      sync.WaitGroup
	once    sync.Once // Close
	stop    sync.Once // closes done
	errMu   sync.Mutex
	err     error // why the accept loop stopped

	accepted, served, rejected, replaced atomic.Uint64

	mu   sync.Mutex
	open map[string]*Conn // newest open connection per key
	all  int
}

var _ net.Listener = (*Listener)(nil)

// NewListener wraps ln. It starts accepting at once; Close stops it (and
// closes ln).
func NewListener(ln net.Listener, cfg Config) (*Listener, error) {
	if cfg.Proxy == "" {
		cfg.Proxy = ProxyRequire
	}
	switch cfg.Proxy {
	case ProxyRequire, ProxyOptional:
		if len(cfg.TrustedProxies) == 0 {
			return nil, fmt.Errorf("gateway: PROXY mode %s needs TrustedProxies (the tether proxies' addresses)", cfg.Proxy)
		}
	case ProxyOff:
	default:
		return nil, fmt.Errorf("gateway: PROXY mode %q: want require, optional or off", cfg.Proxy)
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.MaxHello <= 0 {
		cfg.MaxHello = proto.DefaultMaxHello
	}
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = DefaultMaxPending
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	cfg.TrustedProxies = append([]netip.Prefix(nil), cfg.TrustedProxies...)
	l := &Listener{ln: ln, cfg: cfg, log: cfg.Logger, ready: make(chan *Conn), done: make(chan struct{}), open: map[string]*Conn{}}
	l.wg.Add(1)
	go l.acceptLoop()
	return l, nil
}

// Accept returns the next connection whose handshake succeeded, as a
// *Conn. After Close it returns net.ErrClosed.
func (l *Listener) Accept() (net.Conn, error) { return l.AcceptConn() }

// AcceptConn is Accept with the concrete type.
func (l *Listener) AcceptConn() (*Conn, error) {
	select {
	case c := <-l.ready:
		l.pending.Add(-1)
		l.served.Add(1)
		return c, nil
	case <-l.done:
		l.errMu.Lock()
		defer l.errMu.Unlock()
		if l.err != nil {
			return nil, l.err
		}
		return nil, net.ErrClosed
	}
}

// Close stops accepting and closes the wrapped listener and every
// connection not yet returned by Accept. Connections already returned are
// the caller's. Idempotent.
func (l *Listener) Close() error {
	var err error
	l.once.Do(func() {
		l.stop.Do(func() { close(l.done) })
		err = l.ln.Close()
		l.wg.Wait()
	})
	return err
}

// Addr is the wrapped listener's address.
func (l *Listener) Addr() net.Addr { return l.ln.Addr() }

// Stats returns the listener's counters.
func (l *Listener) Stats() Stats {
	l.mu.Lock()
	open := l.all
	l.mu.Unlock()
	return Stats{Accepted: l.accepted.Load(), Served: l.served.Load(), Rejected: l.rejected.Load(), Replaced: l.replaced.Load(), Open: open}
}

// Open is the number of served connections not closed yet (what a drain
// waits for).
func (l *Listener) Open() int { return l.Stats().Open }

func (l *Listener) acceptLoop() {
	defer l.wg.Done()
	var backoff time.Duration
	for {
		raw, err := l.ln.Accept()
		if err != nil {
			select {
			case <-l.done:
				return
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || isTemporary(err) {
				// Out of descriptors and the like: keep serving.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				l.log.Warn("gateway: accept failed; backing off", zap.Error(err), zap.Duration("backoff", backoff))
				select {
				case <-time.After(backoff):
				case <-l.done:
					return
				}
				continue
			}
			l.errMu.Lock()
			l.err = err
			l.errMu.Unlock()
			l.stop.Do(func() { close(l.done) })
			return
		}
		backoff = 0
		l.accepted.Add(1)
		if l.pending.Add(1) > int64(l.cfg.MaxPending) {
			l.pending.Add(-1)
			l.reject(raw, ErrOverloaded)
			continue
		}
		l.wg.Add(1)
		go l.handshake(raw)
	}
}

// isTemporary reports accept errors worth retrying: the process or system
// is out of descriptors or buffers, or a connection died while queued.
func isTemporary(err error) bool {
	for _, e := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

func (l *Listener) handshake(raw net.Conn) {
	defer l.wg.Done()
	c, err := l.read(raw)
	if err != nil {
		l.pending.Add(-1)
		l.reject(raw, err)
		return
	}
	l.register(c)
	select {
	case l.ready <- c:
	case <-l.done:
		l.pending.Add(-1)
		c.abort()
	}
}

func (l *Listener) reject(raw net.Conn, err error) {
	l.rejected.Add(1)
	if ce := l.log.Check(zap.DebugLevel, "gateway: handshake failed; closing"); ce != nil {
		ce.Write(zap.String("peer", raw.RemoteAddr().String()), zap.Error(err))
	}
	if l.cfg.OnReject != nil {
		l.cfg.OnReject(raw.RemoteAddr(), err)
	}
	abortConn(raw)
}

// bufPool holds the handshake readers.
var bufPool = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 8192) }}

// read runs the handshake: PROXY header per mode, then the hello (or, for
// an HTTP request, nothing: its bytes stay for the application).
func (l *Listener) read(raw net.Conn) (*Conn, error) {
	if err := raw.SetReadDeadline(time.Now().Add(l.cfg.HandshakeTimeout)); err != nil {
		return nil, err
	}
	br := bufPool.Get().(*bufio.Reader)
	br.Reset(raw)
	defer func() { br.Reset(nil); bufPool.Put(br) }()
	if l.cfg.MaxHello+4 > br.Size() {
		br = bufio.NewReaderSize(raw, l.cfg.MaxHello+4)
	}
	c := &Conn{raw: raw, l: l, client: raw.RemoteAddr()}
	var tlvKey []byte
	if l.cfg.Proxy != ProxyOff {
		hdr, err := l.readHeader(raw, br)
		if err != nil {
			return nil, timeoutAs(err)
		}
		if hdr != nil {
			if hdr.Command.IsProxy() && hdr.SourceAddr != nil {
				c.client = hdr.SourceAddr
			}
			tlvKey = keyTLV(hdr)
		}
	}
	head, err := br.Peek(4)
	if err != nil {
		return nil, timeoutAs(err)
	}
	switch {
	case proto.IsHTTP(head):
		// An HTTP/WebSocket upgrade routed by header, cookie or query:
		// the key is the TLV's, and every byte stays for the app.
		if tlvKey == nil && !l.cfg.KeylessHTTP {
			return nil, ErrNoKey
		}
		c.key, c.http = string(tlvKey), true
	default:
		h, err := peekHello(br, l.cfg.MaxHello)
		switch {
		case err == nil:
			if tlvKey != nil && !bytes.Equal(tlvKey, h.Key) {
				return nil, ErrKeyMismatch
			}
			c.key, c.payload = string(h.Key), append([]byte(nil), h.Payload...)
			_, _ = br.Discard(h.FrameLen)
		case tlvKey != nil && !errors.Is(err, os.ErrDeadlineExceeded):
			// Not a hello (another --key-from on the proxy): the TLV
			// names the key and every byte stays for the app.
			c.key = string(tlvKey)
		default:
			return nil, timeoutAs(err)
		}
	}
	if n := br.Buffered(); n > 0 {
		c.pending = make([]byte, n)
		_, _ = br.Read(c.pending)
	}
	if err := raw.SetReadDeadline(time.Time{}); err != nil {
		return nil, err
	}
	return c, nil
}

// readHeader reads a PROXY header per the mode and the peer's trust; nil
// when there is none (allowed).
func (l *Listener) readHeader(raw net.Conn, br *bufio.Reader) (*proxyproto.Header, error) {
	trusted := l.trusted(raw.RemoteAddr())
	if !trusted && l.cfg.Proxy == ProxyRequire {
		return nil, ErrUntrustedProxy
	}
	if err := waitV1Line(br); err != nil {
		return nil, err
	}
	hdr, err := proxyproto.Read(br)
	switch {
	case errors.Is(err, proxyproto.ErrNoProxyProtocol):
		if l.cfg.Proxy == ProxyRequire {
			return nil, ErrNoProxyHeader
		}
		return nil, nil
	case err != nil && errors.Is(err, os.ErrDeadlineExceeded):
		return nil, err
	case err != nil:
		return nil, fmt.Errorf("%w: %w", ErrBadProxyHeader, err)
	case !trusted:
		return nil, ErrUntrustedProxy
	}
	return hdr, nil
}

// waitV1Line buffers a whole v1 PROXY line when the bytes start like one
// (go-proxyproto refuses a line that is not fully buffered).
func waitV1Line(br *bufio.Reader) error {
	sig := []byte("PROXY ")
	for n := 1; n <= 107; n++ {
		b, err := br.Peek(n)
		if err != nil {
			return err
		}
		if n <= len(sig) && b[n-1] != sig[n-1] {
			return nil // not a v1 line
		}
		if b[n-1] == '\n' {
			return nil
		}
	}
	return nil // too long: the parser says so
}

func (l *Listener) trusted(a net.Addr) bool {
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return false
	}
	ip := ap.Addr().Unmap()
	for _, p := range l.cfg.TrustedProxies {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// register makes c the newest connection for its key, replacing (and
// resetting) an older one unless KeepOlder.
func (l *Listener) register(c *Conn) {
	l.mu.Lock()
	if c.key == "" { // keyless HTTP: nothing to replace
		l.all++
		l.mu.Unlock()
		return
	}
	older := l.open[c.key]
	l.open[c.key] = c
	l.all++
	l.mu.Unlock()
	if older == nil || l.cfg.KeepOlder {
		return
	}
	if l.cfg.OnReplaced != nil {
		l.cfg.OnReplaced(older, c)
	}
	if older.abort() {
		l.replaced.Add(1)
		l.log.Info("newest session wins: reset the older session of this key",
			zap.String("key_hash", keyHash(c.key)), zap.String("older_client", older.client.String()),
			zap.String("newer_client", c.client.String()))
	}
}

// forget is a connection's close.
func (l *Listener) forget(c *Conn) {
	l.mu.Lock()
	if l.open[c.key] == c {
		delete(l.open, c.key)
	}
	l.all--
	l.mu.Unlock()
}

func peekHello(br *bufio.Reader, maxLen int) (proto.Hello, error) {
	for n := 4; ; {
		b, err := br.Peek(n)
		if err != nil {
			return proto.Hello{}, err
		}
		h, err := proto.ParseHello(b, maxLen)
		if !errors.Is(err, proto.ErrNeedMore) {
			return h, err
		}
		// The length field is known from here on: wait for the frame.
		n = max(n+1, 4+int(uint32(b[0])<<24|uint32(b[1])<<16|uint32(b[2])<<8|uint32(b[3])))
	}
}

func keyTLV(h *proxyproto.Header) []byte {
	tlvs, err := h.TLVs()
	if err != nil {
		return nil
	}
	for _, t := range tlvs {
		if t.Type == KeyTLV {
			return append([]byte(nil), t.Value...)
		}
	}
	return nil
}

func timeoutAs(err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%w: %w", ErrTimeout, err)
	}
	return err
}

// keyHash stands in for a key in logs: the same hash tether proxies log
// as key_hash, so one session can be followed across both.
func keyHash(k string) string { return ring.KeyHashHex([]byte(k)) }
