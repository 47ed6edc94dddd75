package gateway

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tether-proxy/tether/pkg/cluster"
	"github.com/tether-proxy/tether/pkg/proto"
	"github.com/tether-proxy/tether/pkg/proxy"
)

// listen starts a Listener on loopback and returns it with a channel of
// handshake rejections.
func listen(t *testing.T, cfg Config) (*Listener, chan error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rejects := make(chan error, 16)
	cfg.OnReject = func(_ net.Addr, err error) { rejects <- err }
	l, err := NewListener(ln, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l, rejects
}

func loopback() []netip.Prefix { return []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")} }

// header is a PROXY v2 header from client with key in the TLV (none if
// key is nil).
func header(t *testing.T, client net.Addr, key string) []byte {
	t.Helper()
	var k []byte
	if key != "" {
		k = []byte(key)
	}
	b, err := proxy.AppendProxyV2(nil, client, &net.TCPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 9000}, k)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func hello(t *testing.T, key, payload string) []byte {
	t.Helper()
	b, err := proto.AppendHello(nil, []byte(key), []byte(payload))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func dial(t *testing.T, l *Listener) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	return c.(*net.TCPConn)
}

// accept waits for the next served connection.
func accept(t *testing.T, l *Listener) *Conn {
	t.Helper()
	type res struct {
		c   *Conn
		err error
	}
	ch := make(chan res, 1)
	go func() { c, err := l.AcceptConn(); ch <- res{c, err} }()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatal(r.err)
		}
		t.Cleanup(func() { r.c.Close() })
		return r.c
	case <-time.After(5 * time.Second):
		t.Fatal("no connection accepted")
		return nil
	}
}

func rejected(t *testing.T, rejects chan error) error {
	t.Helper()
	select {
	case err := <-rejects:
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("no rejection")
		return nil
	}
}

var phone = &net.TCPAddr{IP: net.IPv4(100, 64, 1, 2), Port: 40000}

func TestHandshake(t *testing.T) {
	tests := []struct {
		name    string
		cfg     Config
		send    func(t *testing.T) []byte
		wantErr error  // nil: served
		client  string // expected ClientAddr when served; "peer" is the TCP peer
	}{
		{"PROXY v2 with key TLV and hello", Config{TrustedProxies: loopback()},
			func(t *testing.T) []byte { return append(header(t, phone, "k"), hello(t, "k", "")...) }, nil, phone.String()},
		{"LOCAL header means the TCP peer", Config{TrustedProxies: loopback()},
			func(t *testing.T) []byte {
				return append(header(t, &net.UnixAddr{}, ""), hello(t, "k", "")...)
			}, nil, "peer"},
		{"v1 header", Config{TrustedProxies: loopback()},
			func(t *testing.T) []byte {
				return append([]byte("PROXY TCP4 100.64.1.2 10.0.0.1 40000 9000\r\n"), hello(t, "k", "")...)
			}, nil, phone.String()},
		{"untrusted peer, require", Config{TrustedProxies: []netip.Prefix{netip.MustParsePrefix("10.9.0.0/16")}},
			func(t *testing.T) []byte { return append(header(t, phone, "k"), hello(t, "k", "")...) }, ErrUntrustedProxy, ""},
		{"untrusted header, optional", Config{Proxy: ProxyOptional, TrustedProxies: []netip.Prefix{netip.MustParsePrefix("10.9.0.0/16")}},
			func(t *testing.T) []byte { return append(header(t, phone, "k"), hello(t, "k", "")...) }, ErrUntrustedProxy, ""},
		{"untrusted, optional, no header", Config{Proxy: ProxyOptional, TrustedProxies: []netip.Prefix{netip.MustParsePrefix("10.9.0.0/16")}},
			func(t *testing.T) []byte { return hello(t, "k", "") }, nil, "peer"},
		{"require without a header", Config{TrustedProxies: loopback()},
			func(t *testing.T) []byte { return hello(t, "k", "") }, ErrNoProxyHeader, ""},
		{"broken header", Config{TrustedProxies: loopback()},
			func(t *testing.T) []byte { return []byte("\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x03abc") }, ErrBadProxyHeader, ""},
		{"TLV and hello keys differ", Config{TrustedProxies: loopback()},
			func(t *testing.T) []byte { return append(header(t, phone, "alice"), hello(t, "mallory", "")...) }, ErrKeyMismatch, ""},
		{"bad hello version", Config{Proxy: ProxyOff},
			func(t *testing.T) []byte { return []byte{0, 0, 0, 3, 9, 1, 'k'} }, proto.ErrBadVersion, ""},
		{"no hello and no TLV", Config{Proxy: ProxyOff},
			func(t *testing.T) []byte { return []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n") }, ErrNoKey, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, rejects := listen(t, tt.cfg)
			if tt.wantErr != nil {
				// The peer may be reset before its connect even returns.
				if c, err := net.Dial("tcp", l.Addr().String()); err == nil {
					defer c.Close()
					_ = c.SetDeadline(time.Now().Add(5 * time.Second))
					_, _ = c.Write(tt.send(t))
					if b, _ := io.ReadAll(c); len(b) != 0 {
						t.Fatalf("rejected peer got %q", b)
					}
				}
				if err := rejected(t, rejects); !errors.Is(err, tt.wantErr) {
					t.Fatalf("rejected with %v, want %v", err, tt.wantErr)
				}
				return
			}
			c := dial(t, l)
			if _, err := c.Write(tt.send(t)); err != nil {
				t.Fatal(err)
			}
			gc := accept(t, l)
			want := tt.client
			if want == "peer" {
				want = c.LocalAddr().String()
			}
			if gc.Key() != "k" || gc.ClientAddr().String() != want {
				t.Fatalf("key %q client %s, want k %s", gc.Key(), gc.ClientAddr(), want)
			}
		})
	}
}

