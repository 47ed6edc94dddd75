//go:build e2e

package e2e

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/pkg/proto"
)

// cluster is 3 gateway stubs on 127.0.1.1-3 (PROXY header required) and 2
// proxies over them.
type cluster struct {
	gws     []*proc
	proxies []*proc
}

func newCluster(t *testing.T, proxyArgs ...string) *cluster {
	t.Helper()
	c := &cluster{}
	for i := 1; i <= 3; i++ {
		c.gws = append(c.gws, gatewayStub(t, i, 0))
	}
	for range 2 {
		c.proxies = append(c.proxies, proxyFor(t, c.gws, proxyArgs...))
	}
	return c
}

const leakMarker = "127.0.1."

// TestWiFiTo4GSwitch: 300 keys each connect from 127.0.0.2 through one proxy,
// drop with RST, reconnect from 127.0.0.3 through the other, three switches
// each. Every connection of a key must reach its first gateway, which must
// report the client's new address; nothing the client receives may contain a
// gateway address.
func TestWiFiTo4GSwitch(t *testing.T) {
	c := newCluster(t)
	const keys, hops = 300, 4
	sources := []string{"127.0.0.2", "127.0.0.3"}
	var mu sync.Mutex
	perGateway := map[string]int{}
	var failures []string
	fail := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		failures = append(failures, fmt.Sprintf(format, args...))
	}
	parallel(keys, 16, func(i int) {
		key := fmt.Sprintf("device-%04d", i)
		first := ""
		for hop := range hops {
			via := c.proxies[hop%2].addr
			res, err := session(via, sources[hop%2], key)
			if bytes.Contains(res.raw, []byte(leakMarker)) {
				fail("%s hop %d: client received a gateway address: %q", key, hop, res.raw)
			}
			if err != nil {
				fail("%s hop %d via %s: %v", key, hop, via, err)
				return
			}
			rep := res.reply
			if hop == 0 {
				first = rep.Gateway
				mu.Lock()
				perGateway[first]++
				mu.Unlock()
			}
			if rep.Gateway != first {
				fail("%s hop %d: gateway %s, first was %s", key, hop, rep.Gateway, first)
			}
			if rep.Conns != hop+1 {
				fail("%s hop %d: gateway counted %d connections for the key, want %d", key, hop, rep.Conns, hop+1)
			}
			if rep.Client != res.local.String() {
				fail("%s hop %d: gateway saw client %s, want %s", key, hop, rep.Client, res.local)
			}
			if rep.Key != key {
				fail("%s hop %d: gateway saw key %q", key, hop, rep.Key)
			}
		}
	})
	for _, f := range failures {
		t.Error(f)
	}
	if len(failures) > 0 {
		t.Fatalf("%d of %d connections failed", len(failures), keys*hops)
	}
	t.Logf("%d keys × %d connections: 100%% on their first gateway; spread %v", keys, hops, perGateway)
	for _, g := range []string{"gw-1", "gw-2", "gw-3"} {
		if perGateway[g] < keys/10 {
			t.Errorf("gateway %s owns %d of %d keys: not spread", g, perGateway[g], keys)
		}
	}
}

// TestGatewayFailover: kill -9 one gateway; its keys land on their second
// choice without a client error and no other key moves; restart it on the
// same address and its keys come back.
func TestGatewayFailover(t *testing.T) {
	c := newCluster(t, "--gateway-cooldown", "300ms")
	const keys = 300
	owner := make([]string, keys)
	second := make([]string, keys)
	for i := range keys {
		r := routeOf(t, c.proxies[0], fmt.Sprintf("k-%d", i))
		owner[i], second[i] = r[0], r[1]
	}
	check := func(phase string, want func(i int) string) {
		t.Helper()
		var errs atomic.Int64
		parallel(keys, 16, func(i int) {
			key := fmt.Sprintf("k-%d", i)
			res, err := session(c.proxies[i%2].addr, "127.0.0.2", key)
			if err != nil {
				errs.Add(1)
				t.Errorf("%s: %s: client error %v", phase, key, err)
				return
			}
			if w := want(i); res.reply.Gateway != w {
				t.Errorf("%s: %s served by %s, want %s", phase, key, res.reply.Gateway, w)
			}
		})
		if errs.Load() > 0 {
			t.Fatalf("%s: %d client errors", phase, errs.Load())
		}
	}
	check("all up", func(i int) string { return owner[i] })

	victim := c.gws[1] // gw-2
	addr := victim.addr
	victim.kill()
	moved := 0
	for i := range keys {
		if owner[i] == "gw-2" {
			moved++
		}
	}
	check("gw-2 killed", func(i int) string {
		if owner[i] == "gw-2" {
			return second[i]
		}
		return owner[i]
	})
	if moved == 0 {
		t.Fatal("gw-2 owned no keys")
	}
	t.Logf("gw-2 killed: its %d keys went to their second choice, the other %d stayed", moved, keys-moved)

	port := addr[strings.LastIndexByte(addr, ':')+1:]
	start(t, "gateway-stub", "--id", "gw-2", "--listen", "127.0.1.2:"+port, "--proxy-protocol", "require")
	// Once the cooldown passes, the owner is tried first again.
	waitFor(t, 10*time.Second, "gw-2's keys to come back", func() bool {
		back := 0
		for i := range keys {
			if owner[i] != "gw-2" {
				continue
			}
			res, err := session(c.proxies[i%2].addr, "127.0.0.3", fmt.Sprintf("k-%d", i))
			if err != nil {
				t.Fatalf("after restart: client error %v", err)
			}
			if res.reply.Gateway == "gw-2" {
				back++
			}
		}
		return back == moved
	})
	check("gw-2 back", func(i int) string { return owner[i] })
}

