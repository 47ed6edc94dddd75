package proxy_test

import (
	"context"
	"fmt"
	"net"
	"time"

	"github.com/tether-proxy/tether/pkg/proxy"
	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route"
)

// A proxy in front of two gateways: keys hash to a gateway ID on the ring,
// and the server splices each client to its gateway.
func ExampleServer() {
	r, err := ring.New([]ring.Member{
		{ID: "gw-1", Addr: "10.0.1.1:9000", Weight: 1},
		{ID: "gw-2", Addr: "10.0.1.2:9000", Weight: 1},
	})
	if err != nil {
		panic(err)
	}
	var h ring.Holder
	h.Store(r) // a cluster.Syncer keeps it current in a real proxy
	cfg := proxy.DefaultConfig()
	cfg.Resolver = &route.RingResolver{Ring: &h}
	srv, err := proxy.New(cfg)
	if err != nil {
		panic(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	go func() { _ = srv.Serve(ln) }()

	// On SIGTERM: stop accepting and close the open sessions spread over
	// ten seconds, so their clients come back spread out.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	fmt.Println(srv.Shutdown(ctx))
	// Output: <nil>
}
