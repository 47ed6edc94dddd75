package proxy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/tether-proxy/tether/internal/sock"
	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/pkg/proto"
	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route"
)

// gateway starts a reference stub on loopback and returns its address.
func gateway(t *testing.T, id, mode string) string {
	t.Helper()
	// KeepOlder: these tests open many sessions with one key at once, as
	// different clients; newest-session-wins is the gateway's business.
	srv, err := stub.New(stub.Config{ID: id, ProxyProtocol: mode, KeepOlder: true})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		<-done
	})
	return ln.Addr().String()
}

type harness struct {
	srv  *Server
	addr string
	m    *Metrics
	ring *ring.Holder
}

// start runs a proxy on loopback over the given gateways.
func start(t *testing.T, cfg Config, gws ...ring.Member) *harness {
	t.Helper()
	return startWrapped(t, cfg, nil, gws...)
}

// startGoroutines is start with every handshake in a goroutine, as
// without Config.EventLoop: the listener is wrapped, so the event loop
// cannot accept on it.
func startGoroutines(t *testing.T, cfg Config, gws ...ring.Member) *harness {
	t.Helper()
	return startWrapped(t, cfg, func(ln net.Listener, _ *Metrics) net.Listener { return plainListener{ln} }, gws...)
}

// plainListener hides the TCP listener's SyscallConn.
type plainListener struct{ net.Listener }

// handshakePaths are the two ways a connection's handshake runs: as events of the
// event loop (Linux; elsewhere the same as the second) and in a goroutine.
// The tests of the handshake's outcomes run with both.
var handshakePaths = []struct {
	name  string
	start func(*testing.T, Config, ...ring.Member) *harness
}{
	{"event loop", start},
	{"goroutines", startGoroutines},
}

// eachFront runs test once for each of handshakePaths.
func eachFront(t *testing.T, test func(t *testing.T, start func(*testing.T, Config, ...ring.Member) *harness)) {
	for _, f := range handshakePaths {
		t.Run(f.name, func(t *testing.T) { test(t, f.start) })
	}
}

// startWrapped is start with a listener wrapper (PROXY protocol in).
func startWrapped(t *testing.T, cfg Config, wrap func(net.Listener, *Metrics) net.Listener, gws ...ring.Member) *harness {
	t.Helper()
	h := &harness{ring: &ring.Holder{}, m: NewMetrics(nil)}
	r, err := ring.New(gws)
	if err != nil {
		t.Fatal(err)
	}
	h.ring.Store(r)
	if cfg.Resolver == nil {
		cfg.Resolver = &route.RingResolver{Ring: h.ring}
	}
	cfg.Metrics = h.m
	if cfg.Dialer == nil {
		d := &route.Dialer{DialTimeout: time.Second, Cooldown: -1}
		if cfg.Park {
			// As the proxy binary is wired: the parker's sessions
			// reach gateways through the lean dial.
			d.DialContext = sock.Dial
		}
		cfg.Dialer = d
	}
	if cfg.Park {
		// As the proxy binary is wired: parking goes with the event
		// loop's accept and handshake.
		cfg.EventLoop = true
		if cfg.EventLoops == 0 {
			cfg.EventLoops = 2 // several loops, whatever the machine's CPUs
		}
	}
	h.srv, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h.addr = ln.Addr().String()
	if wrap != nil {
		ln = wrap(ln, h.m)
	}
	done := make(chan error, 1)
	go func() { done <- h.srv.Serve(ln) }()
	t.Cleanup(func() {
		_ = h.srv.Close()
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v", err)
		}
	})
	return h
}

func hello(t testing.TB, key, payload string) []byte {
	t.Helper()
	b, err := proto.AppendHello(nil, []byte(key), []byte(payload))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func dial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return c.(*net.TCPConn)
}