// TestBadInput: every malformed or slow client is closed with zero bytes
// written, within the handshake timeout, and counted by reason; good clients
// running at the same time are unaffected.
func TestBadInput(t *testing.T) {
	const hsTimeout = time.Second
	c := newCluster(t, "--handshake-timeout", hsTimeout.String(), "--log-level", "debug")
	p := c.proxies[0]
	frame := func(length uint32, rest ...byte) []byte {
		return append(binary.BigEndian.AppendUint32(nil, length), rest...)
	}
	good, _ := proto.AppendHello(nil, []byte("some-key"), []byte("payload"))
	tests := []struct {
		name   string
		send   []byte
		fin    bool
		slow   bool
		reason string
	}{
		{name: "garbage", send: []byte("\xde\xad\xbe\xef garbage \x00\x01"), reason: "too_large"},
		{name: "version 2", send: frame(3, 2, 1, 'k'), reason: "bad_version"},
		{name: "version 0", send: frame(3, 0, 1, 'k'), reason: "bad_version"},
		{name: "keylen 0", send: frame(2, 1, 0), reason: "bad_keylen"},
		{name: "length 0", send: frame(0), reason: "bad_length"},
		{name: "length 0xFFFFFFFF", send: frame(0xFFFFFFFF, 1, 1, 'k'), reason: "too_large"},
		{name: "length above max-hello", send: frame(4097, 1, 4, 'k', 'e', 'y', 's'), reason: "too_large"},
		{name: "truncated then FIN", send: good[:9], fin: true, reason: "eof"},
		{name: "HTTP request", send: []byte("GET / HTTP/1.1\r\nHost: tether\r\n\r\n"), reason: "too_large"},
		{name: "slow client", send: good[:5], slow: true, reason: "timeout"},
		{name: "silent client", reason: "timeout"},
	}

	// Good clients keep running through the whole test.
	goodClients := startTraffic(t, 4, p.addr, "127.0.0.4", func(w, i int) string { return fmt.Sprintf("good-%d-%d", w, i) })

	before := metrics(t, p)
	want := map[string]float64{}
	for _, tt := range tests {
		want[tt.reason]++
	}
	var bwg sync.WaitGroup
	for _, tt := range tests {
		bwg.Add(1)
		go func() {
			defer bwg.Done()
			got, elapsed, err := badClient(p.addr, tt.send, tt.fin, tt.slow)
			if err != nil {
				t.Errorf("%s: %v", tt.name, err)
				return
			}
			if len(got) != 0 {
				t.Errorf("%s: proxy wrote %d bytes: %q", tt.name, len(got), got)
			}
			if limit := hsTimeout + time.Second; elapsed > limit {
				t.Errorf("%s: closed after %v, want within the handshake timeout (%v, plus 1s slack)", tt.name, elapsed, hsTimeout)
			}
		}()
	}
	bwg.Wait()
	goodClients.Stop()
	if goodClients.failed.Load() > 0 || goodClients.served.Load() == 0 {
		t.Fatalf("good clients: %d served, %d failed", goodClients.served.Load(), goodClients.failed.Load())
	}
	waitFor(t, 5*time.Second, "handshake failure counters", func() bool {
		after := metrics(t, p)
		for reason, n := range want {
			k := fmt.Sprintf(`tether_handshake_failures_total{reason="%s"}`, reason)
			if after[k]-before[k] != n {
				return false
			}
		}
		return true
	})
	for reason, n := range want {
		if got := p.logCount("handshake failed; closing client without a reply", reason); got != int(n) {
			t.Errorf("%d debug log lines with reason %s, want %d", got, reason, int(n))
		}
	}
	t.Logf("%d bad clients closed with zero bytes; %d good sessions meanwhile, none failed", len(tests), goodClients.served.Load())
}

// badClient sends b and reports what came back and how long until the proxy
// closed the connection.
func badClient(addr string, b []byte, fin, slow bool) ([]byte, time.Duration, error) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 5)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	start := time.Now()
	if slow {
		// One byte at a time, never finishing the hello.
		for i := range b {
			if _, err := c.Write(b[i : i+1]); err != nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	} else if len(b) > 0 {
		if _, err := c.Write(b); err != nil {
			return nil, 0, err
		}
	}
	if fin {
		_ = c.(*net.TCPConn).CloseWrite()
	}
	got, err := io.ReadAll(c)
	elapsed := time.Since(start)
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		return got, elapsed, fmt.Errorf("read: %w", err)
	}
	return got, elapsed, nil
}

