//go:build e2e

package e2e

import (
	"bytes"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tether-proxy/tether/internal/testenv"
	"github.com/tether-proxy/tether/pkg/proto"
	"github.com/tether-proxy/tether/pkg/proxy"
	"github.com/tether-proxy/tether/pkg/ring"
)

const haproxyCfg = "../../examples/haproxy.cfg"

// edge is the production shape: HAProxy round-robins clients over two
// proxies (PROXY v2 from HAProxy, trusted), which share a Redis.
type edge struct {
	redis   *testenv.Redis
	gws     []*proc
	proxies []*proc
	lb      *testenv.HAProxy
}

// proxyArgs are the flags of an edge's proxies: Redis bindings, PROXY
// protocol from HAProxy. These tests are about what bindings keep, so
// Redis gets 500ms instead of the default 50ms: on a loaded machine a
// lookup can pass 50ms, and the proxy then routes that connection by the
// ring without binding its key (as designed:
// TestRedisPausedFallbackLatency), which a later ring change moves. A
// refused connection (Redis killed) still fails at once.
func proxyArgs(redisAddr string) []string {
	return []string{"--redis", "redis://" + redisAddr, "--redis-timeout", "500ms", "--proxy-protocol-in", "require", "--trusted-proxies", "127.0.0.1/32"}
}

func newEdge(t *testing.T, gateways int) *edge {
	t.Helper()
	e := &edge{redis: testenv.StartRedis(t)}
	for i := 1; i <= gateways; i++ {
		e.gws = append(e.gws, gatewayStub(t, i, 0))
	}
	for range 2 {
		e.proxies = append(e.proxies, proxyFor(t, e.gws, proxyArgs(e.redis.Addr)...))
	}
	e.lb = testenv.StartHAProxy(t, haproxyCfg,
		"TETHER_PROXY1="+e.proxies[0].addr, "TETHER_PROXY2="+e.proxies[1].addr,
		"TETHER_ADMIN1_PORT="+portOf(e.proxies[0].admin), "TETHER_ADMIN2_PORT="+portOf(e.proxies[1].admin))
	e.lb.WaitServers(t, "UP", "proxy1", "proxy2")
	return e
}

func portOf(addr string) string { return addr[strings.LastIndexByte(addr, ':')+1:] }

// switchRun connects every key hops times through the SLB, alternating the
// source between 127.0.0.2 and 127.0.0.3 and dropping each connection with
// RST. It fails on any client error, gateway change, wrong client address or
// leaked gateway address, and returns each key's gateway.
func switchRun(t *testing.T, via string, keys []string, hops int) map[string]string {
	t.Helper()
	var mu sync.Mutex
	owner := map[string]string{}
	var failures []string
	fail := func(format string, args ...any) {
		mu.Lock()
		failures = append(failures, fmt.Sprintf(format, args...))
		mu.Unlock()
	}
	parallel(len(keys), 16, func(i int) {
		key := keys[i]
		first := ""
		for hop := range hops {
			res, err := session(via, fmt.Sprintf("127.0.0.%d", 2+hop%2), key)
			if bytes.Contains(res.raw, []byte(leakMarker)) {
				fail("%s: client received a gateway address: %q", key, res.raw)
			}
			if err != nil {
				fail("%s hop %d: %v", key, hop, err)
				return
			}
			if hop == 0 {
				first = res.reply.Gateway
			} else if res.reply.Gateway != first {
				fail("%s hop %d: gateway %s, first %s", key, hop, res.reply.Gateway, first)
			}
			if res.reply.Client != res.local.String() {
				fail("%s hop %d: gateway saw client %s, real client %s", key, hop, res.reply.Client, res.local)
			}
		}
		mu.Lock()
		owner[key] = first
		mu.Unlock()
	})
	for _, f := range failures[:min(len(failures), 20)] {
		t.Error(f)
	}
	if len(failures) > 0 {
		t.Fatalf("%d failures", len(failures))
	}
	return owner
}

