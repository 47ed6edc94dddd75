// Command gateway-stub is the reference gateway of DESIGN §1: it answers each
// hello with one JSON frame naming itself, the key, how many connections it
// has seen for that key and the client address it learned, then echoes. Every
// tether test and the demo run against it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/tether-proxy/tether/internal/cli"
	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/pkg/cluster"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

const usageHead = `Usage: gateway-stub --id ID [--listen HOST:PORT] [flags]

The reference tether gateway. After a client's hello frame it writes one frame
[u32 length][JSON] with {"gateway","key","conns","client"}, then echoes every
further byte until EOF and half-closes. "client" is the address from the PROXY
header when one is present, else the TCP peer.

Flags:
`

type options struct {
	listen, id, proxyProtocol string
	handshakeTimeout, drain   time.Duration
	logLevel, logFormat       string
	advertise                 string
	weight                    float64
	echoBuffer                int
	gossip                    cli.GossipFlags
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("gateway-stub", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.listen, "listen", "127.0.0.1:9000", "accept connections on `HOST:PORT`")
	fs.StringVar(&o.id, "id", "", "this gateway's stable `ID`, reported in every reply (required)")
	fs.StringVar(&o.proxyProtocol, "proxy-protocol", stub.ProxyOptional, "`MODE` for PROXY headers from the proxy: off (never parsed), optional (used when present) or require (connections without one are closed)")
	fs.DurationVar(&o.handshakeTimeout, "handshake-timeout", 5*time.Second, "the PROXY header and hello must arrive within this `DURATION`")
	fs.DurationVar(&o.drain, "drain-timeout", 10*time.Second, "on SIGTERM/SIGINT, stop accepting and let open sessions run for this `DURATION` before closing them")
	fs.StringVar(&o.logLevel, "log-level", "info", "`LEVEL`: debug, info, warn or error")
	fs.StringVar(&o.logFormat, "log-format", "json", "`FORMAT`: json or console")
	fs.StringVar(&o.advertise, "advertise", "", "service `HOST:PORT` proxies should connect to, published over gossip (default: the --listen address)")
	fs.IntVar(&o.echoBuffer, "echo-buffer", 0, "echo through a user-space buffer of `BYTES` instead of splice(2); splice holds a pipe per idle session, so benchmarks of many idle sessions use a small buffer (0: splice)")
	fs.Float64Var(&o.weight, "weight", 1, "ring `WEIGHT` published over gossip: a gateway of weight 2 gets twice the keys")
	o.gossip.Register(fs, "the --id")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usageHead)
		cli.PrintFlags(fs.Output(), fs)
	}
	if err := cli.Parse(fs, args, stderr); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q (flags start with --)", fs.Arg(0))
	}
	if o.id == "" {
		return o, errors.New("--id is required")
	}
	if o.weight <= 0 {
		return o, fmt.Errorf("--weight %v: want > 0", o.weight)
	}
	if o.gossip.Bind == "" && (o.gossip.Join != "" || o.gossip.KeyFile != "" || o.gossip.NodeName != "" || o.advertise != "") {
		return o, errors.New("--join, --node-name, --gossip-key and --advertise need --gossip-bind")
	}
	return o, nil
}

func run(args []string, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "gateway-stub: %v\nRun gateway-stub --help for the flags.\n", err)
		return 2
	}
	log, _, err := cli.NewLogger(o.logLevel, o.logFormat)
	if err != nil {
		fmt.Fprintf(stderr, "gateway-stub: %v\n", err)
		return 2
	}
	defer func() { _ = log.Sync() }()
	srv, err := stub.New(stub.Config{ID: o.id, ProxyProtocol: o.proxyProtocol, HandshakeTimeout: o.handshakeTimeout, EchoBuffer: o.echoBuffer, Logger: log.Named("stub")})
	if err != nil {
		fmt.Fprintf(stderr, "gateway-stub: %v\n", err)
		return 2
	}
	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		log.Error("listen failed", zap.Error(err))
		return 1
	}
	log.Info("listening", zap.String("addr", ln.Addr().String()), zap.String("id", o.id), zap.String("proxy_protocol", o.proxyProtocol))

	var node *cluster.Cluster
	if o.gossip.Bind != "" {
		node, err = startGossip(o, ln.Addr().String(), log)
		if err != nil {
			ln.Close()
			log.Error("gossip failed to start", zap.Error(err))
			return 1
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		log.Error("serve failed", zap.Error(err))
		return 1
	case <-ctx.Done():
	}
	stop() // a second signal kills the process the default way

	if node != nil {
		// Gossip drain: proxies stop sending new keys here but sessions
		// already open (and keys bound here) keep working until the
		// drain ends. Then leave the cluster and close what is left.
		log.Info("draining: published state draining; serving open sessions", zap.Int("sessions", srv.Sessions()), zap.Duration("drain_timeout", o.drain))
		if err := node.SetState(cluster.StateDraining, o.weight, 5*time.Second); err != nil {
			log.Warn("draining state not confirmed by a peer yet", zap.Error(err))
		}
		time.Sleep(o.drain)
		if err := node.Leave(5 * time.Second); err != nil {
			log.Warn("gossip leave not confirmed", zap.Error(err))
		}
		_ = node.Shutdown()
		log.Info("drain over: left the cluster; closing open sessions", zap.Int("sessions", srv.Sessions()))
		cctx, cancel := context.WithCancel(context.Background())
		cancel()
		_ = srv.Shutdown(cctx)
	} else {
		log.Info("shutting down: draining open sessions", zap.Int("sessions", srv.Sessions()), zap.Duration("drain_timeout", o.drain))
		dctx, cancel := context.WithTimeout(context.Background(), o.drain)
		defer cancel()
		_ = srv.Shutdown(dctx)
	}
	<-errc
	log.Info("stopped")
	return 0
}

// startGossip joins the cluster as a gateway node publishing its service
// address, weight and state.
func startGossip(o options, listenAddr string, log *zap.Logger) (*cluster.Cluster, error) {
	adv := o.advertise
	if adv == "" {
		host, _, err := net.SplitHostPort(listenAddr)
		if err != nil {
			return nil, err
		}
		if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
			return nil, fmt.Errorf("--listen %s has no specific host: set --advertise HOST:PORT for proxies to connect to", listenAddr)
		}
		adv = listenAddr
	}
	key, err := o.gossip.Key()
	if err != nil {
		return nil, err
	}
	name := o.gossip.NodeName
	if name == "" {
		name = o.id
	}
	node, err := cluster.New(cluster.Config{
		NodeName:  name,
		BindAddr:  o.gossip.Bind,
		Join:      cli.SplitList(o.gossip.Join),
		SecretKey: key,
		Profile:   o.gossip.Profile,
		Meta:      cluster.Meta{Role: cluster.RoleGateway, ID: o.id, Addr: adv, Weight: o.weight, State: cluster.StateActive},
		Logger:    log.Named("gossip"),
	})
	if err != nil {
		return nil, err
	}
	log.Info("gossip listening", zap.String("addr", node.Addr()), zap.String("node", node.Name()),
		zap.String("advertise", adv), zap.Float64("weight", o.weight), zap.Bool("encrypted", key != nil))
	return node, nil
}