func TestSessionEchoAndHalfClose(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	h := start(t, DefaultConfig(), ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
	c := dial(t, h.addr)
	// Hello and the first application bytes in one packet.
	if _, err := c.Write(append(hello(t, "user-1", "inframe"), "ping"...)); err != nil {
		t.Fatal(err)
	}
	rep, _, err := stub.ReadReply(c)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Gateway != "gw-1" || rep.Key != "user-1" || rep.Conns != 1 || rep.Client != c.LocalAddr().String() {
		t.Fatalf("reply %+v (client %s)", rep, c.LocalAddr())
	}
	if _, err := c.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	rest, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if string(rest) != "pingpong" {
		t.Fatalf("echo %q", rest)
	}
	waitFor(t, func() bool { return h.srv.Active() == 0 && len(h.srv.SessionsByGateway()) == 0 })
	if _, down := gatherTraffic(t, h.m); down["all"] == 0 {
		t.Fatal("bytes not counted")
	}
}

func TestProxyProtocolOff(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyOff)
	cfg := DefaultConfig()
	cfg.ProxyProtocolOut = false
	h := start(t, cfg, ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
	c := dial(t, h.addr)
	if _, err := c.Write(hello(t, "k", "")); err != nil {
		t.Fatal(err)
	}
	rep, _, err := stub.ReadReply(c)
	if err != nil {
		t.Fatal(err)
	}
	// Without a header the gateway sees the proxy as its peer.
	if rep.Client == c.LocalAddr().String() || !strings.HasPrefix(rep.Client, "127.0.0.1:") {
		t.Fatalf("client %q", rep.Client)
	}
}

func TestBadHandshakes(t *testing.T) {
	eachFront(t, func(t *testing.T, start func(*testing.T, Config, ...ring.Member) *harness) {
		gw := gateway(t, "gw-1", stub.ProxyRequire)
		cfg := DefaultConfig()
		cfg.HandshakeTimeout = 200 * time.Millisecond
		h := start(t, cfg, ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
		frame := func(length uint32, rest ...byte) []byte {
			return append(binary.BigEndian.AppendUint32(nil, length), rest...)
		}
		tests := []struct {
			name   string
			send   []byte
			fin    bool
			reason string
		}{
			{"garbage", []byte{0xde, 0xad, 0xbe, 0xef, 0, 0}, false, "too_large"},
			{"version 2", frame(3, 2, 1, 'k'), false, "bad_version"},
			{"keylen 0", frame(2, 1, 0), false, "bad_keylen"},
			{"length 0", frame(0), false, "bad_length"},
			{"length max", frame(0xFFFFFFFF, 1, 1), false, "too_large"},
			{"length above max-hello", frame(4097, 1, 1, 'k'), false, "too_large"},
			{"http", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), false, "too_large"},
			{"truncated then FIN", hello(t, "key", "payload")[:7], true, "eof"},
			{"silent", nil, false, "timeout"},
			{"slow partial", []byte{0, 0}, false, "timeout"},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				before := testutil.ToFloat64(h.m.HandshakeFailures.WithLabelValues(tt.reason))
				c := dial(t, h.addr)
				if len(tt.send) > 0 {
					if _, err := c.Write(tt.send); err != nil {
						t.Fatal(err)
					}
				}
				if tt.fin {
					_ = c.CloseWrite()
				}
				got, err := io.ReadAll(c)
				if len(got) != 0 {
					t.Fatalf("proxy wrote %q to a bad client", got)
				}
				if err != nil && !errors.Is(err, syscall.ECONNRESET) {
					t.Fatalf("read: %v", err)
				}
				waitFor(t, func() bool {
					return testutil.ToFloat64(h.m.HandshakeFailures.WithLabelValues(tt.reason)) == before+1
				})
			})
		}
	})
}

