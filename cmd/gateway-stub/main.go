// Command gateway-stub is the reference gateway: it answers each hello with
// one JSON frame naming itself, the key, how many connections it has seen
// for that key and the client address it learned, then echoes. Every tether
// test and the demo run against it. It is a small application on
// pkg/gateway (handshake, newest-session-wins, gossip membership).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/tether-proxy/tether/internal/cli"
	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/pkg/gateway"
)

func main() {
	// Signals first, so one that arrives during start-up is handled, not
	// fatal.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGINT, syscall.SIGTERM)
	os.Exit(run(os.Args[1:], sigs, os.Stderr))
}

// Exit codes beyond 0 (stopped cleanly) and 2 (bad flags).
const (
	exitFailed   = 1 // could not serve, or a second signal cut the drain short
	exitConflict = 3 // another live gateway holds this --id
)

const usageHead = `Usage: gateway-stub --id ID [--listen HOST:PORT] [flags]

The reference tether gateway. After a client's hello frame it writes one frame
[u32 length][JSON] with {"gateway","key","conns","client"}, then echoes every
further byte until EOF and half-closes. "client" is the address from the PROXY
header when one is present, else the TCP peer.

Flags:
`

type options struct {
	listen, id, proxyProtocol string
	trusted                   string
	trustedPrefixes           []netip.Prefix
	newestWins                bool
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
	fs.StringVar(&o.trusted, "trusted-proxies", "127.0.0.0/8,::1", "comma-separated `CIDRS` (or addresses) of the tether proxies whose PROXY headers are believed; a header from anywhere else is refused")
	fs.BoolVar(&o.newestWins, "newest-wins", true, "when a connection for a key arrives while an older one for that key is still open here, reset the older one (a phone that changed networks leaves a stale session behind); --newest-wins=false keeps both")
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
	if o.gossip.Bind == "" && o.advertise != "" {
		return o, errors.New("--advertise needs --gossip-bind")
	}
	if err := cli.CheckAddr("listen", o.listen, true, true); err != nil {
		return o, err
	}
	if o.advertise != "" {
		if err := cli.CheckAddr("advertise", o.advertise, false, false); err != nil {
			return o, err
		}
	}
	p, err := cli.ParsePrefixes(o.trusted)
	if err != nil {
		return o, fmt.Errorf("--trusted-proxies: %w", err)
	}
	if len(p) == 0 && o.proxyProtocol != stub.ProxyOff {
		return o, errors.New("--trusted-proxies is empty: give the proxies' addresses, or --proxy-protocol off")
	}
	o.trustedPrefixes = p
	return o, o.gossip.Validate()
}

