package proxy

import (
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/internal/testcert"
	"github.com/tether-proxy/tether/pkg/ring"
)

// tlsProxy starts a TLS-terminating proxy over one stub gateway and returns
// it with a client configuration that trusts its certificate.
func tlsProxy(t *testing.T, opts ...func(*Config)) (*harness, *tls.Config) {
	t.Helper()
	ca, err := testcert.NewCA("tether test CA")
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.Issue("proxy", "proxy.test", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	cert, err := leaf.TLS()
	if err != nil {
		t.Fatal(err)
	}
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	cfg := DefaultConfig()
	cfg.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	for _, o := range opts {
		o(&cfg)
	}
	h := start(t, cfg, ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
	return h, &tls.Config{RootCAs: ca.Pool(), ServerName: "proxy.test"}
}

func TestTLSSessionEchoesAndHalfCloses(t *testing.T) {
	h, ccfg := tlsProxy(t)
	c, err := tls.Dial("tcp", h.addr, ccfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write(hello(t, "alice", ""))
	rep, _, err := stub.ReadReply(c)
	if err != nil || rep.Key != "alice" || rep.Gateway != "gw-1" {
		t.Fatalf("reply %+v, %v", rep, err)
	}
	msg := []byte("over TLS, decrypted for the gateway")
	c.Write(msg)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != string(msg) {
		t.Fatalf("echo %q, %v", got, err)
	}
	// Half-close: close_notify then FIN; the echo gateway answers with its
	// own end, and the session ends cleanly.
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
		t.Fatalf("after half-close: %q, %v", rest, err)
	}
	waitFor(t, func() bool { return testutil.ToFloat64(h.m.SessionEnds.WithLabelValues("closed")) == 1 })
	if n := testutil.ToFloat64(h.m.TLSHandshakes.WithLabelValues("false")); n != 1 {
		t.Fatalf("tls handshakes %v, want 1", n)
	}
}

func TestTLSRejects(t *testing.T) {
	h, ccfg := tlsProxy(t)
	tests := []struct {
		name   string
		dial   func() (net.Conn, error)
		reason string
	}{
		{"cleartext hello", func() (net.Conn, error) {
			c, err := net.Dial("tcp", h.addr)
			if err == nil {
				_, err = c.Write(hello(t, "plain", ""))
			}
			return c, err
		}, reasonTLS},
		{"TLS 1.1 client", func() (net.Conn, error) {
			cfg := ccfg.Clone()
			cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS10, tls.VersionTLS11
			c, err := net.Dial("tcp", h.addr)
			if err == nil {
				_ = tls.Client(c, cfg).Handshake()
			}
			return c, nil
		}, reasonTLSHandshake},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := testutil.ToFloat64(h.m.HandshakeFailures.WithLabelValues(tt.reason))
			c, err := tt.dial()
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			waitFor(t, func() bool { return testutil.ToFloat64(h.m.HandshakeFailures.WithLabelValues(tt.reason)) == before+1 })
			if tt.reason == reasonTLS {
				_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
				if b, _ := io.ReadAll(c); len(b) != 0 {
					t.Fatalf("a cleartext client got %d bytes: %q", len(b), b)
				}
			}
		})
	}
}

// tlsGateway starts a stub gateway behind TLS with a certificate from ca
// for 127.0.0.1.
func tlsGateway(t *testing.T, ca *testcert.CA) string {
	t.Helper()
	leaf, err := ca.Issue("gateway", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	cert, err := leaf.TLS()
	if err != nil {
		t.Fatal(err)
	}
	srv, err := stub.New(stub.Config{ID: "gw-tls", ProxyProtocol: stub.ProxyRequire, KeepOlder: true})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}})) }()
	t.Cleanup(func() { ln.Close() })
	return ln.Addr().String()
}

func TestGatewayTLS(t *testing.T) {
	ca, _ := testcert.NewCA("gateway CA")
	other, _ := testcert.NewCA("some other CA")
	tests := []struct {
		name string
		ca   *testcert.CA
		ok   bool
	}{{"trusted gateway", ca, true}, {"gateway signed by another CA", other, false}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			gw := tlsGateway(t, tt.ca)
			cfg := DefaultConfig()
			cfg.GatewayTLS = &tls.Config{RootCAs: ca.Pool(), MinVersion: tls.VersionTLS12}
			h := start(t, cfg, ring.Member{ID: "gw-tls", Addr: gw, Weight: 1})
			c := dial(t, h.addr)
			c.Write(hello(t, "k", ""))
			rep, _, err := stub.ReadReply(c)
			if !tt.ok {
				if err == nil {
					t.Fatalf("a gateway with an untrusted certificate answered: %+v", rep)
				}
				waitFor(t, func() bool { return testutil.ToFloat64(h.m.DialFailures.WithLabelValues("gw-tls")) == 1 })
				return
			}
			if err != nil || rep.Gateway != "gw-tls" {
				t.Fatalf("reply %+v, %v", rep, err)
			}
			c.Write([]byte("payload"))
			got := make([]byte, len("payload"))
			if _, err := io.ReadFull(c, got); err != nil || string(got) != "payload" {
				t.Fatalf("echo %q, %v", got, err)
			}
		})
	}
}

// TestTLSSessionQuietThenBusy: a TLS session quiet for longer than
// --park-after (its direction gave its buffer back and waits for the
// socket) carries a record split across two writes, then 4 MiB, intact.
func TestTLSSessionQuietThenBusy(t *testing.T) {
	h, ccfg := tlsProxy(t, func(c *Config) { c.ParkAfter = 20 * time.Millisecond })
	c, err := tls.Dial("tcp", h.addr, ccfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	c.Write(hello(t, "quiet", ""))
	if _, _, err := stub.ReadReply(c); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // real time: the copy's read deadline must fire
	data := make([]byte, 4<<20)
	for i := range data {
		data[i] = byte(i % 251)
	}
	go func() { _, _ = c.Write(data) }()
	got := make([]byte, len(data))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatal(err)
	}
	for i := range got {
		if got[i] != data[i] {
			t.Fatalf("byte %d differs after the quiet spell", i)
		}
	}
}