// TestSLBWithBindings: behind a real HAProxy with real Redis, the WiFi→4G
// switch keeps every key on its gateway and the gateway sees the real client
// address; after a 4th gateway is added and the proxies restarted with it,
// every bound key stays where it was (the ring alone would move about a
// quarter), and new keys do reach the new gateway.
func TestSLBWithBindings(t *testing.T) {
	e := newEdge(t, 3)
	keys := keyList("slb", 300)
	owner := switchRun(t, e.lb.Bind, keys, 4)
	for _, p := range e.proxies {
		m := metrics(t, p)
		if m["tether_connections_accepted_total"] < 100 {
			t.Fatalf("HAProxy sent only %v connections to one proxy: not round-robin", m["tether_connections_accepted_total"])
		}
	}
	t.Logf("WiFi→4G through HAProxy: %d keys × 4 connections, 100%% on their gateway, real client address every time", len(keys))

	// Scale out: gw-4, and both proxies restarted with it on the same
	// addresses (HAProxy keeps pointing at them).
	e.gws = append(e.gws, gatewayStub(t, 4, 0))
	for i, p := range e.proxies {
		listen, admin := p.addr, p.admin
		p.stop()
		e.proxies[i] = proxyAt(t, listen, admin, e.gws, proxyArgs(e.redis.Addr)...)
	}
	e.lb.WaitServers(t, "UP", "proxy1", "proxy2")

	four := []ring.Member{}
	for i, g := range e.gws {
		four = append(four, ring.Member{ID: fmt.Sprintf("gw-%d", i+1), Addr: g.addr, Weight: 1})
	}
	r4, err := ring.New(four)
	if err != nil {
		t.Fatal(err)
	}
	ringMoves := 0
	for _, k := range keys {
		if m, _ := r4.Lookup([]byte(k)); m.ID != owner[k] {
			ringMoves++
		}
	}
	after := switchRun(t, e.lb.Bind, keys, 2)
	stayed := 0
	for _, k := range keys {
		if after[k] == owner[k] {
			stayed++
		}
	}
	t.Logf("gw-4 added: %d/%d bound keys stayed on their gateway; the ring alone would have moved %d (%.0f%%)",
		stayed, len(keys), ringMoves, 100*float64(ringMoves)/float64(len(keys)))
	if stayed != len(keys) {
		t.Fatalf("only %d of %d bound keys stayed", stayed, len(keys))
	}
	if ringMoves < len(keys)/10 {
		t.Fatalf("the ring would move only %d keys: the test shows nothing", ringMoves)
	}
	fresh := switchRun(t, e.lb.Bind, keyList("fresh", 300), 2)
	onNew := 0
	for _, g := range fresh {
		if g == "gw-4" {
			onNew++
		}
	}
	t.Logf("new keys: %d of 300 went to gw-4", onNew)
	if onNew < 30 {
		t.Fatalf("only %d new keys reached the new gateway", onNew)
	}
}

// TestRedisDiesMidRun: killing Redis costs no client an error (the ring
// takes over); when Redis is back the proxies use bindings again by
// themselves.
func TestRedisDiesMidRun(t *testing.T) {
	e := newEdge(t, 3)
	keys := keyList("rd", 200)
	switchRun(t, e.lb.Bind, keys, 2)
	sum := func(name string) float64 {
		total := 0.0
		for _, p := range e.proxies {
			total += metrics(t, p)[name]
		}
		return total
	}
	// Clients run continuously across the outage.
	tr := startTraffic(t, 8, e.lb.Bind, "127.0.0.2", func(w, i int) string { return keys[w*25+i%25] })
	waitFor(t, 10*time.Second, "traffic", func() bool { return tr.served.Load() > 200 })
	e.redis.Kill()
	errsAtKill := sum("tether_redis_errors_total")
	waitFor(t, 10*time.Second, "ring fallback", func() bool {
		return sum(`tether_routes_total{source="fallback"}`) > 100
	})
	fallbackServed := tr.served.Load()
	e.redis.Restart(t)
	bindingBefore := sum(`tether_routes_total{source="binding"}`)
	waitFor(t, 15*time.Second, "bindings in use again", func() bool {
		return sum(`tether_routes_total{source="binding"}`) > bindingBefore+100
	})
	tr.Stop()
	if tr.failed.Load() > 0 {
		t.Fatalf("%d client errors", tr.failed.Load())
	}
	if sum("tether_redis_errors_total") <= errsAtKill {
		t.Fatal("no Redis errors counted during the outage")
	}
	// One line per change of state, not per lookup: an outage, then a
	// recovery. A Redis that is restarting may answer, then fail once
	// more before it settles (the proxies see a real second outage), so
	// each outage line needs its recovery line, and a few is the most.
	for _, p := range e.proxies {
		down := p.logCount("redis unavailable: routing by the ring until it answers", "")
		up := p.logCount("redis answered again: bindings in use", "")
		if down < 1 || down > 3 || up != down {
			t.Errorf("proxy logged %d outages and %d recoveries, want one to three of each, paired", down, up)
		}
	}
	t.Logf("Redis killed and restarted under load: %d sessions served, none failed (%d while it was down)", tr.served.Load(), fallbackServed)
}