func TestNoGatewayAndUnreachable(t *testing.T) {
	eachFront(t, func(t *testing.T, start func(*testing.T, Config, ...ring.Member) *harness) {
		h := start(t, DefaultConfig())
		c := dial(t, h.addr)
		c.Write(hello(t, "k", ""))
		if got, _ := io.ReadAll(c); len(got) != 0 {
			t.Fatalf("wrote %q", got)
		}
		waitFor(t, func() bool { return testutil.ToFloat64(h.m.RouteFailures.WithLabelValues("no_gateway")) == 1 })

		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		dead := ln.Addr().String()
		ln.Close()
		r, _ := ring.New([]ring.Member{{ID: "dead", Addr: dead, Weight: 1}})
		h.ring.Store(r)
		c = dial(t, h.addr)
		c.Write(hello(t, "k", ""))
		if got, _ := io.ReadAll(c); len(got) != 0 {
			t.Fatalf("wrote %q", got)
		}
		waitFor(t, func() bool { return testutil.ToFloat64(h.m.RouteFailures.WithLabelValues("unreachable")) == 1 })
		if testutil.ToFloat64(h.m.DialFailures.WithLabelValues("dead")) != 1 {
			t.Fatal("dial failure not counted by gateway")
		}
	})
}

func TestFailoverToSecondChoice(t *testing.T) {
	eachFront(t, func(t *testing.T, start func(*testing.T, Config, ...ring.Member) *harness) {
		live := gateway(t, "live", stub.ProxyRequire)
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		dead := ln.Addr().String()
		ln.Close()
		h := start(t, DefaultConfig(), ring.Member{ID: "live", Addr: live, Weight: 1}, ring.Member{ID: "dead", Addr: dead, Weight: 1})
		served := 0
		for i := range 20 {
			c := dial(t, h.addr)
			c.Write(hello(t, "key-"+string(rune('a'+i)), ""))
			rep, _, err := stub.ReadReply(c)
			if err != nil {
				t.Fatalf("key %d: %v", i, err)
			}
			if rep.Gateway != "live" {
				t.Fatalf("served by %s", rep.Gateway)
			}
			served++
			c.Close()
		}
		if testutil.ToFloat64(h.m.Failovers.WithLabelValues("live")) == 0 {
			t.Fatal("no failover counted although the dead gateway owns keys")
		}
	})
}

func TestMaxConns(t *testing.T) {
	eachFront(t, func(t *testing.T, start func(*testing.T, Config, ...ring.Member) *harness) {
		gw := gateway(t, "gw-1", stub.ProxyRequire)
		cfg := DefaultConfig()
		cfg.MaxConns = 2
		h := start(t, cfg, ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
		var held []*net.TCPConn
		for range 2 {
			c := dial(t, h.addr)
			c.Write(hello(t, "k", ""))
			if _, _, err := stub.ReadReply(c); err != nil {
				t.Fatal(err)
			}
			held = append(held, c)
		}
		// The proxy resets the over-limit connection at once, which may even
		// race the client's connect.
		if c, err := net.Dial("tcp", h.addr); err == nil {
			c.SetDeadline(time.Now().Add(5 * time.Second))
			c.Write(hello(t, "k", ""))
			if got, _ := io.ReadAll(c); len(got) != 0 {
				t.Fatalf("over-limit client got %q", got)
			}
			c.Close()
		}
		waitFor(t, func() bool { return testutil.ToFloat64(h.m.Rejected.WithLabelValues("max_conns")) == 1 })
		if testutil.ToFloat64(h.m.Rejected.WithLabelValues("max_conns")) != 1 {
			t.Fatal("rejection not counted")
		}
		if n := h.srv.SessionsByGateway()["gw-1"]; n != 2 {
			t.Fatalf("SessionsByGateway = %d, want 2", n)
		}
		// Held sessions are untouched.
		for _, c := range held {
			c.Write([]byte("x"))
			b := make([]byte, 1)
			if _, err := io.ReadFull(c, b); err != nil {
				t.Fatal(err)
			}
		}
	})
}

func TestShutdownDrains(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	h := start(t, DefaultConfig(), ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
	c := dial(t, h.addr)
	c.Write(hello(t, "k", ""))
	if _, _, err := stub.ReadReply(c); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- h.srv.Shutdown(ctx) }()
	waitFor(t, func() bool { return h.srv.Closing() })
	// New connections are refused; the open session still echoes.
	if nc, err := net.Dial("tcp", h.addr); err == nil {
		nc.SetDeadline(time.Now().Add(5 * time.Second))
		nc.Write(hello(t, "k", ""))
		if got, _ := io.ReadAll(nc); len(got) != 0 {
			t.Fatalf("accepted during shutdown: %q", got)
		}
		nc.Close()
	}
	c.Write([]byte("still"))
	b := make([]byte, 5)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "still" {
		t.Fatalf("open session broken during drain: %q %v", b, err)
	}
	cancel() // drain timeout: the session is closed
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("Shutdown = %v", err)
	}
	if _, err := c.Read(b); err == nil {
		t.Fatal("session survived the drain timeout")
	}
}

