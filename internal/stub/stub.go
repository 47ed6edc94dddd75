// Package stub is the reference gateway, used by cmd/gateway-stub and by
// every test: a small application on pkg/gateway that answers each session
// with one JSON frame saying who it is and what it saw, then echoes.
package stub

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/tether-proxy/tether/pkg/client"
	"github.com/tether-proxy/tether/pkg/gateway"
	"github.com/tether-proxy/tether/pkg/proto"
)

// PROXY protocol modes for Config.ProxyProtocol.
const (
	ProxyOff      = string(gateway.ProxyOff)
	ProxyOptional = string(gateway.ProxyOptional)
	ProxyRequire  = string(gateway.ProxyRequire)
)

// MaxReply bounds a reply frame a client will accept.
const MaxReply = client.MaxReply

// Reply is the JSON the stub answers after the hello.
type Reply = client.Reply

// ReadReply reads one reply frame; see client.ReadReply.
func ReadReply(r io.Reader) (Reply, []byte, error) { return client.ReadReply(r) }

// DefaultTrusted are the PROXY header sources the stub believes when
// Config.TrustedProxies is empty: this host only.
var DefaultTrusted = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}

// Config configures a Server.
type Config struct {
	// ID is the gateway ID reported in replies; required.
	ID string
	// ProxyProtocol is off, optional or require; "" means optional.
	ProxyProtocol string
	// TrustedProxies are the peers whose PROXY headers are believed; empty
	// means DefaultTrusted.
	TrustedProxies []netip.Prefix
	// HandshakeTimeout bounds reading the PROXY header and hello; 0 means
	// 5s.
	HandshakeTimeout time.Duration
	// MaxHello bounds the hello frame length; 0 means
	// proto.DefaultMaxHello.
	MaxHello int
	// EchoBuffer, when > 0, echoes through a user-space buffer of this
	// size instead of splice(2). Go's splice path holds a pipe (two
	// descriptors) per blocked direction, so an echo server holding many
	// idle sessions (benchmarks) fits more of them in its open-file limit
	// with a small buffer. 0 means splice.
	EchoBuffer int
	// KeepOlder turns newest-session-wins off (see pkg/gateway).
	KeepOlder bool
	// Logger; nil means none.
	Logger *zap.Logger
}

// Server is a running gateway stub.
type Server struct {
	cfg   Config
	log   *zap.Logger
	mu    sync.Mutex
	conns map[string]int
	open  map[net.Conn]struct{}
	lns   map[*gateway.Listener]struct{}
	wg    sync.WaitGroup
	done  bool

	httpOnce sync.Once
	httpLn   *oneConnListener
	httpSrv  *http.Server
}

// New checks cfg and returns a Server.
func New(cfg Config) (*Server, error) {
	if cfg.ID == "" {
		return nil, errors.New("stub: empty gateway id")
	}
	switch cfg.ProxyProtocol {
	case "":
		cfg.ProxyProtocol = ProxyOptional
	case ProxyOff, ProxyOptional, ProxyRequire:
	default:
		return nil, fmt.Errorf("stub: proxy protocol %q: want off, optional or require", cfg.ProxyProtocol)
	}
	if len(cfg.TrustedProxies) == 0 {
		cfg.TrustedProxies = DefaultTrusted
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 5 * time.Second
	}
	if cfg.MaxHello <= 0 {
		cfg.MaxHello = proto.DefaultMaxHello
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	return &Server{cfg: cfg, log: cfg.Logger, conns: map[string]int{},
		open: map[net.Conn]struct{}{}, lns: map[*gateway.Listener]struct{}{}}, nil
}

// Serve accepts on ln until Shutdown, reading PROXY headers per the
// configured mode.
func (s *Server) Serve(ln net.Listener) error {
	gl, err := gateway.NewListener(ln, gateway.Config{
		Proxy:            gateway.ProxyMode(s.cfg.ProxyProtocol),
		TrustedProxies:   s.cfg.TrustedProxies,
		HandshakeTimeout: s.cfg.HandshakeTimeout,
		MaxHello:         s.cfg.MaxHello,
		KeepOlder:        s.cfg.KeepOlder,
		KeylessHTTP:      true,
		Logger:           s.log,
	})
	if err != nil {
		ln.Close()
		return err
	}
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		gl.Close()
		return net.ErrClosed
	}
	s.lns[gl] = struct{}{}
	s.mu.Unlock()
	for {
		c, err := gl.AcceptConn()
		if err != nil {
			s.mu.Lock()
			done := s.done
			s.mu.Unlock()
			if done {
				return nil
			}
			return err
		}
		s.mu.Lock()
		s.open[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.handle(c)
	}
}

// Shutdown stops accepting and waits for open sessions until ctx is done,
// then closes them.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.done = true
	for ln := range s.lns {
		ln.Close()
	}
	s.mu.Unlock()
	s.httpOnce.Do(func() {}) // after this, no HTTP server starts; see serveHTTP
	if s.httpLn != nil {
		defer s.httpLn.Close()
	}
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	s.mu.Lock()
	for c := range s.open {
		c.Close()
	}
	s.mu.Unlock()
	<-done
	return ctx.Err()
}

// Sessions is the number of open connections.
func (s *Server) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.open)
}

func (s *Server) handle(c *gateway.Conn) {
	defer func() {
		c.Close()
		s.mu.Lock()
		delete(s.open, c)
		s.mu.Unlock()
		s.wg.Done()
	}()
	if c.HTTP() {
		s.serveHTTP(c)
		return
	}
	out, err := client.AppendReply(nil, s.reply(c.Key(), c.ClientAddr().String()))
	if err != nil {
		return
	}
	if _, err := c.Write(out); err != nil {
		return
	}
	// Echo everything after the hello (bytes that came with it first),
	// then half-close.
	var err2 error
	if s.cfg.EchoBuffer > 0 {
		// Hide ReadFrom/WriteTo so io.CopyBuffer uses the buffer.
		_, err2 = io.CopyBuffer(struct{ io.Writer }{c}, struct{ io.Reader }{c}, make([]byte, s.cfg.EchoBuffer))
	} else {
		_, err2 = io.Copy(c, c)
	}
	if err2 != nil {
		return
	}
	_ = c.CloseWrite()
}

// reply counts a connection for key and builds the answer.
func (s *Server) reply(key, clientAddr string) Reply {
	s.mu.Lock()
	s.conns[key]++
	n := s.conns[key]
	s.mu.Unlock()
	return Reply{Gateway: s.cfg.ID, Key: key, Conns: n, Client: clientAddr}
}
