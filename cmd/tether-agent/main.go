// Command tether-agent is a sidecar that puts a gateway written in any
// language into tether's gossip cluster: it announces the gateway's ID and
// service address, health-checks the service (TCP connect or HTTP GET),
// publishes it down after --health-fails failed checks in a row and active
// again after one passing check, and on SIGTERM publishes draining for
// --drain-timeout, leaves and exits 0. The gateway itself only has to speak
// the wire protocol of docs/gateway.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/tether-proxy/tether/internal/cli"
	"github.com/tether-proxy/tether/pkg/gateway"
)

func main() {
	// Signals first, so one that arrives during start-up is handled.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGINT, syscall.SIGTERM)
	os.Exit(run(os.Args[1:], sigs, os.Stderr))
}

// Exit codes beyond 0 (left cleanly) and 2 (bad flags).
const (
	exitFailed   = 1 // gossip failed to start, or a second signal cut the drain short
	exitConflict = 3 // another live gateway holds this --id
)

const usageHead = `Usage: tether-agent --id ID --service HOST:PORT --gossip-bind HOST:PORT [--join SEED,...] [flags]

Announces a gateway written in any language to the tether cluster, the way
pkg/gateway does for Go gateways: proxies route keys to --service once the
gateway passes its health check. After --health-fails failed checks in a row
the gateway is published as down (proxies take it out of their rings within a
gossip round; its keys go to their second choice); one passing check makes it
active again. SIGTERM publishes draining (no new keys; open sessions go on)
for --drain-timeout, then leaves the cluster and exits 0.

Flags:
`

type options struct {
	id, service, health string
	weight              float64
	interval, drain     time.Duration
	fails               int
	logLevel, logFormat string
	gossip              cli.GossipFlags
	httpURL             *url.URL // when --health is http://...
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("tether-agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.id, "id", "", "the gateway's stable `ID`, what keys hash to (required)")
	fs.StringVar(&o.service, "service", "", "the gateway's service `HOST:PORT`, where proxies connect (required; a specific host)")
	fs.Float64Var(&o.weight, "weight", 1, "ring `WEIGHT`: a gateway of weight 2 gets twice the keys")
	fs.StringVar(&o.health, "health", "tcp", "health check: tcp (connect to --service) or an `URL` http://HOST:PORT/PATH (GET; 2xx or 3xx passes)")
	fs.DurationVar(&o.interval, "health-interval", time.Second, "time between health checks (`DURATION`); each check times out after it")
	fs.IntVar(&o.fails, "health-fails", 2, "publish the gateway down after `N` failed checks in a row")
	fs.DurationVar(&o.drain, "drain-timeout", 10*time.Second, "on SIGTERM, publish draining for this `DURATION`, then leave and exit 0 (a second signal leaves at once, exit 1)")
	fs.StringVar(&o.logLevel, "log-level", "info", "`LEVEL`: debug, info, warn or error")
	fs.StringVar(&o.logFormat, "log-format", "json", "`FORMAT`: json or console")
	o.gossip.Register(fs, "the --id")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usageHead)
		cli.PrintFlags(fs.Output(), fs)
	}
	if err := cli.Parse(fs, args, stderr); err != nil {
		return o, err
	}
	switch {
	case fs.NArg() > 0:
		return o, fmt.Errorf("unexpected argument %q (flags start with --)", fs.Arg(0))
	case o.id == "":
		return o, errors.New("--id is required")
	case o.service == "":
		return o, errors.New("--service HOST:PORT is required (where proxies connect to the gateway)")
	case o.gossip.Bind == "":
		return o, errors.New("--gossip-bind HOST:PORT is required (the agent's gossip address)")
	case o.weight <= 0:
		return o, fmt.Errorf("--weight %v: want > 0", o.weight)
	case o.interval <= 0 || o.drain < 0:
		return o, errors.New("--health-interval must be > 0 and --drain-timeout >= 0")
	case o.fails < 1:
		return o, fmt.Errorf("--health-fails %d: want >= 1", o.fails)
	}
	if err := cli.CheckAddr("service", o.service, false, false); err != nil {
		return o, err
	}
	if o.health != "tcp" {
		u, err := url.Parse(o.health)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return o, fmt.Errorf("--health %q: want tcp or http://HOST:PORT/PATH", o.health)
		}
		o.httpURL = u
	}
	if _, err := cli.ParseLevel(o.logLevel); err != nil {
		return o, err
	}
	return o, o.gossip.Validate()
}

