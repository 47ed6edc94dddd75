package stub

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/tether-proxy/tether/pkg/proto"
	"github.com/tether-proxy/tether/pkg/proxy"
)

func serve(t *testing.T, mode string) string {
	t.Helper()
	s, err := New(Config{ID: "gw-t", ProxyProtocol: mode, HandshakeTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = s.Shutdown(ctx)
		<-done
	})
	return ln.Addr().String()
}

// exchange sends prefix + hello("k") + "echo", half-closes, and returns the
// reply and the echoed bytes.
func exchange(t *testing.T, addr string, prefix []byte) (Reply, string, error) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	h, _ := proto.AppendHello(nil, []byte("k"), []byte("p"))
	if _, err := c.Write(append(append(prefix, h...), "echo"...)); err != nil {
		t.Fatal(err)
	}
	_ = c.(*net.TCPConn).CloseWrite()
	rep, _, err := ReadReply(c)
	if err != nil {
		return rep, "", err
	}
	rest, err := io.ReadAll(c)
	return rep, string(rest), err
}

func TestModes(t *testing.T) {
	client := &net.TCPAddr{IP: net.IPv4(10, 1, 2, 3), Port: 4567}
	hdr, err := proxy.AppendProxyV2(nil, client, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}, []byte("k"))
	if err != nil {
		t.Fatal(err)
	}
	local, err := proxy.AppendProxyV2(nil, &net.UnixAddr{}, &net.TCPAddr{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, mode string
		prefix     []byte
		client     string // "" means the TCP peer
		fails      bool
	}{
		{"require with header", ProxyRequire, hdr, "10.1.2.3:4567", false},
		{"require without header", ProxyRequire, nil, "", true},
		{"optional with header", ProxyOptional, hdr, "10.1.2.3:4567", false},
		{"optional without header", ProxyOptional, nil, "", false},
		{"LOCAL header means the TCP peer", ProxyRequire, local, "", false},
		{"off ignores nothing: a header is a bad hello", ProxyOff, hdr, "", true},
		{"off without header", ProxyOff, nil, "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr := serve(t, tt.mode)
			rep, echo, err := exchange(t, addr, tt.prefix)
			if tt.fails {
				if err == nil {
					t.Fatalf("got reply %+v", rep)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if rep.Gateway != "gw-t" || rep.Key != "k" || rep.Conns != 1 || echo != "echo" {
				t.Fatalf("reply %+v echo %q", rep, echo)
			}
			host, _, _ := net.SplitHostPort(rep.Client)
			if tt.client != "" && rep.Client != tt.client || tt.client == "" && host != "127.0.0.1" {
				t.Fatalf("client %q, want %q", rep.Client, tt.client)
			}
		})
	}
}

func TestConnsCountPerKey(t *testing.T) {
	addr := serve(t, ProxyOff)
	for i := 1; i <= 3; i++ {
		rep, _, err := exchange(t, addr, nil)
		if err != nil || rep.Conns != i {
			t.Fatalf("connection %d: %+v %v", i, rep, err)
		}
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	if _, err := New(Config{}); err == nil {
		t.Fatal("empty id accepted")
	}
	if _, err := New(Config{ID: "x", ProxyProtocol: "maybe"}); err == nil {
		t.Fatal("bad mode accepted")
	}
}
