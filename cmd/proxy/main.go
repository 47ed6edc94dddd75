// Command proxy is the tether proxy: it reads a session key from each
// client's first bytes, picks the owning gateway on a weighted rendezvous
// ring, and splices the client to it. See README.md and --help.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"

	"github.com/tether-proxy/tether/internal/cli"
	"github.com/tether-proxy/tether/pkg/admin"
	"github.com/tether-proxy/tether/pkg/cluster"
	"github.com/tether-proxy/tether/pkg/proto"
	"github.com/tether-proxy/tether/pkg/proxy"
	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

// options are the parsed flags.
type options struct {
	listen, admin                 string
	gateways                      cli.GatewayList
	proxyProtocolOut              string
	handshakeTimeout, dialTimeout time.Duration
	cooldown, drainTimeout        time.Duration
	maxHello, maxTries, maxConns  int
	logLevel, logFormat           string
	gossip                        cli.GossipFlags
	proxyProtocolIn, trusted      string
	trustedPrefixes               []netip.Prefix
	redisURL                      string
	bindingTTL, redisTimeout      time.Duration
}

const usageHead = `Usage: proxy --gateway ID=HOST:PORT [--gateway ...] [flags]
       proxy --gossip-bind HOST:PORT --join SEED[,SEED...] [flags]

tether proxy: reads the session key from each client's first bytes (a hello
frame: u32 length, version 1, keylen, key, payload), resolves the gateway that
owns the key on a weighted rendezvous ring, and splices the client to it. Every
proxy with the same gateway list sends a key to the same gateway, so a client
that reconnects through any proxy lands where its session lives. Gateways come
from --gateway flags, from gossip (--gossip-bind), or both.

Flags:
`

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.listen, "listen", ":7000", "accept clients on `HOST:PORT`")
	fs.StringVar(&o.admin, "admin", "", "serve the admin HTTP API on `HOST:PORT` (/metrics, /healthz, /readyz, /route?key=); off when empty.\nIt answers with gateway addresses: bind it to loopback or a private network")
	fs.Var(&o.gateways, "gateway", "a gateway as `ID=HOST:PORT[,weight=W]`; repeat for each gateway.\nThe ID is what keys hash to: keep it stable when the address changes. weight=0 drains the gateway (no keys)")
	fs.StringVar(&o.proxyProtocolOut, "proxy-protocol-out", "v2", "`MODE` toward gateways: v2 sends a PROXY v2 header with the client address and the key (TLV 0xE0); off sends nothing extra")
	fs.StringVar(&o.proxyProtocolIn, "proxy-protocol-in", proxy.ProxyInOff, "`MODE` for PROXY headers from the load balancer: off (the TCP peer is the client), optional (use a header from a trusted peer when present) or require (only trusted peers, always with a header). A header from any other peer is rejected")
	fs.StringVar(&o.trusted, "trusted-proxies", "", "comma-separated `CIDRS` (or addresses) of load balancers whose PROXY headers are believed; required with --proxy-protocol-in optional|require")
	fs.StringVar(&o.redisURL, "redis", "", "Redis `URL` for key→gateway bindings (redis://host:port/db; ?master_name=M for Sentinel; redis+cluster://host:port for Cluster). Bindings keep sessions on their gateway while the fleet changes; off when empty")
	fs.DurationVar(&o.bindingTTL, "binding-ttl", route.DefaultBindingTTL, "a binding lives this `DURATION` after the key's last connect")
	fs.DurationVar(&o.redisTimeout, "redis-timeout", route.DefaultRedisTimeout, "bound on the Redis work of one connect (`DURATION`); slower or down Redis means routing by the ring")
	fs.DurationVar(&o.handshakeTimeout, "handshake-timeout", proxy.DefaultHandshakeTimeout, "the whole hello must arrive within this `DURATION`, or the client is closed without a reply")
	fs.IntVar(&o.maxHello, "max-hello", proto.DefaultMaxHello, "largest hello frame length in `BYTES`; longer frames are closed without a reply")
	fs.IntVar(&o.maxTries, "max-tries", route.DefaultMaxTries, "try up to `N` gateways per connection, in failover order")
	fs.DurationVar(&o.dialTimeout, "dial-timeout", route.DefaultDialTimeout, "give up on a gateway connection attempt after this `DURATION`")
	fs.DurationVar(&o.cooldown, "gateway-cooldown", route.DefaultCooldown, "after a failed connection attempt, skip the gateway for this `DURATION` (its keys use their next choice)")
	fs.IntVar(&o.maxConns, "max-conns", 0, "accept at most `N` concurrent client connections; more are closed at once (0: no limit)")
	fs.DurationVar(&o.drainTimeout, "drain-timeout", 10*time.Second, "on SIGTERM/SIGINT, stop accepting and let open sessions run for this `DURATION` before closing them")
	fs.StringVar(&o.logLevel, "log-level", "info", "`LEVEL`: debug, info, warn or error (failed handshakes are logged at debug)")
	fs.StringVar(&o.logFormat, "log-format", "json", "`FORMAT`: json or console")
	o.gossip.Register(fs, "hostname-GOSSIPPORT")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usageHead)
		cli.PrintFlags(fs.Output(), fs)
	}
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q (flags start with --)", fs.Arg(0))
	}
	switch {
	case len(o.gateways) == 0 && o.gossip.Bind == "":
		return o, errors.New("no gateways: give --gateway ID=HOST:PORT (repeatable), or --gossip-bind HOST:PORT to discover them")
	case o.gossip.Bind == "" && (o.gossip.Join != "" || o.gossip.KeyFile != "" || o.gossip.NodeName != ""):
		return o, errors.New("--join, --node-name and --gossip-key need --gossip-bind")
	case o.proxyProtocolOut != "v2" && o.proxyProtocolOut != "off":
		return o, fmt.Errorf("--proxy-protocol-out %q: want v2 or off", o.proxyProtocolOut)
	case o.maxHello < 3 || o.maxHello > 1<<20:
		return o, fmt.Errorf("--max-hello %d: want 3..1048576", o.maxHello)
	case o.maxTries < 1:
		return o, fmt.Errorf("--max-tries %d: want >= 1", o.maxTries)
	case o.handshakeTimeout <= 0 || o.dialTimeout <= 0:
		return o, errors.New("--handshake-timeout and --dial-timeout must be > 0")
	case o.maxConns < 0:
		return o, fmt.Errorf("--max-conns %d: want >= 0", o.maxConns)
	}
	if _, err := ring.New(o.gateways); err != nil {
		return o, fmt.Errorf("--gateway: %w", err)
	}
	switch o.proxyProtocolIn {
	case proxy.ProxyInOff:
	case proxy.ProxyInOptional, proxy.ProxyInRequire:
		p, err := proxy.ParsePrefixes(o.trusted)
		if err != nil {
			return o, fmt.Errorf("--trusted-proxies: %w", err)
		}
		if len(p) == 0 {
			return o, fmt.Errorf("--proxy-protocol-in %s needs --trusted-proxies (the load balancers' addresses)", o.proxyProtocolIn)
		}
		o.trustedPrefixes = p
	default:
		return o, fmt.Errorf("--proxy-protocol-in %q: want off, optional or require", o.proxyProtocolIn)
	}
	if o.redisURL != "" {
		if o.bindingTTL <= 0 || o.redisTimeout <= 0 {
			return o, errors.New("--binding-ttl and --redis-timeout must be > 0")
		}
		c, err := route.NewRedisClient(o.redisURL, o.redisTimeout)
		if err != nil {
			return o, err
		}
		c.Close()
	}
	return o, nil
}