// TestNoGoroutineLeak runs many good and bad sessions, including clients
// that reset mid-session and clients that half-close, then checks that the
// goroutine count returns to where it was.
func TestNoGoroutineLeak(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	cfg := DefaultConfig()
	cfg.HandshakeTimeout = 300 * time.Millisecond
	h := start(t, cfg, ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
	base := runtime.NumGoroutine()
	var wg sync.WaitGroup
	for i := range 400 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", h.addr)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			switch i % 4 {
			case 0: // good, half-close
				c.Write(append(hello(t, "k", ""), "abc"...))
				c.(*net.TCPConn).CloseWrite()
				io.ReadAll(c)
			case 1: // good, then reset mid-session
				c.Write(hello(t, "k", ""))
				stub.ReadReply(c)
				c.(*net.TCPConn).SetLinger(0)
			case 2: // bad
				c.Write([]byte{0, 0, 0, 3, 9, 1, 'k'})
				io.ReadAll(c)
			case 3: // silent until timeout
				io.ReadAll(c)
			}
		}()
	}
	wg.Wait()
	waitFor(t, func() bool { return h.srv.Active() == 0 })
	waitFor(t, func() bool { return runtime.NumGoroutine() <= base })
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestClientResetBlamesClient: a client that vanishes while its gateway
// pushes data breaks only the gateway → client direction (a write to the
// client fails); the session end still names the client.
func TestClientResetBlamesClient(t *testing.T) {
	for _, park := range []bool{true, false} {
		t.Run(map[bool]string{true: "parked", false: "no-park"}[park], func(t *testing.T) {
			gw, upDone := pushingGateway(t)
			cfg := DefaultConfig()
			cfg.Park = park
			h := start(t, cfg, ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
			const sessions = 5
			for i := range sessions {
				c := dial(t, h.addr)
				if _, err := c.Write(hello(t, "k", "")); err != nil {
					t.Fatal(err)
				}
				// The client → gateway direction ends cleanly (FIN, passed
				// on as a half-close), while the gateway keeps pushing.
				if err := c.CloseWrite(); err != nil {
					t.Fatal(err)
				}
				if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
					t.Fatal(err)
				}
				<-upDone
				_ = c.SetLinger(0)
				c.Close()
				waitFor(t, func() bool {
					return testutil.ToFloat64(h.m.SessionEnds.WithLabelValues(string(endClientError)))+
						testutil.ToFloat64(h.m.SessionEnds.WithLabelValues(string(endGatewayError))) == float64(i+1)
				})
			}
			if n := testutil.ToFloat64(h.m.SessionEnds.WithLabelValues(string(endGatewayError))); n != 0 {
				t.Fatalf("%v of %d client resets blamed on the gateway", n, sessions)
			}
		})
	}
}

