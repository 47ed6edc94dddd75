// Package stub is the reference gateway of DESIGN §1, used by
// cmd/gateway-stub and by every test: it reads a hello, answers one JSON
// frame saying who it is and what it saw, then echoes.
package stub

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/pires/go-proxyproto"
	"go.uber.org/zap"

	"github.com/tether-proxy/tether/pkg/proto"
)

// PROXY protocol modes for Config.ProxyProtocol.
const (
	ProxyOff      = "off"
	ProxyOptional = "optional"
	ProxyRequire  = "require"
)

// MaxReply bounds a reply frame a client will accept.
const MaxReply = 64 << 10

// Reply is the JSON the stub answers after the hello.
type Reply struct {
	// Gateway is the stub's --id.
	Gateway string `json:"gateway"`
	// Key is the session key from the hello.
	Key string `json:"key"`
	// Conns counts connections this stub has seen for Key, this one
	// included.
	Conns int `json:"conns"`
	// Client is the client address the stub learned: from the PROXY
	// header when present, else the TCP peer.
	Client string `json:"client"`
}

// Config configures a Server.
type Config struct {
	// ID is the gateway ID reported in replies; required.
	ID string
	// ProxyProtocol is off, optional or require; "" means optional.
	ProxyProtocol string
	// HandshakeTimeout bounds reading the PROXY header and hello; 0 means
	// 5s.
	HandshakeTimeout time.Duration
	// MaxHello bounds the hello frame length (and sizes the read buffer);
	// 0 means proto.DefaultMaxHello.
	MaxHello int
	// EchoBuffer, when > 0, echoes through a user-space buffer of this
	// size instead of splice(2). Go's splice path holds a pipe (two
	// descriptors) per blocked direction, so an echo server holding many
	// idle sessions (benchmarks) fits more of them in its open-file limit
	// with a small buffer. 0 means splice.
	EchoBuffer int
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
	lns   map[net.Listener]struct{}
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
		open: map[net.Conn]struct{}{}, lns: map[net.Listener]struct{}{}}, nil
}

// Serve accepts on ln until Shutdown, reading PROXY headers per the
// configured mode.
func (s *Server) Serve(ln net.Listener) error {
	if s.cfg.ProxyProtocol != ProxyOff {
		policy := proxyproto.REQUIRE
		if s.cfg.ProxyProtocol == ProxyOptional {
			policy = proxyproto.USE
		}
		ln = &proxyproto.Listener{
			Listener:          ln,
			ConnPolicy:        func(proxyproto.ConnPolicyOptions) (proxyproto.Policy, error) { return policy, nil },
			ReadHeaderTimeout: s.cfg.HandshakeTimeout,
		}
	}
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		ln.Close()
		return net.ErrClosed
	}
	s.lns[ln] = struct{}{}
	s.mu.Unlock()
	for {
		c, err := ln.Accept()
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

func (s *Server) handle(c net.Conn) {
	defer func() {
		c.Close()
		s.mu.Lock()
		delete(s.open, c)
		s.mu.Unlock()
		s.wg.Done()
	}()
	_ = c.SetReadDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	br := bufio.NewReaderSize(c, s.cfg.MaxHello+4)
	head, err := br.Peek(4)
	if err != nil {
		s.log.Debug("no first bytes", zap.String("peer", c.RemoteAddr().String()), zap.Error(err))
		return
	}
	var tlv []byte
	if pc, ok := c.(*proxyproto.Conn); ok {
		tlv = proto.KeyFromHeader(pc.ProxyHeader())
	}
	if proto.IsHTTP(head) {
		_ = c.SetReadDeadline(time.Time{})
		s.serveHTTP(c, br, string(tlv))
		return
	}
	var key string
	hello, err := peekHello(br, s.cfg.MaxHello)
	switch {
	case err == nil:
		key = string(hello.Key)
		_, _ = br.Discard(hello.FrameLen)
		if tlv != nil && string(tlv) != key {
			s.log.Warn("PROXY key TLV differs from the hello key")
		}
	case tlv != nil:
		// Not a hello, but the proxy told us the key (another --key-from):
		// answer for that key and echo everything, first bytes included.
		key = string(tlv)
	default:
		s.log.Debug("bad hello", zap.String("peer", c.RemoteAddr().String()), zap.Error(err))
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	body, err := json.Marshal(s.reply(key, c.RemoteAddr().String()))
	if err != nil {
		return
	}
	out := binary.BigEndian.AppendUint32(nil, uint32(len(body)))
	if _, err := c.Write(append(out, body...)); err != nil {
		return
	}
	// Echo everything after the hello (bufio.Reader.WriteTo drains what it
	// buffered, then copies from the socket), then half-close.
	var err2 error
	if s.cfg.EchoBuffer > 0 {
		// Hide ReadFrom/WriteTo so io.CopyBuffer uses the buffer.
		_, err2 = io.CopyBuffer(struct{ io.Writer }{c}, struct{ io.Reader }{br}, make([]byte, s.cfg.EchoBuffer))
	} else {
		_, err2 = io.Copy(c, br)
	}
	if err2 != nil {
		return
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	} else if pc, ok := c.(*proxyproto.Conn); ok {
		if tc, ok := pc.TCPConn(); ok {
			_ = tc.CloseWrite()
		}
	}
}

// reply counts a connection for key and builds the answer.
func (s *Server) reply(key, client string) Reply {
	s.mu.Lock()
	s.conns[key]++
	n := s.conns[key]
	s.mu.Unlock()
	return Reply{Gateway: s.cfg.ID, Key: key, Conns: n, Client: client}
}

// peekHello parses a hello frame at the start of br without consuming it.
func peekHello(br *bufio.Reader, max int) (proto.Hello, error) {
	head, err := br.Peek(4)
	if err != nil {
		return proto.Hello{}, err
	}
	length := binary.BigEndian.Uint32(head)
	if uint64(length) > uint64(max) {
		return proto.Hello{}, proto.ErrTooLarge
	}
	frame, err := br.Peek(4 + int(length))
	if err != nil {
		return proto.Hello{}, err
	}
	return proto.ParseHello(frame, max)
}

// ReadReply reads one reply frame from r. It returns the raw bytes read as
// well, so callers can check them for leaked addresses.
func ReadReply(r io.Reader) (Reply, []byte, error) {
	var head [4]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		return Reply{}, head[:0], fmt.Errorf("read reply length: %w", err)
	}
	n := binary.BigEndian.Uint32(head[:])
	if n > MaxReply {
		return Reply{}, head[:], fmt.Errorf("reply of %d bytes is too large", n)
	}
	raw := make([]byte, 4+n)
	copy(raw, head[:])
	if _, err := io.ReadFull(r, raw[4:]); err != nil {
		return Reply{}, raw, fmt.Errorf("read reply body: %w", err)
	}
	var rep Reply
	if err := json.Unmarshal(raw[4:], &rep); err != nil {
		return Reply{}, raw, fmt.Errorf("decode reply: %w", err)
	}
	return rep, raw, nil
}
