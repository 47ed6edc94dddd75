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
	if o.id == "" {
		return o, errors.New("--id is required")
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
	log, err := cli.NewLogger(o.logLevel, o.logFormat)
	if err != nil {
		fmt.Fprintf(stderr, "gateway-stub: %v\n", err)
		return 2
	}
	defer func() { _ = log.Sync() }()
	srv, err := stub.New(stub.Config{ID: o.id, ProxyProtocol: o.proxyProtocol, HandshakeTimeout: o.handshakeTimeout, Logger: log.Named("stub")})
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
	stop()
	log.Info("shutting down: draining open sessions", zap.Int("sessions", srv.Sessions()), zap.Duration("drain_timeout", o.drain))
	dctx, cancel := context.WithTimeout(context.Background(), o.drain)
	defer cancel()
	_ = srv.Shutdown(dctx)
	<-errc
	log.Info("stopped")
	return 0
}