// TestHandshakeDeadline: a peer that sends nothing, or half a header, is
// closed at HandshakeTimeout with ErrTimeout, and Accept is never blocked
// by it.
func TestHandshakeDeadline(t *testing.T) {
	l, rejects := listen(t, Config{TrustedProxies: loopback(), HandshakeTimeout: 200 * time.Millisecond})
	silent := dial(t, l)
	half := dial(t, l)
	if _, err := half.Write(header(t, phone, "k")[:10]); err != nil {
		t.Fatal(err)
	}
	good := dial(t, l)
	if _, err := good.Write(append(header(t, phone, "k"), hello(t, "k", "")...)); err != nil {
		t.Fatal(err)
	}
	if gc := accept(t, l); gc.Key() != "k" {
		t.Fatal("the good connection waited behind the slow ones")
	}
	for range 2 {
		if err := rejected(t, rejects); !errors.Is(err, ErrTimeout) {
			t.Fatalf("slow peer: %v, want ErrTimeout", err)
		}
	}
	_ = silent
}

// TestBytesInOrder: the hello payload, bytes that came with the hello and
// bytes sent later reach the application in order; a v1 header split over
// two writes is served.
func TestBytesInOrder(t *testing.T) {
	l, _ := listen(t, Config{TrustedProxies: loopback()})
	c := dial(t, l)
	v1 := []byte("PROXY TCP4 100.64.1.2 10.0.0.1 40000 9000\r\n")
	if _, err := c.Write(v1[:8]); err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * time.Millisecond) // a separate segment (the test passes either way)
	if _, err := c.Write(append(append(v1[8:], hello(t, "k", "payload")...), "first;"...)); err != nil {
		t.Fatal(err)
	}
	gc := accept(t, l)
	if string(gc.Payload()) != "payload" || gc.ClientAddr().String() != phone.String() {
		t.Fatalf("payload %q client %s", gc.Payload(), gc.ClientAddr())
	}
	if _, err := c.Write([]byte("second")); err != nil {
		t.Fatal(err)
	}
	_ = c.CloseWrite()
	got, err := io.ReadAll(gc)
	if err != nil || string(got) != "first;second" {
		t.Fatalf("read %q, %v", got, err)
	}
}

// TestEchoSplices: io.Copy from a Conn to itself (an echo) returns the
// bytes buffered during the handshake first, then the rest.
func TestEchoSplices(t *testing.T) {
	l, _ := listen(t, Config{Proxy: ProxyOff})
	c := dial(t, l)
	if _, err := c.Write(append(hello(t, "k", ""), "early"...)); err != nil {
		t.Fatal(err)
	}
	gc := accept(t, l)
	go func() { _, _ = io.Copy(gc, gc); _ = gc.CloseWrite() }()
	big := bytes.Repeat([]byte("0123456789"), 100_000)
	go func() { _, _ = c.Write(big); _ = c.CloseWrite() }()
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, append([]byte("early"), big...)) {
		t.Fatalf("echo: %d bytes, %v", len(got), err)
	}
}

// TestHTTPLeftInPlace: an HTTP upgrade keyed by the proxy's TLV is served
// with every byte unread.
func TestHTTPLeftInPlace(t *testing.T) {
	l, _ := listen(t, Config{TrustedProxies: loopback()})
	c := dial(t, l)
	req := "GET /ws?sid=k HTTP/1.1\r\nHost: x\r\n\r\n"
	if _, err := c.Write(append(header(t, phone, "k"), req...)); err != nil {
		t.Fatal(err)
	}
	gc := accept(t, l)
	buf := make([]byte, len(req))
	if _, err := io.ReadFull(gc, buf); err != nil || string(buf) != req || !gc.HTTP() || gc.Key() != "k" {
		t.Fatalf("read %q (%v), http %v, key %q", buf, err, gc.HTTP(), gc.Key())
	}
}

