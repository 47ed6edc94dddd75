package proxy

import (
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/tether-proxy/tether/internal/cli"
	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/pkg/ring"
)

func TestProxyProtocolListenerConfig(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln.Close()
	if _, err := ProxyProtocolListener(ln, ProxyInRequire, nil, time.Second, nil, nil); err == nil {
		t.Fatal("require without trusted proxies accepted")
	}
	if _, err := ProxyProtocolListener(ln, "sometimes", nil, time.Second, nil, nil); err == nil {
		t.Fatal("bad mode accepted")
	}
	if got, err := ProxyProtocolListener(ln, ProxyInOff, nil, time.Second, nil, nil); err != nil || got != ln {
		t.Fatal("off must return the listener unchanged")
	}
}

// TestProxyProtocolIn: the client address the gateway learns comes from a
// PROXY header only when a trusted peer sent it; every other header is
// refused with zero bytes, and a spoofed address never reaches a gateway.
func TestProxyProtocolIn(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	spoofed := &net.TCPAddr{IP: net.IPv4(6, 6, 6, 6), Port: 666}
	header := func(t *testing.T) []byte {
		b, err := AppendProxyV2(nil, spoofed, &net.TCPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 443}, nil)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	local, _ := AppendProxyV2(nil, &net.UnixAddr{}, &net.TCPAddr{}, nil)
	garbage := append([]byte("\r\n\r\n\x00\r\nQUIT\n"), 0x21, 0x11, 0, 3, 1, 2, 3)
	tests := []struct {
		name    string
		mode    ProxyInMode
		trusted string
		prefix  []byte
		client  string // expected client in the reply; "" means rejected
		reason  string // handshake failure or rejection reason
	}{
		{"require, trusted, header", ProxyInRequire, "127.0.0.1", nil, "6.6.6.6:666", ""},
		{"require, trusted, no header", ProxyInRequire, "127.0.0.1", []byte{}, "", reasonHeaderMissing},
		{"require, trusted, LOCAL header", ProxyInRequire, "127.0.0.1", local, "peer", ""},
		{"require, trusted, broken header", ProxyInRequire, "127.0.0.1", garbage, "", reasonHeaderInvalid},
		{"require, untrusted", ProxyInRequire, "10.9.9.9", nil, "", "untrusted_peer"},
		{"optional, untrusted, header", ProxyInOptional, "10.9.9.9", nil, "", reasonHeaderUntrusted},
		{"optional, untrusted, no header", ProxyInOptional, "10.9.9.9", []byte{}, "peer", ""},
		{"optional, trusted, header", ProxyInOptional, "127.0.0.0/8", nil, "6.6.6.6:666", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			trusted, err := cli.ParsePrefixes(tt.trusted)
			if err != nil {
				t.Fatal(err)
			}
			cfg := DefaultConfig()
			cfg.HandshakeTimeout = time.Second
			h := startWrapped(t, cfg, func(ln net.Listener, m *Metrics) net.Listener {
				w, err := ProxyProtocolListener(ln, tt.mode, trusted, time.Second, m, nil)
				if err != nil {
					t.Fatal(err)
				}
				return w
			}, ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
			prefix := tt.prefix
			if prefix == nil {
				prefix = header(t)
			}
			c := dial(t, h.addr)
			if _, err := c.Write(append(append([]byte{}, prefix...), hello(t, "k", "")...)); err != nil && tt.client != "" {
				t.Fatal(err)
			}
			if tt.client == "" {
				got, err := io.ReadAll(c)
				if len(got) != 0 {
					t.Fatalf("rejected client got %q", got)
				}
				if err != nil && !errors.Is(err, syscall.ECONNRESET) {
					t.Fatal(err)
				}
				counter := h.m.HandshakeFailures.WithLabelValues(tt.reason)
				if tt.reason == "untrusted_peer" {
					counter = h.m.Rejected.WithLabelValues(tt.reason)
				}
				waitFor(t, func() bool { return testutil.ToFloat64(counter) == 1 })
				return
			}
			rep, _, err := stub.ReadReply(c)
			if err != nil {
				t.Fatal(err)
			}
			want := tt.client
			if want == "peer" {
				want = c.LocalAddr().String()
			}
			if rep.Client != want {
				t.Fatalf("gateway saw %s, want %s", rep.Client, want)
			}
		})
	}
}

// TestProxyHeaderInPieces: a v1 or v2 header split over several segments is
// served (go-proxyproto alone drops a split v1 line), and a header that
// stops half way times out as "timeout", not as a missing header.
func TestProxyHeaderInPieces(t *testing.T) {
	gw := gateway(t, "gw-1", stub.ProxyRequire)
	src := &net.TCPAddr{IP: net.IPv4(6, 6, 6, 6), Port: 666}
	v2, err := AppendProxyV2(nil, src, &net.TCPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 443}, nil)
	if err != nil {
		t.Fatal(err)
	}
	v1 := []byte("PROXY TCP4 6.6.6.6 10.0.0.1 666 443\r\n")
	tests := []struct {
		name   string
		pieces [][]byte // written one by one; the hello follows the last
		stall  bool     // stop after the pieces, never send the rest
	}{
		{"v1 in two pieces", [][]byte{v1[:9], v1[9:]}, false},
		{"v1 byte by byte", splitEvery(v1, 1), false},
		{"v2 in two pieces", [][]byte{v2[:7], v2[7:]}, false},
		{"v1 stops half way", [][]byte{v1[:12]}, true},
		{"v2 stops half way", [][]byte{v2[:20]}, true},
		{"v1 signature only", [][]byte{v1[:3]}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			trusted, _ := cli.ParsePrefixes("127.0.0.1")
			cfg := DefaultConfig()
			cfg.HandshakeTimeout = 300 * time.Millisecond
			h := startWrapped(t, cfg, func(ln net.Listener, m *Metrics) net.Listener {
				w, err := ProxyProtocolListener(ln, ProxyInRequire, trusted, cfg.HandshakeTimeout, m, nil)
				if err != nil {
					t.Fatal(err)
				}
				return w
			}, ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
			c := dial(t, h.addr)
			for _, p := range tt.pieces {
				if _, err := c.Write(p); err != nil {
					t.Fatal(err)
				}
				// Let each piece leave as its own segment (the test
				// passes either way; this makes it exercise the split).
				time.Sleep(5 * time.Millisecond)
			}
			if tt.stall {
				got, _ := io.ReadAll(c)
				if len(got) != 0 {
					t.Fatalf("stalled client got %q", got)
				}
				waitFor(t, func() bool { return testutil.ToFloat64(h.m.HandshakeFailures.WithLabelValues(reasonTimeout)) == 1 })
				if n := testutil.ToFloat64(h.m.HandshakeFailures.WithLabelValues(reasonHeaderMissing)); n != 0 {
					t.Fatalf("counted as missing header %v times", n)
				}
				return
			}
			if _, err := c.Write(hello(t, "k", "")); err != nil {
				t.Fatal(err)
			}
			rep, _, err := stub.ReadReply(c)
			if err != nil {
				t.Fatal(err)
			}
			if rep.Client != "6.6.6.6:666" {
				t.Fatalf("gateway saw %s, want the header's 6.6.6.6:666", rep.Client)
			}
		})
	}
}

func splitEvery(b []byte, n int) [][]byte {
	var out [][]byte
	for len(b) > n {
		out = append(out, b[:n])
		b = b[n:]
	}
	return append(out, b)
}