// TestUntrustedProxyHeader: a PROXY header from an address outside
// --trusted-proxies is refused with zero bytes, in require and optional
// mode, and a spoofed client address never reaches a gateway.
func TestUntrustedProxyHeader(t *testing.T) {
	gw := gatewayStub(t, 1, 0)
	strict := proxyFor(t, []*proc{gw}, "--proxy-protocol-in", "require", "--trusted-proxies", "127.0.0.1/32", "--log-level", "debug")
	lax := proxyFor(t, []*proc{gw}, "--proxy-protocol-in", "optional", "--trusted-proxies", "127.0.0.1/32", "--log-level", "debug")
	spoof, err := proxy.AppendProxyV2(nil, &net.TCPAddr{IP: net.IPv4(6, 6, 6, 6), Port: 666},
		&net.TCPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 443}, nil)
	if err != nil {
		t.Fatal(err)
	}
	h, _ := proto.AppendHello(nil, []byte("victim"), nil)
	for _, p := range []*proc{strict, lax} {
		got, _, err := badClient(p.addr, append(append([]byte{}, spoof...), h...), false, false)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 0 {
			t.Fatalf("untrusted header answered with %q", got)
		}
	}
	// Optional mode still serves an untrusted peer without a header, with
	// its real address; the strict proxy refuses it.
	res, err := session(lax.addr, "127.0.0.5", "plain")
	if err != nil || res.reply.Client != res.local.String() {
		t.Fatalf("optional mode, no header: %+v %v", res.reply, err)
	}
	if got, _, _ := badClient(strict.addr, h, false, false); len(got) != 0 {
		t.Fatalf("strict proxy answered an untrusted peer: %q", got)
	}
	waitFor(t, 5*time.Second, "rejections counted", func() bool {
		return metrics(t, strict)[`tether_connections_rejected_total{reason="untrusted_peer"}`] == 2 &&
			metrics(t, lax)[`tether_handshake_failures_total{reason="proxy_header_untrusted"}`] == 1
	})
	for _, p := range []*proc{strict, lax} {
		if strings.Contains(p.logs(), "6.6.6.6") {
			t.Fatalf("spoofed address reached the logs as a client:\n%s", p.logs())
		}
		if m := metrics(t, p); m[`tether_routes_total{source="ring"}`] > 1 {
			t.Fatalf("a rejected client was routed: %v", m[`tether_routes_total{source="ring"}`])
		}
	}
}

// TestNginxStream: the nginx example (stream module, PROXY protocol v1)
// works as the SLB.
func TestNginxStream(t *testing.T) {
	gw := gatewayStub(t, 1, 0)
	p1 := proxyFor(t, []*proc{gw}, "--proxy-protocol-in", "require", "--trusted-proxies", "127.0.0.1")
	p2 := proxyFor(t, []*proc{gw}, "--proxy-protocol-in", "require", "--trusted-proxies", "127.0.0.1")
	_, bind := testenv.StartNginx(t, "../../examples/nginx-stream.conf", map[string]string{
		"TETHER_PROXY1": p1.addr, "TETHER_PROXY2": p2.addr,
	})
	owner := switchRun(t, bind, keyList("ngx", 20), 4)
	if len(owner) != 20 {
		t.Fatalf("%d keys served", len(owner))
	}
}