// TestNoLeak: after 10,000 sessions (good ones closed by RST or by a clean
// half-close, bad hellos, silent clients) the proxy's goroutines and open
// descriptors return to their baseline.
func TestNoLeak(t *testing.T) {
	c := newCluster(t, "--handshake-timeout", "300ms")
	p := c.proxies[0]
	sample := func() (goroutines float64, sockets, fds int) {
		sockets, fds = fdCounts(t, p)
		return metrics(t, p)["go_goroutines"], sockets, fds
	}
	// Warm up at the test's concurrency so pools and runtime workers exist
	// before the baseline.
	parallel(320, 32, func(i int) {
		if _, err := session(p.addr, "127.0.0.2", fmt.Sprintf("warm-%d", i)); err != nil {
			t.Error(err)
		}
	})
	waitFor(t, 5*time.Second, "warm-up sessions to close", func() bool {
		return metrics(t, p)["tether_connections_active"] == 0
	})
	baseG, baseSock, baseFD := sample()

	const total = 10000
	var errs atomic.Int64
	bad := []byte{0, 0, 0, 3, 9, 1, 'k'}
	parallel(total, 32, func(i int) {
		from := fmt.Sprintf("127.0.0.%d", 2+i%8)
		var err error
		switch {
		case i%50 == 0: // silent until the handshake timeout
			_, _, err = badClient(p.addr, nil, false, false)
		case i%10 == 1: // bad hello
			_, _, err = badClient(p.addr, bad, false, false)
		case i%4 == 2: // good, ends with a clean half-close from the client
			err = halfCloseSession(p.addr, from, fmt.Sprintf("hc-%d", i))
		default: // good, dropped with RST
			_, err = session(p.addr, from, fmt.Sprintf("k-%d", i))
		}
		if err != nil {
			errs.Add(1)
			t.Errorf("session %d: %v", i, err)
		}
	})
	if errs.Load() > 0 {
		t.Fatalf("%d sessions failed", errs.Load())
	}
	var g float64
	var sock, fds int
	// Free splice pipes are kept for reuse (at most 64, two descriptors
	// each, in the proxy's parker): a bounded pool, not a leak.
	const pipePoolFDs = 2 * 64
	waitFor(t, 20*time.Second, "goroutines and descriptors back to baseline", func() bool {
		g, sock, fds = sample()
		return g <= baseG && sock <= baseSock && fds <= baseFD+pipePoolFDs
	}, func() string {
		return fmt.Sprintf("goroutines %v (base %v), sockets %d (base %d), descriptors %d (base %d)", g, baseG, sock, baseSock, fds, baseFD)
	})
	m := metrics(t, p)
	accepted, closed := m["tether_connections_accepted_total"], m["tether_connections_closed_total"]
	if accepted != closed || accepted < total {
		t.Fatalf("accepted %v, closed %v", accepted, closed)
	}
	t.Logf("%d sessions: goroutines %v → %v, sockets %d → %d, all descriptors %d → %d", total, baseG, g, baseSock, sock, baseFD, fds)
}

// halfCloseSession sends a hello and data, half-closes, and reads until the
// gateway's echo ends with EOF: the clean close path.
func halfCloseSession(via, from, key string) error {
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	c, err := d.Dial("tcp", via)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	h, _ := proto.AppendHello(nil, []byte(key), nil)
	if _, err := c.Write(append(h, "bye"...)); err != nil {
		return err
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return err
	}
	all, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if !bytes.HasSuffix(all, []byte("bye")) {
		return fmt.Errorf("echo missing: %q", all)
	}
	return nil
}

// TestProxySIGTERM: on SIGTERM the proxy refuses new connections at once,
// /readyz fails, an open session keeps echoing until it ends on its own, and
// the process exits 0.
func TestProxySIGTERM(t *testing.T) {
	gw := gatewayStub(t, 1, 0)
	p := proxyFor(t, []*proc{gw}, "--drain-timeout", "20s")
	c, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	h, _ := proto.AppendHello(nil, []byte("draining"), nil)
	if _, err := c.Write(h); err != nil {
		t.Fatal(err)
	}
	if _, _, err := stub.ReadReply(c); err != nil {
		t.Fatal(err)
	}
	if code := httpStatus(t, "http://"+p.admin+"/readyz"); code != 200 {
		t.Fatalf("readyz %d before SIGTERM", code)
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "listener to close", func() bool {
		nc, err := net.DialTimeout("tcp", p.addr, time.Second)
		if err != nil {
			return true
		}
		nc.Close()
		return false
	})
	if code := httpStatus(t, "http://"+p.admin+"/readyz"); code != 503 {
		t.Fatalf("readyz %d while draining, want 503", code)
	}
	for i := range 5 {
		msg := []byte(fmt.Sprintf("still here %d", i))
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("session broken during drain: %q %v", got, err)
		}
	}
	_ = c.(*net.TCPConn).CloseWrite()
	if _, err := io.ReadAll(c); err != nil {
		t.Fatal(err)
	}
	if code := p.exitCode(10 * time.Second); code != 0 {
		t.Fatalf("exit code %d", code)
	}
}
