package gateway_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/netip"
	"time"

	"github.com/tether-proxy/tether/pkg/gateway"
	"github.com/tether-proxy/tether/pkg/proto"
	"github.com/tether-proxy/tether/pkg/proxy"
)

// A gateway behind tether proxies: every accepted connection already knows
// its session key, the real client address and the hello payload. Here the
// test plays the proxy: a PROXY v2 header with the key TLV, then the hello.
func Example() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	l, err := gateway.NewListener(ln, gateway.Config{
		TrustedProxies: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, // the tether proxies
	})
	if err != nil {
		log.Fatal(err)
	}
	defer l.Close()

	// What a tether proxy sends for a phone at 100.64.1.2:40000.
	go func() {
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			log.Fatal(err)
		}
		defer c.Close()
		phone := &net.TCPAddr{IP: net.IPv4(100, 64, 1, 2), Port: 40000}
		hdr, _ := proxy.AppendProxyV2(nil, phone, c.RemoteAddr(), []byte("user-42"))
		hello, _ := proto.AppendHello(nil, []byte("user-42"), []byte("v=3"))
		_, _ = c.Write(append(append(hdr, hello...), "ping"...))
		_, _ = io.Copy(io.Discard, c)
	}()

	c, err := l.AcceptConn()
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 4)
	_, _ = io.ReadFull(c, buf)
	fmt.Printf("key %s, client %s, hello payload %q, then %q\n", c.Key(), c.ClientAddr(), c.Payload(), buf)
	// Output: key user-42, client 100.64.1.2:40000, hello payload "v=3", then "ping"
}

// Joining the gossip cluster: the gateway is known at once but takes keys
// only after Announce has checked that its ID is free; on shutdown Drain
// stops new keys, waits for open sessions and leaves.
func ExampleJoin() {
	ln, err := net.Listen("tcp", "10.0.1.5:9000")
	if err != nil {
		log.Fatal(err)
	}
	l, err := gateway.NewListener(ln, gateway.Config{TrustedProxies: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24")}})
	if err != nil {
		log.Fatal(err)
	}
	m, err := gateway.Join(gateway.MemberConfig{
		ID:           "gw-5",
		Addr:         "10.0.1.5:9000", // where proxies connect
		BindAddr:     "10.0.1.5:7946", // gossip
		Join:         []string{"10.0.1.1:7946"},
		Keys:         [][]byte{[]byte("0123456789abcdef0123456789abcdef")}, // the cluster's --gossip-key
		OpenSessions: l.Open,
	})
	if err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.Announce(ctx); err != nil {
		log.Fatal(err) // gateway.ErrIDConflict: another live gateway has gw-5
	}
	// ... serve l.AcceptConn() until told to stop, then:
	dctx, dcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer dcancel()
	_ = m.Drain(dctx)
}

// Newest session wins: a phone that changed networks leaves its old
// connection behind without a FIN; when it reconnects, the old one is reset
// and the application moves the session's state.
func ExampleConfig_onReplaced() {
	cfg := gateway.Config{
		TrustedProxies: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24")},
		OnReplaced: func(older, newer *gateway.Conn) {
			log.Printf("session %s moved from %s to %s", newer.Key(), older.ClientAddr(), newer.ClientAddr())
		},
	}
	_ = cfg
}
