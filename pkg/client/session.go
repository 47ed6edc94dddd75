package client

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"syscall"
	"time"
)

// Default backoff of Session: full jitter, a delay drawn uniformly from
// [0, min(DefaultBackoffCap, DefaultBackoffBase·2^attempt)).
const (
	DefaultBackoffBase = 250 * time.Millisecond
	DefaultBackoffCap  = 30 * time.Second
	// DefaultTimeout bounds one attempt: connect, TLS, hello, reply.
	DefaultTimeout = 10 * time.Second
)

// ErrNoReply means the proxy (or the gateway) closed the connection
// without sending a byte: tether's "come back later" (a storm is being
// shed, the key's gateway is rate limited, the hello was refused). A
// Session backs off before trying again.
var ErrNoReply = errors.New("client: closed without a reply (come back later)")

// ErrBadReply means Dialer.ReadReply was set and the first bytes were not a
// reply frame (a gateway that sends none, or another protocol).
var ErrBadReply = errors.New("client: no reply frame")

// Dialer opens sessions for a key through one of several proxies, in
// rotation: each Dial uses the next address, so a client whose proxy
// vanished moves on instead of retrying it.
type Dialer struct {
	// Proxies are the HOST:PORT addresses to dial, in rotation; required.
	Proxies []string
	// TLS, when set, wraps each connection in TLS with this configuration.
	TLS *tls.Config
	// Timeout bounds one attempt (connect, TLS, hello, reply); 0 means
	// DefaultTimeout.
	Timeout time.Duration
	// ReadReply reads the reference gateway's reply frame after the hello
	// (Conn.Reply). Gateways of your own that answer otherwise leave it
	// off and read their own first message; then only a close without any
	// byte (ErrNoReply) is recognised, on the first Read.
	ReadReply bool
	// Net dials the TCP connections; nil means a net.Dialer.
	Net *net.Dialer

	mu   sync.Mutex
	next int
}

// Conn is an open session.
type Conn struct {
	net.Conn
	// Proxy is the address it went through.
	Proxy string
	// Reply is the gateway's reply frame (with Dialer.ReadReply).
	Reply Reply
}

// Dial opens one session for key through the next proxy: it connects,
// sends the hello (with payload), and reads the reply if asked. A
// connection closed without a byte fails with ErrNoReply.
func (d *Dialer) Dial(ctx context.Context, key string, payload []byte) (*Conn, error) {
	if len(d.Proxies) == 0 {
		return nil, errors.New("client: no proxy addresses")
	}
	hello, err := Hello(key, payload)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	addr := d.Proxies[d.next%len(d.Proxies)]
	d.next++
	d.mu.Unlock()
	timeout := d.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	nd := d.Net
	if nd == nil {
		nd = &net.Dialer{}
	}
	var c net.Conn
	if d.TLS != nil {
		td := &tls.Dialer{NetDialer: nd, Config: d.TLS}
		c, err = td.DialContext(ctx, "tcp", addr)
	} else {
		c, err = nd.DialContext(ctx, "tcp", addr)
	}
	if err != nil {
		return nil, fmt.Errorf("client: %s: %w", addr, noReply(err))
	}
	deadline, _ := ctx.Deadline()
	_ = c.SetDeadline(deadline)
	conn := &Conn{Conn: c, Proxy: addr}
	if _, err := c.Write(hello); err != nil {
		c.Close()
		return nil, fmt.Errorf("client: %s: hello: %w", addr, noReply(err))
	}
	if d.ReadReply {
		rep, raw, err := ReadReply(c)
		if err != nil {
			c.Close()
			if len(raw) == 0 {
				return nil, fmt.Errorf("client: %s: reply: %w", addr, noReply(err))
			}
			return nil, fmt.Errorf("client: %s: %w: %w", addr, ErrBadReply, err)
		}
		conn.Reply = rep
	}
	_ = c.SetDeadline(time.Time{})
	return conn, nil
}

// noReply turns a close without bytes (EOF, a reset, which is how tether
// refuses) into ErrNoReply; anything else (refused, a timeout) stays itself.
func noReply(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || isReset(err) {
		return fmt.Errorf("%w: %w", ErrNoReply, err)
	}
	return err
}

// Backoff is full-jitter exponential backoff: attempt n waits a uniformly
// random time in [0, min(Cap, Base·2^n)). Spreading reconnects uniformly,
// rather than around a fixed delay, is what keeps a thousand clients
// dropped at once from coming back at once.
type Backoff struct {
	// Base is the first ceiling; 0 means DefaultBackoffBase.
	Base time.Duration
	// Cap bounds every ceiling; 0 means DefaultBackoffCap.
	Cap time.Duration
	// Rand returns a number in [0, 1); nil means math/rand/v2.
	Rand func() float64
}

// Delay is the wait before attempt n (0 for the first retry).
func (b Backoff) Delay(attempt int) time.Duration {
	base, limit := b.Base, b.Cap
	if base <= 0 {
		base = DefaultBackoffBase
	}
	if limit <= 0 {
		limit = DefaultBackoffCap
	}
	ceil := limit
	if attempt < 62 {
		if c := base << attempt; c > 0 && c < limit {
			ceil = c
		}
	}
	r := b.Rand
	if r == nil {
		r = rand.Float64
	}
	return time.Duration(r() * float64(ceil))
}

// Session keeps a key's session up: it dials, hands the connection to
// serve, and when serve returns (the connection broke, or any error), dials
// again after a backoff delay, until ctx is done.
type Session struct {
	// Dialer opens the connections; required.
	Dialer *Dialer
	// Key is the session key; Payload goes in the hello.
	Key     string
	Payload []byte
	// Backoff spaces the attempts; the zero value has the defaults.
	Backoff Backoff
	// Healthy is how long a connection must last for the next failure to
	// start the backoff over; 0 means 10 s. A connection refused right
	// after its reply is no success.
	Healthy time.Duration
	// OnConnect and OnDisconnect, if set, are told of each connection and
	// each failure (with the delay before the next attempt).
	OnConnect    func(c *Conn)
	OnDisconnect func(err error, retryIn time.Duration)
	// Sleep waits d or until ctx is done; nil means a timer (tests step a
	// clock instead).
	Sleep func(ctx context.Context, d time.Duration) error
	// Now is the clock for Healthy; nil means time.Now.
	Now func() time.Time
}

// Run runs the session until ctx is done, which it returns. serve owns
// the connection until it returns; Run closes it afterwards.
func (s *Session) Run(ctx context.Context, serve func(ctx context.Context, c *Conn) error) error {
	sleep, now := s.Sleep, s.Now
	if sleep == nil {
		sleep = sleepCtx
	}
	if now == nil {
		now = time.Now
	}
	healthy := s.Healthy
	if healthy <= 0 {
		healthy = 10 * time.Second
	}
	attempt := 0
	for {
		c, err := s.Dialer.Dial(ctx, s.Key, s.Payload)
		if err == nil {
			if s.OnConnect != nil {
				s.OnConnect(c)
			}
			began := now()
			err = serve(ctx, c)
			c.Close()
			if err == nil {
				err = io.EOF
			}
			if now().Sub(began) >= healthy {
				attempt = 0
			}
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		d := s.Backoff.Delay(attempt)
		attempt++
		if s.OnDisconnect != nil {
			s.OnDisconnect(err, d)
		}
		if err := sleep(ctx, d); err != nil {
			return err
		}
	}
}

// isReset reports a connection reset (tether's zero-byte refusal).
func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