func run(args []string, sigs <-chan os.Signal, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if code, ok := cli.FlagOutcome("tether-agent", err, stderr); !ok {
		return code
	}
	log, _, err := cli.NewLogger(o.logLevel, o.logFormat)
	if err != nil {
		fmt.Fprintf(stderr, "tether-agent: %v\n", err)
		return 2
	}
	defer func() { _ = log.Sync() }()
	keys, err := o.gossip.Keys()
	if err != nil {
		fmt.Fprintf(stderr, "tether-agent: %v\n", err)
		return 2
	}
	m, err := gateway.Join(gateway.MemberConfig{
		ID: o.id, Addr: o.service, Weight: o.weight,
		NodeName: o.gossip.NodeName, BindAddr: o.gossip.Bind, Join: cli.SplitList(o.gossip.Join),
		Keys: keys, Profile: gateway.Profile(o.gossip.Profile), Logger: log.Named("gossip"),
	})
	if err != nil {
		log.Error("gossip failed to start", zap.Error(err))
		return exitFailed
	}
	cli.WarnInsecureGossip(log, o.gossip)
	log.Info("gossip listening", zap.String("addr", m.GossipAddr()), zap.String("node", m.NodeName()), zap.String("id", o.id),
		zap.String("service", o.service), zap.String("health", o.health), zap.Bool("encrypted", m.Encrypted()))

	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	claimed := make(chan error, 1)
	go func() { claimed <- m.Claim(ctx) }()
	checks := make(chan error, 1)
	var tick <-chan time.Time // health checks start once the ID is ours
	h := health{fails: o.fails, log: log}
	for {
		select {
		case err := <-claimed:
			if err != nil {
				log.Error("refusing to announce: this gateway ID is taken; exiting", zap.String("id", o.id), zap.Error(err))
				_ = m.Leave(2 * time.Second)
				return exitConflict
			}
			t := time.NewTicker(o.interval)
			defer t.Stop()
			tick = t.C
			go func() { checks <- check(ctx, o) }()
		case <-tick:
			go func() { checks <- check(ctx, o) }()
		case err := <-checks:
			if st, changed := h.observe(err); changed {
				publish(ctx, m, st, o.interval, log)
			}
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				cli.ReloadKeys(log, o.gossip, m.SetKeys)
				continue
			}
			return drain(m, o, sigs, log)
		}
	}
}

// health turns check results into state changes: down after fails failures
// in a row, active after one success (and at the first success).
type health struct {
	fails    int
	failures int
	state    string // "" until the first result, then active or down
	log      *zap.Logger
}

func (h *health) observe(err error) (string, bool) {
	if err == nil {
		h.failures = 0
		if h.state == "active" {
			return "", false
		}
		if h.state == "" {
			h.log.Info("health check passed: announcing the gateway active")
		} else {
			h.log.Warn("health check passed again: gateway active")
		}
		h.state = "active"
		return h.state, true
	}
	h.failures++
	h.log.Debug("health check failed", zap.Int("in_a_row", h.failures), zap.Error(err))
	if h.failures < h.fails || h.state == "down" {
		return "", false
	}
	h.log.Warn("health check failed: gateway published down, its keys go to their next choice",
		zap.Int("in_a_row", h.failures), zap.Error(err))
	h.state = "down"
	return h.state, true
}

func publish(ctx context.Context, m *gateway.Member, state string, wait time.Duration, log *zap.Logger) {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	var err error
	if state == "active" {
		err = m.Up(ctx)
	} else {
		err = m.Down(ctx)
	}
	if err != nil {
		log.Error("cannot publish the gateway's state", zap.String("state", state), zap.Error(err))
	}
}

// check runs one health check, bounded by the interval.
func check(ctx context.Context, o options) error {
	ctx, cancel := context.WithTimeout(ctx, o.interval)
	defer cancel()
	if o.httpURL == nil {
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp", o.service)
		if err != nil {
			return err
		}
		return c.Close()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, o.httpURL.String(), nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode >= 400 {
		return fmt.Errorf("health %s: %s", o.httpURL, resp.Status)
	}
	return nil
}

// drain publishes draining for --drain-timeout (a second signal ends it),
// then leaves.
func drain(m *gateway.Member, o options, sigs <-chan os.Signal, log *zap.Logger) int {
	log.Info("draining: no new keys; open sessions go on", zap.Duration("drain_timeout", o.drain))
	ctx, cancel := context.WithTimeout(context.Background(), o.drain)
	defer cancel()
	forced := make(chan struct{})
	go func() {
		for sig := range sigs {
			if sig != syscall.SIGHUP {
				log.Warn("second stop signal: leaving now", zap.String("signal", sig.String()))
				close(forced)
				cancel()
				return
			}
		}
	}()
	_ = m.Drain(ctx) // waits for ctx: the agent cannot see the gateway's sessions
	select {
	case <-forced:
		return exitFailed
	default:
	}
	log.Info("left the cluster")
	return 0
}
