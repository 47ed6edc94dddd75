package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route"
)

// TestMaxHandshakes: with two connections stuck in their handshake, a third
// is closed at once with zero bytes and counted; once they finish, new
// connections are served again.
func TestMaxHandshakes(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	cfg := DefaultConfig()
	cfg.MaxHandshakes = 2
	h := start(t, cfg, ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
	slow := []*net.TCPConn{dial(t, h.addr), dial(t, h.addr)}
	waitFor(t, func() bool { return testutil.ToFloat64(h.m.InHandshake) == 2 })
	// The refusal is a reset: it may reach the client while it is still
	// connecting, or on its first read; either way without a byte.
	if c, err := net.DialTimeout("tcp", h.addr, time.Second); err == nil {
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if b, _ := io.ReadAll(c); len(b) != 0 {
			t.Fatalf("an overload refusal sent %q", b)
		}
		c.Close()
	}
	waitFor(t, func() bool { return testutil.ToFloat64(h.m.Rejected.WithLabelValues("overload")) == 1 })
	for _, s := range slow {
		s.Write(hello(t, "slow", ""))
		if _, _, err := stub.ReadReply(s); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, func() bool { return testutil.ToFloat64(h.m.InHandshake) == 0 })
	ok := dial(t, h.addr)
	ok.Write(hello(t, "after", ""))
	if _, _, err := stub.ReadReply(ok); err != nil {
		t.Fatalf("after the storm: %v", err)
	}
}

// TestGatewayRate: a gateway's bucket admits its burst at once, then a
// connection that cannot get a token within its deadline is refused and
// counted, and another gateway's bucket is its own.
func TestGatewayRate(t *testing.T) {
	g, err := NewGatewayRate(5, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	a, b := route.Gateway{ID: "a"}, route.Gateway{ID: "b"}
	for i := range 5 {
		if err := g.Admit(context.Background(), a); err != nil {
			t.Fatalf("admission %d within the burst: %v", i, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if err := g.Admit(ctx, a); !errors.Is(err, ErrRateLimited) {
		t.Fatalf("sixth admission within 10ms = %v, want ErrRateLimited", err)
	}
	if !g.Limited("a") || g.Refused("a") != 1 || g.Limited("b") {
		t.Fatalf("limited a=%v (refused %d), b=%v", g.Limited("a"), g.Refused("a"), g.Limited("b"))
	}
	if err := g.Admit(context.Background(), b); err != nil {
		t.Fatalf("gateway b: %v", err)
	}
	if _, err := NewGatewayRate(0, nil, nil); err == nil {
		t.Fatal("rate 0 accepted")
	}
}

// TestGatewayRateRefusesWithZeroBytes: through the proxy, a key whose
// gateway has no token within the handshake deadline is closed with zero
// bytes, counted as gateway_rate, and not sent to another gateway.
func TestGatewayRateRefusesWithZeroBytes(t *testing.T) {
	gw1, gw2 := gateway(t, "gw-1", stub.ProxyRequire), gateway(t, "gw-2", stub.ProxyRequire)
	cfg := DefaultConfig()
	cfg.HandshakeTimeout = 200 * time.Millisecond
	g, _ := NewGatewayRate(1, nil, nil)
	cfg.GatewayRate = g
	h := start(t, cfg, ring.Member{ID: "gw-1", Addr: gw1, Weight: 1}, ring.Member{ID: "gw-2", Addr: gw2, Weight: 1})
	key := "k"
	first := dial(t, h.addr)
	first.Write(hello(t, key, ""))
	rep, _, err := stub.ReadReply(first)
	if err != nil {
		t.Fatal(err)
	}
	second := dial(t, h.addr)
	second.Write(hello(t, key, ""))
	if b, _ := io.ReadAll(second); len(b) != 0 {
		t.Fatalf("a rate-limited client got %q (first went to %s)", b, rep.Gateway)
	}
	if n := testutil.ToFloat64(h.m.Rejected.WithLabelValues("gateway_rate")); n != 1 {
		t.Fatalf("gateway_rate refusals %v, want 1", n)
	}
	if n := g.Refused(rep.Gateway); n != 1 {
		t.Fatalf("refusals of %s: %d, want 1 (the other gateway is not tried)", rep.Gateway, n)
	}
}