func run(args []string, sigs <-chan os.Signal, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if code, ok := cli.FlagOutcome("gateway-stub", err, stderr); !ok {
		return code
	}
	log, _, err := cli.NewLogger(o.logLevel, o.logFormat)
	if err != nil {
		fmt.Fprintf(stderr, "gateway-stub: %v\n", err)
		return 2
	}
	defer func() { _ = log.Sync() }()
	srv, err := stub.New(stub.Config{ID: o.id, ProxyProtocol: o.proxyProtocol, TrustedProxies: o.trustedPrefixes, HandshakeTimeout: o.handshakeTimeout,
		EchoBuffer: o.echoBuffer, KeepOlder: !o.newestWins, Logger: log.Named("stub")})
	if err != nil {
		fmt.Fprintf(stderr, "gateway-stub: %v\n", err)
		return 2
	}
	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		log.Error("listen failed", zap.Error(err))
		return exitFailed
	}
	log.Info("listening", zap.String("addr", ln.Addr().String()), zap.String("id", o.id), zap.String("proxy_protocol", o.proxyProtocol))

	var member *gateway.Member
	claimed := make(chan error, 1)
	claimCtx, stopClaim := context.WithCancel(context.Background())
	defer stopClaim()
	announcing := false
	if o.gossip.Bind != "" {
		member, err = startGossip(o, ln.Addr().String(), log)
		if err != nil {
			ln.Close()
			log.Error("gossip failed to start", zap.Error(err))
			return exitFailed
		}
		announcing = true
		go func() { claimed <- announce(claimCtx, member, o, log) }()
	}

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	for stopping := false; !stopping; {
		select {
		case err := <-errc:
			log.Error("serve failed", zap.Error(err))
			return exitFailed
		case err := <-claimed:
			announcing = false
			if err == nil {
				continue
			}
			log.Error("refusing to announce: this gateway ID is taken; exiting", zap.String("id", o.id), zap.Error(err))
			_ = member.Leave(2 * time.Second)
			cctx, cancel := context.WithCancel(context.Background())
			cancel()
			_ = srv.Shutdown(cctx)
			<-errc
			return exitConflict
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				var set func([][]byte) error
				if member != nil {
					set = member.SetKeys
				}
				cli.ReloadKeys(log, o.gossip, set)
				continue
			}
			stopping = true
		}
	}

	// A second signal while draining closes everything at once.
	dctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var forced atomic.Bool
	go func() {
		for sig := range sigs {
			if sig != syscall.SIGHUP {
				log.Warn("second stop signal: closing every session now", zap.String("signal", sig.String()), zap.Int("sessions", srv.Sessions()))
				forced.Store(true)
				cancel()
				return
			}
		}
	}()
	if announcing {
		// Never publish active after draining began.
		stopClaim()
		<-claimed
	}
	if member != nil {
		// Gossip drain: proxies stop sending new keys here but sessions
		// already open (and keys bound here) keep working until the
		// drain ends. Then leave the cluster and close what is left.
		log.Info("draining: published state draining; serving open sessions", zap.Int("sessions", srv.Sessions()), zap.Duration("drain_timeout", o.drain))
		tctx, tcancel := context.WithTimeout(dctx, o.drain)
		_ = member.Drain(tctx) // the stub serves for the whole drain time, then leaves
		tcancel()
		log.Info("drain over: left the cluster; closing open sessions", zap.Int("sessions", srv.Sessions()))
		cancel()
		_ = srv.Shutdown(dctx)
	} else {
		log.Info("shutting down: draining open sessions", zap.Int("sessions", srv.Sessions()), zap.Duration("drain_timeout", o.drain))
		tctx, tcancel := context.WithTimeout(dctx, o.drain)
		defer tcancel()
		_ = srv.Shutdown(tctx)
	}
	<-errc
	if forced.Load() {
		log.Warn("stopped early: second stop signal")
		return exitFailed
	}
	log.Info("stopped")
	return 0
}

// announce publishes the gateway active once no other live member holds
// its ID (it joined as draining, so it never takes a key meanwhile).
func announce(ctx context.Context, m *gateway.Member, o options, log *zap.Logger) error {
	if err := m.Announce(ctx); err != nil {
		if ctx.Err() != nil {
			return nil // stopping before the join finished
		}
		return err
	}
	log.Info("announced: taking new keys", zap.String("id", o.id), zap.Float64("weight", o.weight))
	return nil
}

// startGossip joins the cluster as a gateway publishing its service
// address, weight and state (draining until announce).
func startGossip(o options, listenAddr string, log *zap.Logger) (*gateway.Member, error) {
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
	keys, err := o.gossip.Keys()
	if err != nil {
		return nil, err
	}
	m, err := gateway.Join(gateway.MemberConfig{
		ID: o.id, Addr: adv, Weight: o.weight,
		NodeName: o.gossip.NodeName, BindAddr: o.gossip.Bind, Join: cli.SplitList(o.gossip.Join),
		Keys: keys, Profile: gateway.Profile(o.gossip.Profile), Logger: log.Named("gossip"),
	})
	if err != nil {
		return nil, err
	}
	cli.WarnInsecureGossip(log, o.gossip)
	log.Info("gossip listening", zap.String("addr", m.GossipAddr()), zap.String("node", m.NodeName()),
		zap.String("advertise", adv), zap.Float64("weight", o.weight), zap.Bool("encrypted", m.Encrypted()))
	return m, nil
}
