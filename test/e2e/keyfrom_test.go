//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/internal/testenv"
)

// recordingConn keeps every byte the client received, headers included.
type recordingConn struct {
	net.Conn
	mu  *sync.Mutex
	got *bytes.Buffer
}

func (c recordingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	c.got.Write(p[:n])
	c.mu.Unlock()
	return n, err
}

// wsSession opens a WebSocket through via from src with cookie sid=key,
// reads the gateway's first message, echoes one message, and closes. It
// returns the reply, the local address and every byte received.
func wsSession(via, src, key string) (stub.Reply, string, []byte, error) {
	return wsSessionTLS(via, src, key, nil)
}

// wsSessionTLS is wsSession over wss:// when tc is set.
func wsSessionTLS(via, src, key string, tc *tls.Config) (stub.Reply, string, []byte, error) {
	var mu sync.Mutex
	var got bytes.Buffer
	var local string
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	client := &http.Client{Transport: &http.Transport{
		DisableKeepAlives: true,
		TLSClientConfig:   tc,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			local = c.LocalAddr().String()
			return recordingConn{Conn: c, mu: &mu, got: &got}, nil
		},
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	h := http.Header{}
	h.Set("Cookie", "theme=dark; sid="+key)
	scheme := "ws://"
	if tc != nil {
		scheme = "wss://"
	}
	ws, _, err := websocket.Dial(ctx, scheme+via+"/ws", &websocket.DialOptions{HTTPClient: client, HTTPHeader: h})
	if err != nil {
		return stub.Reply{}, local, got.Bytes(), err
	}
	defer ws.CloseNow()
	_, msg, err := ws.Read(ctx)
	if err != nil {
		return stub.Reply{}, local, got.Bytes(), err
	}
	var rep stub.Reply
	if err := json.Unmarshal(msg, &rep); err != nil {
		return rep, local, got.Bytes(), err
	}
	ping := "ping from " + local
	if err := ws.Write(ctx, websocket.MessageText, []byte(ping)); err != nil {
		return rep, local, got.Bytes(), err
	}
	_, echo, err := ws.Read(ctx)
	if err != nil || string(echo) != ping {
		return rep, local, got.Bytes(), fmt.Errorf("echo %q: %v", echo, err)
	}
	_ = ws.Close(websocket.StatusNormalClosure, "")
	mu.Lock()
	defer mu.Unlock()
	return rep, local, append([]byte(nil), got.Bytes()...), nil
}

// TestWebSocketCookieBehindHAProxy: a real WebSocket client with cookie
// sid=<key> switches 127.0.0.2 → 127.0.0.3 across two proxies behind
// HAProxy: 100% same gateway, messages echo, the gateway sees the real
// client, and no gateway address appears in anything the client received.
func TestWebSocketCookieBehindHAProxy(t *testing.T) {
	gws := []*proc{gatewayStub(t, 1, 0), gatewayStub(t, 2, 0), gatewayStub(t, 3, 0)}
	args := []string{"--key-from", "cookie:sid,query:sid", "--proxy-protocol-in", "require", "--trusted-proxies", "127.0.0.1"}
	p1, p2 := proxyFor(t, gws, args...), proxyFor(t, gws, args...)
	lb := testenv.StartHAProxy(t, haproxyCfg, "TETHER_PROXY1="+p1.addr, "TETHER_PROXY2="+p2.addr,
		"TETHER_ADMIN1_PORT="+portOf(p1.admin), "TETHER_ADMIN2_PORT="+portOf(p2.admin))
	lb.WaitServers(t, "UP", "proxy1", "proxy2")
	keys := keyList("ws", 60)
	var mu sync.Mutex
	spread := map[string]int{}
	parallel(len(keys), 8, func(i int) {
		first := ""
		for hop := range 4 {
			rep, local, raw, err := wsSession(lb.Bind, fmt.Sprintf("127.0.0.%d", 2+hop%2), keys[i])
			if bytes.Contains(raw, []byte(leakMarker)) {
				t.Errorf("%s: client received a gateway address:\n%s", keys[i], raw)
			}
			if err != nil {
				t.Errorf("%s hop %d: %v", keys[i], hop, err)
				return
			}
			if hop == 0 {
				first = rep.Gateway
				mu.Lock()
				spread[first]++
				mu.Unlock()
			} else if rep.Gateway != first {
				t.Errorf("%s hop %d: gateway %s, first %s", keys[i], hop, rep.Gateway, first)
			}
			if rep.Key != keys[i] || rep.Conns != hop+1 || rep.Client != local {
				t.Errorf("%s hop %d: reply %+v, local %s", keys[i], hop, rep, local)
			}
		}
	})
	if len(spread) != 3 {
		t.Fatalf("keys reached %d gateways: %v", len(spread), spread)
	}
	t.Logf("WebSocket, cookie sid, through HAProxy: %d keys × 4 connections on their gateway; spread %v", len(keys), spread)
}

// TestNoKeyActions: --no-key reject answers an HTTP request without the key
// with a plain 400 (no gateway address) and binary junk with nothing;
// --no-key hash-source routes it by client address.
func TestNoKeyActions(t *testing.T) {
	gw := gatewayStub(t, 1, 0)
	reject := proxyFor(t, []*proc{gw}, "--key-from", "cookie:sid")
	c, err := net.Dial("tcp", reject.addr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
	resp, _ := io.ReadAll(c)
	c.Close()
	if !strings.HasPrefix(string(resp), "HTTP/1.1 400 ") || bytes.Contains(resp, []byte(leakMarker)) {
		t.Fatalf("no-key HTTP answer: %q", resp)
	}
	if got, _, err := badClient(reject.addr, []byte("\x00\x01garbage"), false, false); err != nil || len(got) != 0 {
		t.Fatalf("binary junk answered %q (%v)", got, err)
	}

	hs := proxyFor(t, []*proc{gw}, "--key-from", "cookie:sid", "--no-key", "hash-source")
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 7)}}
	wc, err := d.Dial("tcp", hs.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer wc.Close()
	wc.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(wc, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	page, _ := io.ReadAll(io.LimitReader(wc, 200))
	if !strings.HasPrefix(string(page), "HTTP/1.1 200") {
		t.Fatalf("hash-source request not served: %q", page)
	}
	waitFor(t, 5*time.Second, "hash_source counted", func() bool {
		return metrics(t, hs)[`tether_no_key_total{action="hash_source"}`] == 1
	})
	if metrics(t, reject)[`tether_no_key_total{action="reject"}`] != 1 {
		t.Fatal("reject not counted")
	}
}

// TestLVKeyFrom: with --key-from lv:0:4 a client whose first bytes are
// [u32 len][key] (HAProxy's req.payload_lv shape) keeps its gateway across
// the WiFi→4G switch; the gateway learns the key from the PROXY v2 TLV.
func TestLVKeyFrom(t *testing.T) {
	gws := []*proc{gatewayStub(t, 1, 0), gatewayStub(t, 2, 0), gatewayStub(t, 3, 0)}
	p1 := proxyFor(t, gws, "--key-from", "lv:0:4")
	p2 := proxyFor(t, gws, "--key-from", "lv:0:4")
	parallel(100, 8, func(i int) {
		key := fmt.Sprintf("lv-key-%03d", i)
		first := ""
		for hop := range 4 {
			via := []*proc{p1, p2}[hop%2].addr
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(fmt.Sprintf("127.0.0.%d", 2+hop%2))}}
			c, err := d.Dial("tcp", via)
			if err != nil {
				t.Error(err)
				return
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			frame := binary.BigEndian.AppendUint32(nil, uint32(len(key)))
			frame = append(frame, key...)
			frame = append(frame, "payload"...)
			c.Write(frame)
			rep, _, err := stub.ReadReply(c)
			if err == nil {
				echo := make([]byte, len(frame))
				if _, err = io.ReadFull(c, echo); err == nil && !bytes.Equal(echo, frame) {
					err = fmt.Errorf("echo %q", echo)
				}
			}
			c.Close()
			if err != nil {
				t.Errorf("%s hop %d: %v", key, hop, err)
				return
			}
			if hop == 0 {
				first = rep.Gateway
			}
			if rep.Gateway != first || rep.Key != key || rep.Conns != hop+1 {
				t.Errorf("%s hop %d: %+v (first %s)", key, hop, rep, first)
			}
		}
	})
}