func run(args []string, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "proxy: %v\nRun proxy --help for the flags.\n", err)
		return 2
	}
	log, err := cli.NewLogger(o.logLevel, o.logFormat)
	if err != nil {
		fmt.Fprintf(stderr, "proxy: %v\n", err)
		return 2
	}
	defer func() { _ = log.Sync() }()
	if err := serve(o, log); err != nil {
		log.Error("proxy stopped", zap.Error(err))
		return 1
	}
	return 0
}

func serve(o options, log *zap.Logger) error {
	var holder ring.Holder
	r, err := ring.New(o.gateways)
	if err != nil {
		return fmt.Errorf("gateway list: %w", err)
	}
	holder.Store(r)

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics := proxy.NewMetrics(reg)
	var resolver route.Resolver = &route.RingResolver{Ring: &holder, Candidates: o.maxTries}
	if o.redisURL != "" {
		rc, err := route.NewRedisClient(o.redisURL, o.redisTimeout)
		if err != nil {
			return err
		}
		defer rc.Close()
		br, err := route.NewBindingResolver(route.BindingConfig{
			Client: rc, Ring: &holder, Candidates: o.maxTries, TTL: o.bindingTTL, Timeout: o.redisTimeout,
			Logger:  log.Named("redis"),
			OnError: func(error) { metrics.RedisErrors.Inc() },
		})
		if err != nil {
			return err
		}
		if err := br.Preload(context.Background()); err != nil {
			log.Warn("redis not reachable at start: routing by the ring until it answers", zap.Error(err))
		} else {
			log.Info("redis bindings on", zap.Duration("binding_ttl", o.bindingTTL), zap.Duration("redis_timeout", o.redisTimeout))
		}
		resolver = br
	}
	srv, err := proxy.New(proxy.Config{
		Resolver:         resolver,
		Dialer:           &route.Dialer{MaxTries: o.maxTries, DialTimeout: o.dialTimeout, Cooldown: o.cooldown},
		Extractor:        proto.HelloExtractor{MaxLen: o.maxHello},
		HandshakeTimeout: o.handshakeTimeout,
		ProxyProtocolOut: o.proxyProtocolOut == "v2",
		MaxConns:         o.maxConns,
		Logger:           log.Named("proxy"),
		Metrics:          metrics,
	})
	if err != nil {
		return err
	}
	tcpLn, err := net.Listen("tcp", o.listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	ln, err := proxy.ProxyProtocolListener(tcpLn, o.proxyProtocolIn, o.trustedPrefixes, o.handshakeTimeout, metrics, log.Named("proxy"))
	if err != nil {
		tcpLn.Close()
		return err
	}
	ids := make([]string, 0, len(o.gateways))
	for _, g := range o.gateways {
		ids = append(ids, g.ID)
	}
	log.Info("listening", zap.String("addr", ln.Addr().String()), zap.Strings("static_gateways", ids),
		zap.String("proxy_protocol_in", o.proxyProtocolIn), zap.String("proxy_protocol_out", o.proxyProtocolOut))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	// Membership: the static list, plus gossip when enabled. Sync keeps
	// the ring current until the process stops.
	var members cluster.Membership
	var node *cluster.Cluster
	if o.gossip.Bind != "" {
		node, err = startGossip(o, ln.Addr().String(), log)
		if err != nil {
			ln.Close()
			return err
		}
		members = node
		defer func() {
			if err := node.Leave(5 * time.Second); err != nil {
				log.Warn("gossip leave not confirmed", zap.Error(err))
			}
			_ = node.Shutdown()
		}()
	}
	syncCtx, stopSync := context.WithCancel(context.Background())
	syncDone := make(chan struct{})
	go func() {
		defer close(syncDone)
		cluster.Sync(syncCtx, members, o.gateways, &holder, log.Named("ring"), func(r *ring.Ring, gws []cluster.GatewayInfo) {
			metrics.ObserveRing(r)
			if node != nil {
				metrics.ClusterMembers.Set(float64(node.Members()))
			}
		})
	}()
	defer func() { stopSync(); <-syncDone }()

	var adminSrv *http.Server
	if o.admin != "" {
		aln, err := net.Listen("tcp", o.admin)
		if err != nil {
			ln.Close()
			return fmt.Errorf("admin listen: %w", err)
		}
		adminSrv = &http.Server{
			Handler: admin.Handler(admin.Config{
				Gatherer: reg,
				Resolver: resolver,
				Ready:    func() bool { return !srv.Closing() && holder.Load().Len() > 0 },
			}),
			ReadHeaderTimeout: 5 * time.Second,
		}
		log.Info("admin listening", zap.String("addr", aln.Addr().String()))
		go func() {
			if err := adminSrv.Serve(aln); !errors.Is(err, http.ErrServerClosed) {
				log.Error("admin server stopped", zap.Error(err))
			}
		}()
	}

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	stop() // a second signal kills the process the default way
	log.Info("shutting down: draining open sessions", zap.Int("sessions", srv.Active()), zap.Duration("drain_timeout", o.drainTimeout))
	dctx, cancel := context.WithTimeout(context.Background(), o.drainTimeout)
	defer cancel()
	if err := srv.Shutdown(dctx); err != nil {
		log.Info("drain timeout reached; remaining sessions closed")
	}
	<-errc
	if adminSrv != nil {
		_ = adminSrv.Close()
	}
	log.Info("stopped")
	return nil
}

// startGossip joins the cluster as a proxy node that publishes its client
// address.
func startGossip(o options, listenAddr string, log *zap.Logger) (*cluster.Cluster, error) {
	var key []byte
	if o.gossip.KeyFile != "" {
		k, err := cli.ReadGossipKey(o.gossip.KeyFile)
		if err != nil {
			return nil, err
		}
		key = k
	}
	name := o.gossip.NodeName
	node, err := cluster.New(cluster.Config{
		NodeName:  name,
		BindAddr:  o.gossip.Bind,
		Join:      cli.SplitList(o.gossip.Join),
		SecretKey: key,
		Profile:   o.gossip.Profile,
		Meta:      cluster.Meta{Role: cluster.RoleProxy, ID: cmpOr(name, "proxy"), Addr: listenAddr},
		Logger:    log.Named("gossip"),
	})
	if err != nil {
		return nil, err
	}
	log.Info("gossip listening", zap.String("addr", node.Addr()), zap.String("node", node.Name()),
		zap.Strings("join", cli.SplitList(o.gossip.Join)), zap.Bool("encrypted", key != nil))
	return node, nil
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}
