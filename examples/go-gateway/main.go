// Command go-gateway is a whole tether gateway on pkg/gateway alone: it joins
// gossip, answers each hello with the reference reply, echoes, and drains.
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"io"
	"log"
	"net"
	"net/netip"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/tether-proxy/tether/pkg/gateway"
)

func main() {
	id := flag.String("id", "gw-9", "gateway ID")
	addr := flag.String("listen", "127.0.1.9:9000", "service address")
	bind := flag.String("gossip-bind", "127.0.1.9:7946", "gossip address")
	join := flag.String("join", "", "comma-separated gossip seeds (none for the first node)")
	flag.Parse()
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	l, err := gateway.NewListener(ln, gateway.Config{TrustedProxies: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}})
	if err != nil {
		log.Fatal(err)
	}
	m, err := gateway.Join(gateway.MemberConfig{ID: *id, Addr: ln.Addr().String(), BindAddr: *bind, Join: strings.FieldsFunc(*join, func(r rune) bool { return r == ',' }), OpenSessions: l.Open})
	if err != nil {
		log.Fatal(err)
	}
	ctx, _ := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	if err := m.Announce(ctx); err != nil {
		log.Fatal(err)
	}
	log.Printf("gateway %s serving on %s", *id, ln.Addr())
	go func() {
		for c, err := l.AcceptConn(); err == nil; c, err = l.AcceptConn() {
			go func() {
				defer c.Close()
				body, _ := json.Marshal(map[string]any{"gateway": *id, "key": c.Key(), "conns": 1, "client": c.ClientAddr().String()})
				_, _ = c.Write(append(binary.BigEndian.AppendUint32(nil, uint32(len(body))), body...))
				_, _ = io.Copy(c, c) // echo
			}()
		}
	}()
	<-ctx.Done()
	dctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = m.Drain(dctx) // no new keys, wait for open sessions, leave
}