// pushingGateway accepts connections, reads until EOF (then signals
// upDone) while writing to the connection until a write fails.
func pushingGateway(t *testing.T) (string, <-chan struct{}) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	upDone := make(chan struct{}, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				go func() {
					_, _ = io.Copy(io.Discard, c)
					upDone <- struct{}{}
				}()
				buf := make([]byte, 32<<10)
				for range 4096 { // at most 128 MiB
					if _, err := c.Write(buf); err != nil {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String(), upDone
}

func TestPaceSchedule(t *testing.T) {
	start := time.Unix(1000, 0)
	tests := []struct {
		name string
		span time.Duration
		n    int
		want []time.Duration // offsets from start
	}{
		{"none", 5 * time.Second, 0, nil},
		{"no time left", 0, 3, nil},
		{"one", 4 * time.Second, 1, []time.Duration{2 * time.Second}},
		{"four", 4 * time.Second, 4, []time.Duration{500 * time.Millisecond, 1500 * time.Millisecond, 2500 * time.Millisecond, 3500 * time.Millisecond}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := paceSchedule(start, start.Add(tt.span), tt.n)
			if len(got) != len(tt.want) {
				t.Fatalf("%d closes, want %d", len(got), len(tt.want))
			}
			for i, at := range got {
				if d := at.Sub(start); d != tt.want[i] {
					t.Errorf("close %d at %v, want %v", i, d, tt.want[i])
				}
			}
		})
	}
	// 500 sessions over 5 s: exactly a fifth in each second.
	perSecond := map[int]int{}
	for _, at := range paceSchedule(start, start.Add(5*time.Second), 500) {
		perSecond[int(at.Sub(start)/time.Second)]++
	}
	for sec := 0; sec < 5; sec++ {
		if perSecond[sec] != 100 {
			t.Errorf("second %d closes %d sessions, want 100 (%v)", sec, perSecond[sec], perSecond)
		}
	}
}

// TestMetricsStartAtZero: every fixed label value exists from the start,
// and tether_gateway_sessions_active lists each ring member.
func TestMetricsStartAtZero(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	r, err := ring.New([]ring.Member{{ID: "gw-1", Addr: "a:1", Weight: 1}, {ID: "gw-2", Addr: "a:2", Weight: 1}})
	if err != nil {
		t.Fatal(err)
	}
	m.ObserveRing(r)
	reg.MustRegister(GatewaySessions(func() map[string]int { return map[string]int{"gw-2": 3} }, func() []string { return []string{"gw-1", "gw-2"} }))
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range families {
		for _, mt := range f.GetMetric() {
			key := f.GetName()
			for _, l := range mt.GetLabel() {
				key += "{" + l.GetName() + "=" + l.GetValue() + "}"
			}
			v := mt.GetCounter().GetValue() + mt.GetGauge().GetValue()
			got[key] = v
		}
	}
	for _, want := range []string{
		"tether_connections_rejected_total{reason=overload}", "tether_connections_rejected_total{reason=gateway_rate}",
		"tether_handshake_failures_total{reason=tls}", "tether_session_ends_total{reason=drain_timeout}",
		"tether_route_failures_total{reason=local_resources}", "tether_dial_failures_total{gateway=gw-1}",
		"tether_gateway_rate_limited_total{gateway=gw-2}", "tether_bytes_total{direction=gateway_to_client}",
	} {
		if v, ok := got[want]; !ok || v != 0 {
			t.Errorf("%s = %v (present %v), want 0 from the start", want, v, ok)
		}
	}
	if got["tether_gateway_sessions_active{gateway=gw-1}"] != 0 || got["tether_gateway_sessions_active{gateway=gw-2}"] != 3 {
		t.Errorf("gateway sessions: gw-1 %v, gw-2 %v", got["tether_gateway_sessions_active{gateway=gw-1}"], got["tether_gateway_sessions_active{gateway=gw-2}"])
	}
	if _, ok := got["tether_gateway_sessions_active{gateway=gw-1}"]; !ok {
		t.Error("a ring member without sessions has no tether_gateway_sessions_active series")
	}
}

// TestBrokenSide: which connection a failed direction blames, for
// connections the kernel cannot be asked about (net.Pipe).
func TestBrokenSide(t *testing.T) {
	src, dst := net.Pipe()
	defer src.Close()
	defer dst.Close()
	tests := []struct {
		name string
		err  error
		want net.Conn
	}{
		{"read from the source reset", srcError{syscall.ECONNRESET}, src},
		{"read from the source timed out", fmt.Errorf("splice: %w", srcError{syscall.ETIMEDOUT}), src},
		{"reset, side unknown", syscall.ECONNRESET, src},
		{"broken pipe", syscall.EPIPE, dst},
		{"deadline", os.ErrDeadlineExceeded, src},
		{"something else", errors.New("odd"), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := brokenSide(dst, src, tt.err); got != tt.want {
				t.Fatalf("brokenSide(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}