// TestNewestSessionWins: a second connection for a key resets the first
// (which the proxy turns into the end of the stale client's session),
// after the hook ran; KeepOlder leaves both.
func TestNewestSessionWins(t *testing.T) {
	var hooked []string
	l, _ := listen(t, Config{TrustedProxies: loopback(), OnReplaced: func(older, newer *Conn) {
		hooked = append(hooked, older.ClientAddr().String()+" -> "+newer.ClientAddr().String())
	}})
	first := dial(t, l)
	other := &net.TCPAddr{IP: net.IPv4(100, 64, 9, 9), Port: 50000}
	if _, err := first.Write(append(header(t, phone, "k"), hello(t, "k", "")...)); err != nil {
		t.Fatal(err)
	}
	accept(t, l)
	bystander := dial(t, l)
	if _, err := bystander.Write(append(header(t, phone, "other-key"), hello(t, "other-key", "")...)); err != nil {
		t.Fatal(err)
	}
	accept(t, l)
	second := dial(t, l)
	if _, err := second.Write(append(header(t, other, "k"), hello(t, "k", "")...)); err != nil {
		t.Fatal(err)
	}
	newer := accept(t, l)
	if _, err := first.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("older session: read %v, want a reset", err)
	}
	if st := l.Stats(); st.Replaced != 1 || st.Open != 2 || len(hooked) != 1 || hooked[0] != phone.String()+" -> "+other.String() {
		t.Fatalf("stats %+v, hook %v", st, hooked)
	}
	if _, err := newer.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(second, make([]byte, 1)); err != nil {
		t.Fatalf("newer session: %v", err)
	}

	keep, _ := listen(t, Config{TrustedProxies: loopback(), KeepOlder: true})
	a, b := dial(t, keep), dial(t, keep)
	for _, c := range []*net.TCPConn{a, b} {
		if _, err := c.Write(append(header(t, phone, "k"), hello(t, "k", "")...)); err != nil {
			t.Fatal(err)
		}
		accept(t, keep)
	}
	if st := keep.Stats(); st.Replaced != 0 || st.Open != 2 {
		t.Fatalf("KeepOlder: %+v", st)
	}
}

func TestListenerConfig(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln.Close()
	if _, err := NewListener(ln, Config{}); err == nil || !strings.Contains(err.Error(), "TrustedProxies") {
		t.Fatalf("require without trusted proxies: %v", err)
	}
	if _, err := NewListener(ln, Config{Proxy: "sometimes"}); err == nil {
		t.Fatal("bad mode accepted")
	}
}

// TestMember: a gateway joins as draining, Announce makes it active on an
// observer, Down and Up and Drain show there too; a second member with the
// same ID cannot announce.
func TestMember(t *testing.T) {
	observer, err := cluster.New(cluster.Config{NodeName: "proxy", BindAddr: "127.0.0.1:0", Profile: cluster.ProfileLocal,
		Meta: cluster.Meta{Role: cluster.RoleProxy, Addr: "127.0.0.1:7000"}})
	if err != nil {
		t.Fatal(err)
	}
	defer observer.Shutdown()
	stateOf := func(id string) string {
		for _, g := range observer.Gateways() {
			if g.ID == id {
				return string(g.State)
			}
		}
		return "absent"
	}
	waitState := func(want string) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for stateOf("gw-1") != want {
			if time.Now().After(deadline) {
				t.Fatalf("gw-1 is %s on the observer, want %s", stateOf("gw-1"), want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	var open atomic.Int64
	open.Store(1)
	m, err := Join(MemberConfig{ID: "gw-1", Addr: "127.0.1.1:9000", BindAddr: "127.0.0.1:0", Join: []string{observer.Addr()},
		Profile: ProfileLocal, OpenSessions: func() int { return int(open.Load()) }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m.Announce(ctx); err != nil {
		t.Fatal(err)
	}
	waitState("active")
	dup, err := Join(MemberConfig{ID: "gw-1", NodeName: "gw-1-again", Addr: "127.0.1.2:9000", BindAddr: "127.0.0.1:0", Join: []string{observer.Addr()}, Profile: ProfileLocal})
	if err != nil {
		t.Fatal(err)
	}
	if err := dup.Announce(ctx); !errors.Is(err, ErrIDConflict) {
		t.Fatalf("duplicate ID announced: %v", err)
	}
	_ = dup.Leave(time.Second)
	for _, step := range []struct {
		do   func(context.Context) error
		want string
	}{{m.Down, "down"}, {m.Up, "active"}} {
		if err := step.do(ctx); err != nil {
			t.Fatal(err)
		}
		waitState(step.want)
	}
	if err := m.SetWeight(ctx, 0); err == nil {
		t.Fatal("weight 0 accepted")
	}
	dctx, dcancel := context.WithCancel(ctx)
	drained := make(chan error, 1)
	go func() { drained <- m.Drain(dctx) }()
	waitState("draining")
	open.Store(0) // the last session ends: the drain leaves
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
	dcancel()
	waitState("absent")
}
