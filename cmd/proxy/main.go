// Command proxy is the tether proxy: it reads a session key from each
// client's first bytes, picks the owning gateway (a Redis binding or a
// weighted rendezvous ring over the gateways it knows), and splices the
// client to it. See README.md and --help.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"

	"github.com/tether-proxy/tether/internal/cli"
	"github.com/tether-proxy/tether/internal/pidfile"
	"github.com/tether-proxy/tether/internal/sock"
	"github.com/tether-proxy/tether/internal/tlsconf"
	"github.com/tether-proxy/tether/internal/upgrade"
	"github.com/tether-proxy/tether/internal/version"
	"github.com/tether-proxy/tether/pkg/admin"
	"github.com/tether-proxy/tether/pkg/cluster"
	"github.com/tether-proxy/tether/pkg/proto"
	"github.com/tether-proxy/tether/pkg/proxy"
	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route"
	"github.com/tether-proxy/tether/pkg/route/redisbind"
)

func main() {
	// Signals first: from here on a SIGHUP, SIGTERM or SIGUSR2 that
	// arrives while the proxy starts is handled once it serves, never by
	// the default action (which would kill it). Before main runs (the
	// dynamic loader, package init: a few milliseconds) the default
	// action applies; signal the process by its --pid-file, which is
	// written only after this.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGINT, syscall.SIGTERM, syscall.SIGUSR2)
	os.Exit(run(os.Args[1:], sigs, os.Stdout, os.Stderr))
}

// errForced means a second stop signal cut the drain short.
var errForced = errors.New("second stop signal: closed every session at once")

// options are the parsed flags (and config file).
type options struct {
	config      string        // --config: YAML file of flags (command line wins)
	checkConfig bool          // --check-config: validate, print, exit
	listen      string        // --listen: client address
	admin       string        // --admin: admin HTTP address ("" off)
	adminToken  string        // --admin-token (or the file's content): bearer token for the admin API
	adminFile   string        // --admin-token-file
	lookupToken string        // --lookup-token (or the file's content): read-only token
	lookupFile  string        // --lookup-token-file
	pprof       bool          // --pprof: profiler on the admin server
	noPark      bool          // --no-park: goroutine and pipe per direction instead of parking
	eventLoops  int           // --event-loops: accept/handshake/parked-wakeup loops; 0 = proxy.DefaultEventLoops
	parkAfter   time.Duration // --park-after: idle time before a direction parks

	gateways         cli.GatewayList // --gateway: the static list
	gossip           cli.GossipFlags // --gossip-bind, --join, --node-name, --gossip-key, ...
	proxyProtocolOut string          // --proxy-protocol-out: v2 or off
	proxyProtocolIn  string          // --proxy-protocol-in: off, optional or require
	trusted          string          // --trusted-proxies as given
	trustedPrefixes  []netip.Prefix  // ... parsed by validate

	keyFrom   string          // --key-from as given
	extractor proto.Extractor // ... parsed by validate
	noKey     string          // --no-key: reject or hash-source
	maxHello  int             // --max-hello: bytes

	handshakeTimeout time.Duration // --handshake-timeout
	dialTimeout      time.Duration // --dial-timeout: per gateway attempt
	maxTries         int           // --max-tries: gateways per connection
	cooldown         time.Duration // --gateway-cooldown
	clientKeepAlive  time.Duration // --client-keepalive (0 off)
	maxConns         int           // --max-conns (0 no limit)
	maxHandshakes    int           // --max-handshakes (0 no limit)
	gatewayRate      float64       // --gateway-rate: new sessions/s per gateway (0 off)
	drainTimeout     time.Duration // --drain-timeout: after SIGTERM
	pidFile          string        // --pid-file ("" none)
	upgradeTimeout   time.Duration // --upgrade-timeout: each phase of a SIGUSR2 upgrade
	supervise        bool          // --supervise: be a tiny PID 1 around the proxy

	redisURL     string        // --redis ("" off)
	bindingTTL   time.Duration // --binding-ttl
	redisTimeout time.Duration // --redis-timeout: per connect

	logLevel, logFormat string // --log-level, --log-format

	tlsCerts, tlsKeys cli.StringList  // --tls-cert, --tls-key: pairs, in order
	tlsTicketKeys     string          // --tls-ticket-keys FILE
	tls               *tlsconf.Server // ... loaded by validate (nil: no TLS)
	gatewayTLS        bool            // --gateway-tls
	gatewayCA         string          // --gateway-ca FILE
}

const usageHead = `Usage: proxy --gateway ID=HOST:PORT [--gateway ...] [flags]
       proxy --gossip-bind HOST:PORT --join SEED[,SEED...] [flags]
       proxy --config FILE [--check-config] [flags]

tether proxy: reads the session key from each client's first bytes (a hello
frame: u32 length, version 1, keylen, key, payload), resolves the gateway that
owns the key (a Redis binding, else a weighted rendezvous ring), and splices
the client to it. Every proxy with the same gateways sends a key to the same
gateway, so a client that reconnects through any proxy lands where its session
lives. Gateways come from --gateway flags, from gossip (--gossip-bind), or both.

Every flag can also be set in the --config YAML file, under its name without
the dashes (listen: ":7000", gateway: [ "gw-1=10.0.1.1:9000" ],
handshake-timeout: "5s"); flags on the command line win. SIGHUP re-reads the
file's gateway list and log level without dropping sessions. SIGUSR2 upgrades
in place: the executable on disk is started again with the same arguments and
takes over the listeners and every established session (docs/operating.md).

Flags:
`

func newFlagSet(o *options, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.config, "config", "", "read flags from this YAML `FILE` (keys are flag names without dashes; command-line flags win)")
	fs.BoolVar(&o.checkConfig, "check-config", false, "validate the flags and --config file, print the result and exit (0 valid, 2 invalid), like haproxy -c")
	fs.StringVar(&o.listen, "listen", ":7000", "accept clients on `HOST:PORT`")
	fs.StringVar(&o.admin, "admin", "", "serve the admin HTTP API on `HOST:PORT` (/metrics, /healthz, /readyz, /lookup?key= and POST /lookup, /route?key=, /gateways, POST /gateways/ID/drain|undrain); off when empty.\nIt must be a loopback address unless --admin-token is set")
	fs.StringVar(&o.adminToken, "admin-token", "", "bearer `TOKEN` required by every admin endpoint but /metrics, /healthz and /readyz; allows a non-loopback --admin. Prefer --admin-token-file to keep it out of ps")
	fs.StringVar(&o.adminFile, "admin-token-file", "", "read --admin-token from this `FILE` (one line)")
	fs.StringVar(&o.lookupToken, "lookup-token", "", "a read-only bearer `TOKEN` for dispatch services: accepted on /lookup and /route (which then need it or the admin token), refused (403) on /gateways and drain/undrain. Prefer --lookup-token-file")
	fs.StringVar(&o.lookupFile, "lookup-token-file", "", "read --lookup-token from this `FILE` (one line)")
	fs.BoolVar(&o.noPark, "no-park", false, "keep a goroutine and, while blocked, a splice pipe per direction for every session instead of parking idle sessions in tether's own epoll set (a fallback; parking is what makes idle sessions cost 2 descriptors)")
	fs.IntVar(&o.eventLoops, "event-loops", 0, "`N` event loops (epoll sets, each served by one goroutine) accept connections, run their handshakes and serve parked sessions; 0 means one per CPU Go uses (GOMAXPROCS). Not used with --no-park")
	fs.DurationVar(&o.parkAfter, "park-after", proxy.DefaultParkAfter, "a session direction idle this `DURATION` gives back its goroutine and waits in tether's epoll set instead (no pipe, no goroutine); busy sessions never park")
	fs.BoolVar(&o.pprof, "pprof", false, "serve Go's profiler under /debug/pprof/ on the admin server (behind --admin-token if set)")
	fs.Var(&o.gateways, "gateway", "a gateway as `ID=HOST:PORT[,weight=W]`; repeat for each gateway.\nThe ID is what keys hash to: keep it stable when the address changes. weight=0 drains the gateway (no new keys)")
	fs.StringVar(&o.proxyProtocolOut, "proxy-protocol-out", "v2", "`MODE` toward gateways: v2 sends a PROXY v2 header with the client address and the key (TLV 0xE0); off sends nothing extra")
	fs.StringVar(&o.proxyProtocolIn, "proxy-protocol-in", string(proxy.ProxyInOff), "`MODE` for PROXY headers (v1 or v2) from the load balancer: off (the TCP peer is the client), optional (use a header from a trusted peer when present) or require (only trusted peers, always with a header). A header from any other peer is rejected")
	fs.StringVar(&o.trusted, "trusted-proxies", "", "comma-separated `CIDRS` (or addresses) of load balancers whose PROXY headers are believed; required with --proxy-protocol-in optional|require")
	fs.StringVar(&o.redisURL, "redis", "", "Redis `URL` for key→gateway bindings (redis://host:port/db; ?master_name=M for Sentinel; redis+cluster://host:port for Cluster). Bindings keep sessions on their gateway while the fleet changes; off when empty")
	fs.DurationVar(&o.bindingTTL, "binding-ttl", redisbind.DefaultTTL, "a binding lives this `DURATION` after the key's last connect")
	fs.DurationVar(&o.redisTimeout, "redis-timeout", redisbind.DefaultTimeout, "bound on the Redis work of one connect (`DURATION`); slower or down Redis means routing by the ring")
	fs.DurationVar(&o.handshakeTimeout, "handshake-timeout", proxy.DefaultHandshakeTimeout, "the PROXY header and whole hello must arrive within this `DURATION`, or the client is closed without a reply")
	fs.StringVar(&o.keyFrom, "key-from", "hello", "where the session key is, as a comma-separated fallback `LIST`: hello (the tether hello frame), prefix:OFF:LEN (fixed bytes), lv:OFF:SIZE (a SIZE-byte big-endian length at OFF, then the key, like HAProxy req.payload_lv), header:NAME, cookie:NAME, query:NAME (HTTP/WebSocket upgrades; every byte is still forwarded unchanged)")
	fs.StringVar(&o.noKey, "no-key", "reject", "`ACTION` when the first bytes carry no key: reject (HTTP gets a 400, anything else is closed without a byte) or hash-source (route by client IP, counted)")
	fs.IntVar(&o.maxHello, "max-hello", proto.DefaultMaxHello, "largest hello frame length in `BYTES`; longer frames are closed without a reply")
	fs.IntVar(&o.maxTries, "max-tries", route.DefaultMaxTries, "try up to `N` gateways per connection, in failover order")
	fs.DurationVar(&o.dialTimeout, "dial-timeout", route.DefaultDialTimeout, "give up on a gateway connection attempt after this `DURATION`")
	fs.DurationVar(&o.cooldown, "gateway-cooldown", route.DefaultCooldown, "after a failed connection attempt, skip the gateway for this `DURATION` (its keys use their next choice)")
	fs.DurationVar(&o.clientKeepAlive, "client-keepalive", 60*time.Second, "TCP keepalive on client connections: first probe after this idle `DURATION`, so a phone that vanished without a FIN frees its session. Mobile apps usually have their own heartbeat; 0 turns keepalive off. The event loop sets it once, on the listening socket, which the kernel copies into each connection")
	fs.IntVar(&o.maxConns, "max-conns", 0, "accept at most `N` concurrent client connections; more are closed at once (0: no limit)")
	fs.IntVar(&o.maxHandshakes, "max-handshakes", proxy.DefaultMaxHandshakes, "at most `N` connections accepted but not yet spliced (reading their hello, resolving, dialling); in a reconnect storm more are closed at once with zero bytes, counted as rejected{reason=\"overload\"} (0: no limit)")
	fs.Float64Var(&o.gatewayRate, "gateway-rate", 0, "at most `R` new sessions per second to each gateway (a token bucket with a burst of R); a connection that finds no token waits within its handshake deadline, else it is closed with zero bytes, counted as rejected{reason=\"gateway_rate\"}. Keeps a reconnect storm from flattening a gateway (0: off)")
	fs.DurationVar(&o.drainTimeout, "drain-timeout", 10*time.Second, "on SIGTERM/SIGINT, stop accepting and close open sessions one by one, spread evenly over this `DURATION`, so their clients reconnect spread out")
	fs.StringVar(&o.pidFile, "pid-file", "", "write the process ID to this `FILE` at start; after a SIGUSR2 upgrade the new process rewrites it once it serves (systemd PIDFile=)")
	fs.BoolVar(&o.supervise, "supervise", false, "run as a tiny supervisor (a container's PID 1): start the proxy as a child with the other flags, forward SIGTERM/SIGINT/SIGHUP/SIGUSR2 to the process --pid-file names, reap orphans, and exit with the proxy's status; this makes SIGUSR2 upgrades work as PID 1. Needs --pid-file")
	fs.DurationVar(&o.upgradeTimeout, "upgrade-timeout", 30*time.Second, "on SIGUSR2, the new process must be ready within this `DURATION`, and the old one hands its sessions over within it again; what it still holds then is drained as on SIGTERM")
	fs.Var(&o.tlsCerts, "tls-cert", "serve TLS on --listen with this PEM certificate `FILE` (chain included); repeat with --tls-key for more certificates: the client's SNI picks one whose names match, else the first. SIGHUP reloads them; a broken file keeps the old ones serving")
	fs.Var(&o.tlsKeys, "tls-key", "the PEM private key `FILE` of the --tls-cert in the same position")
	fs.StringVar(&o.tlsTicketKeys, "tls-ticket-keys", "", "`FILE` of TLS session-ticket keys, one base64 32-byte key per line (openssl rand -base64 32), the first encrypting: give every proxy the same file and a client resumes its TLS session on any of them. SIGHUP re-reads it; without it each proxy has its own random key")
	fs.BoolVar(&o.gatewayTLS, "gateway-tls", false, "speak TLS to gateways (the PROXY header and the client's bytes inside it), verifying their certificates for the gateway address's host")
	fs.StringVar(&o.gatewayCA, "gateway-ca", "", "PEM `FILE` of the CA(s) that sign gateway certificates, for --gateway-tls (default: the system roots)")
	fs.StringVar(&o.logLevel, "log-level", "info", "`LEVEL`: debug, info, warn or error (failed handshakes are logged at debug)")
	fs.StringVar(&o.logFormat, "log-format", "json", "`FORMAT`: json or console")
	o.gossip.Register(fs, "hostname-GOSSIPPORT")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usageHead)
		cli.PrintFlags(fs.Output(), fs)
	}
	return fs
}

// parseFlags parses the command line, applies the config file under it, and
// validates the result.
func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := newFlagSet(&o, stderr)
	if err := cli.Parse(fs, args, stderr); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q (flags start with --)", fs.Arg(0))
	}
	if o.config != "" {
		if err := cli.ApplyConfig(fs, o.config, cli.SetOnCommandLine(fs), "config", "check-config", "supervise"); err != nil {
			return o, err
		}
	}
	return o, o.validate()
}

func (o *options) validate() error {
	switch {
	case len(o.gateways) == 0 && o.gossip.Bind == "":
		return errors.New("no gateways: give --gateway ID=HOST:PORT (repeatable), or --gossip-bind HOST:PORT to discover them")
	case o.proxyProtocolOut != "v2" && o.proxyProtocolOut != "off":
		return fmt.Errorf("--proxy-protocol-out %q: want v2 or off", o.proxyProtocolOut)
	case o.maxHello < 3 || o.maxHello > 1<<20:
		return fmt.Errorf("--max-hello %d: want 3..1048576", o.maxHello)
	case o.maxTries < 1:
		return fmt.Errorf("--max-tries %d: want >= 1", o.maxTries)
	case o.handshakeTimeout <= 0 || o.dialTimeout <= 0:
		return errors.New("--handshake-timeout and --dial-timeout must be > 0")
	case o.maxConns < 0:
		return fmt.Errorf("--max-conns %d: want >= 0", o.maxConns)
	case o.eventLoops < 0 || o.eventLoops > 256:
		return fmt.Errorf("--event-loops %d: want 0 (one per CPU) to 256", o.eventLoops)
	case o.maxHandshakes < 0:
		return fmt.Errorf("--max-handshakes %d: want >= 0", o.maxHandshakes)
	case o.gatewayRate < 0:
		return fmt.Errorf("--gateway-rate %v: want >= 0", o.gatewayRate)
	case o.upgradeTimeout <= 0 || o.drainTimeout < 0:
		return errors.New("--upgrade-timeout must be > 0 and --drain-timeout >= 0")
	case o.supervise && o.pidFile == "":
		return errors.New("--supervise needs --pid-file (it follows the proxy through upgrades by it)")
	}
	if err := cli.CheckAddr("listen", o.listen, true, true); err != nil {
		return err
	}
	if o.admin != "" {
		if err := cli.CheckAddr("admin", o.admin, true, true); err != nil {
			return err
		}
	}
	if _, err := cli.ParseLevel(o.logLevel); err != nil {
		return err
	}
	ex, err := proto.ParseKeyFrom(o.keyFrom, o.maxHello)
	if err != nil {
		return err
	}
	o.extractor = ex
	if o.noKey != "reject" && o.noKey != "hash-source" {
		return fmt.Errorf("--no-key %q: want reject or hash-source", o.noKey)
	}
	if o.logFormat != "json" && o.logFormat != "console" {
		return fmt.Errorf("--log-format %q: want json or console", o.logFormat)
	}
	if _, err := cluster.BuildRing(o.gateways, nil, nil); err != nil {
		return fmt.Errorf("--gateway: %w", err)
	}
	switch proxy.ProxyInMode(o.proxyProtocolIn) {
	case proxy.ProxyInOff:
	case proxy.ProxyInOptional, proxy.ProxyInRequire:
		p, err := cli.ParsePrefixes(o.trusted)
		if err != nil {
			return fmt.Errorf("--trusted-proxies: %w", err)
		}
		if len(p) == 0 {
			return fmt.Errorf("--proxy-protocol-in %s needs --trusted-proxies (the load balancers' addresses)", o.proxyProtocolIn)
		}
		o.trustedPrefixes = p
	default:
		return fmt.Errorf("--proxy-protocol-in %q: want off, optional or require", o.proxyProtocolIn)
	}
	if o.redisURL != "" {
		if o.bindingTTL <= 0 || o.redisTimeout <= 0 {
			return errors.New("--binding-ttl and --redis-timeout must be > 0")
		}
		c, err := redisbind.NewClient(o.redisURL, o.redisTimeout)
		if err != nil {
			return err
		}
		c.Close()
	}
	if o.adminToken, err = cli.Secret("admin-token", o.adminToken, o.adminFile); err != nil {
		return err
	}
	if o.lookupToken, err = cli.Secret("lookup-token", o.lookupToken, o.lookupFile); err != nil {
		return err
	}
	if o.lookupToken != "" && o.lookupToken == o.adminToken {
		return errors.New("--lookup-token equals --admin-token: the lookup token is meant to be handed to dispatch services, which must not be able to drain gateways")
	}
	if o.admin != "" {
		if err := admin.CheckBind(o.admin, o.adminToken); err != nil {
			return fmt.Errorf("--admin: %w", err)
		}
	}
	return o.gossip.Validate()
}

// loadTLS checks the TLS flags and loads the certificates.
func (o *options) loadTLS() error {
	switch {
	case len(o.tlsCerts) != len(o.tlsKeys):
		return fmt.Errorf("--tls-cert and --tls-key come in pairs: %d certificates, %d keys", len(o.tlsCerts), len(o.tlsKeys))
	case len(o.tlsCerts) == 0 && o.tlsTicketKeys != "":
		return errors.New("--tls-ticket-keys needs --tls-cert and --tls-key")
	case o.gatewayCA != "" && !o.gatewayTLS:
		return errors.New("--gateway-ca needs --gateway-tls")
	}
	if o.gatewayTLS {
		if _, err := tlsconf.Gateway(o.gatewayCA); err != nil {
			return fmt.Errorf("--gateway-ca: %w", err)
		}
	}
	if len(o.tlsCerts) == 0 {
		return nil
	}
	pairs := make([]tlsconf.Pair, len(o.tlsCerts))
	for i := range pairs {
		pairs[i] = tlsconf.Pair{Cert: o.tlsCerts[i], Key: o.tlsKeys[i]}
	}
	srv, err := tlsconf.NewServer(pairs, o.tlsTicketKeys)
	if err != nil {
		return err
	}
	o.tls = srv
	return nil
}

func run(args []string, sigs <-chan os.Signal, stdout, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if err == nil {
		err = o.loadTLS() // not in validate: a SIGHUP re-parse must not load them again
	}
	if code, ok := cli.FlagOutcome("proxy", err, stderr); !ok {
		return code
	}
	if o.checkConfig {
		src := "flags"
		if o.config != "" {
			src = o.config
		}
		fmt.Fprintf(stdout, "configuration valid (%s): %d static gateways, gossip %s, redis %s, proxy protocol in %s, tls %s\n",
			src, len(o.gateways), onOff(o.gossip.Bind != ""), onOff(o.redisURL != ""), o.proxyProtocolIn, onOff(o.tls != nil))
		return 0
	}
	log, level, err := cli.NewLogger(o.logLevel, o.logFormat)
	if err != nil {
		fmt.Fprintf(stderr, "proxy: %v\n", err)
		return 2
	}
	defer func() { _ = log.Sync() }()
	if o.supervise && os.Getenv(envSupervised) == "" {
		return supervise(args, o.pidFile, sigs, log.Named("supervise"))
	}
	err = serve(args, o, sigs, log, level, stderr)
	switch {
	case errors.Is(err, errForced):
		log.Warn("stopped early", zap.Error(err))
		return 1
	case err != nil:
		log.Error("proxy stopped", zap.Error(err))
		return 1
	}
	return 0
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

// serve runs the proxy until SIGTERM/SIGINT (or until a SIGUSR2 upgrade
// handed everything to a new process). args are kept so SIGHUP can re-read
// the config file exactly as at start.
func serve(args []string, o options, sigs <-chan os.Signal, log *zap.Logger, level zap.AtomicLevel, stderr io.Writer) error {
	p := &process{o: o, log: log, args: args, changed: make(chan struct{}, 1), serveErr: make(chan error, 1)}
	defer p.close()
	parent, err := upgrade.Inherit(o.upgradeTimeout)
	if err != nil {
		return err
	}
	p.parent = parent
	for _, step := range []func() error{p.listen, p.joinGossip, p.keepRing, p.newServer, p.startAdmin} {
		if err := step(); err != nil {
			if parent != nil {
				parent.Refuse(err)
			}
			return err
		}
	}
	if parent != nil {
		if err := p.readyForTakeover(); err != nil {
			return err
		}
	} else {
		p.startServing(p.ln)
	}
	return p.run(sigs, level, stderr)
}

// process is a running proxy's parts, built in steps by serve; close
// undoes the steps that succeeded, last first.
type process struct {
	o       options
	log     *zap.Logger
	args    []string // for SIGHUP and SIGUSR2
	reg     *prometheus.Registry
	metrics *proxy.Metrics
	upm     *upgrade.Metrics
	holder  ring.Holder
	tcpLn   net.Listener                    // the client listener, for its address and an upgrade
	ln      net.Listener                    // tcpLn, reading PROXY headers per --proxy-protocol-in
	node    atomic.Pointer[cluster.Cluster] // nil without gossip (and in a new process until it takes over gossip)
	relay   *cluster.Relay                  // a new process's membership until its gossip node joined
	syncer  *cluster.Syncer
	changed chan struct{} // the ring changed (an upgrade forwards it)
	dialer  *route.Dialer
	rate    *proxy.GatewayRate // nil without --gateway-rate
	srv     *proxy.Server
	adminLn net.Listener // nil without --admin
	adminH  http.Handler
	admin   atomic.Pointer[http.Server]
	undo    []func()

	parent   *upgrade.Parent // set in a process started by an upgrade
	taken    chan error      // a new process: the takeover ended (nil) or was abandoned
	serveMu  sync.Mutex
	serving  chan struct{} // closed when the current Serve returned; nil before the first
	serveErr chan error    // Serve failed for good
	gossipMu sync.Mutex    // guards leaving gossip once
	left     bool
}

func (p *process) close() {
	for i := len(p.undo) - 1; i >= 0; i-- {
		p.undo[i]()
	}
}

// listen opens the client listener (first, so a taken port fails fast) and
// the metrics registry; a process started by an upgrade takes the old
// one's socket instead.
func (p *process) listen() error {
	p.reg = prometheus.NewRegistry()
	p.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	p.metrics = proxy.NewMetrics(p.reg)
	p.upm = upgrade.NewMetrics(p.reg)
	buildInfo(p.reg)
	ka := p.keepAlive()
	var tcpLn net.Listener
	if p.parent != nil {
		ln, err := p.parent.Listener("client", p.o.listen)
		if err != nil {
			return err
		}
		if ln == nil {
			return errors.New("upgrade: the old process passed no client listener")
		}
		// Go turns its default keepalive on for accepted connections of
		// an inherited socket; keepAliveListener sets --client-keepalive.
		tcpLn = keepAliveListener{ln.(*net.TCPListener), ka}
		p.upm.Listeners.WithLabelValues("received").Inc()
	} else {
		lc := net.ListenConfig{KeepAlive: -1, KeepAliveConfig: ka}
		ln, err := lc.Listen(context.Background(), "tcp", p.o.listen)
		if err != nil {
			return fmt.Errorf("listen: %w", err)
		}
		tcpLn = ln
	}
	ln, err := p.wrap(tcpLn)
	if err != nil {
		tcpLn.Close()
		return err
	}
	p.tcpLn, p.ln = tcpLn, ln
	p.undo = append(p.undo, func() { ln.Close() })
	if p.parent == nil {
		p.writePidFile() // a new process writes it once it serves
	}
	p.undo = append(p.undo, p.removePidFile) // unless it names a new process by then
	return nil
}

// keepAlive is --client-keepalive as a keepalive configuration.
func (p *process) keepAlive() net.KeepAliveConfig {
	if p.o.clientKeepAlive <= 0 {
		return net.KeepAliveConfig{}
	}
	return net.KeepAliveConfig{Enable: true, Idle: p.o.clientKeepAlive, Interval: 15 * time.Second, Count: 4}
}

// wrap reads PROXY headers on ln per --proxy-protocol-in.
func (p *process) wrap(ln net.Listener) (net.Listener, error) {
	return proxy.ProxyProtocolListener(ln, proxy.ProxyInMode(p.o.proxyProtocolIn), p.o.trustedPrefixes, p.o.handshakeTimeout, p.metrics, p.log.Named("proxy"))
}

// joinGossip starts the gossip node when --gossip-bind is set. A process
// started by an upgrade does it once the old one released the node name.
func (p *process) joinGossip() error {
	if p.o.gossip.Bind == "" {
		return nil
	}
	p.undo = append(p.undo, p.leaveGossip)
	if p.parent != nil {
		return nil
	}
	node, err := startGossip(p.o, p.tcpLn.Addr().String(), nil, p.log)
	if err != nil {
		return err
	}
	p.setNode(node)
	return nil
}

// setNode records the gossip node (left at exit); false if the process is
// already exiting, in which case node is shut down.
func (p *process) setNode(node *cluster.Cluster) bool {
	p.gossipMu.Lock()
	defer p.gossipMu.Unlock()
	if p.left {
		_ = node.Shutdown()
		return false
	}
	p.node.Store(node)
	p.metrics.GossipEncrypted.Set(map[bool]float64{true: 1}[node.Encrypted()])
	return true
}

// leaveGossip leaves the cluster and frees the gossip port, once.
func (p *process) leaveGossip() {
	p.gossipMu.Lock()
	defer p.gossipMu.Unlock()
	node := p.node.Load()
	if node == nil || p.left {
		return
	}
	p.left = true
	if err := node.Leave(5 * time.Second); err != nil {
		p.log.Warn("gossip leave not confirmed", zap.Error(err))
	}
	_ = node.Shutdown()
}

// keepRing builds the ring from the static list, gossip and operator
// drains, and keeps it current.
func (p *process) keepRing() error {
	var members cluster.Membership
	switch {
	case p.parent != nil && p.o.gossip.Bind != "":
		snap := p.parent.Snapshot()
		p.relay = cluster.NewRelay(snap.Gateways)
		members = p.relay
	case p.node.Load() != nil:
		members = p.node.Load()
	}
	syncer, err := cluster.NewSyncer(members, p.o.gateways, &p.holder, p.log.Named("ring"), func(r *ring.Ring) {
		p.metrics.ObserveRing(r)
		if node := p.node.Load(); node != nil {
			p.metrics.ClusterMembers.Set(float64(node.Members()))
		}
		if p.syncer != nil {
			p.metrics.IDConflicts.Set(float64(len(p.syncer.Conflicts())))
		}
		select {
		case p.changed <- struct{}{}:
		default:
		}
	})
	if err != nil {
		return fmt.Errorf("gateway list: %w", err)
	}
	p.syncer = syncer
	if p.parent != nil {
		for _, id := range p.parent.Snapshot().Drained {
			if err := syncer.SetDrained(id, true, true); err != nil {
				p.log.Warn("upgrade: cannot keep an operator's drain", zap.String("gateway", id), zap.Error(err))
			}
		}
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); syncer.Run(ctx) }()
	p.undo = append(p.undo, func() { stop(); <-done })
	return nil
}

// newServer builds the resolver (ring, or Redis bindings over it), the
// dialer and the proxy server.
func (p *process) newServer() error {
	o := p.o
	p.dialer = &route.Dialer{MaxTries: o.maxTries, DialTimeout: o.dialTimeout, Cooldown: o.cooldown, Logger: p.log.Named("dial")}
	if !o.noPark {
		// The lean dial's connections are spliced by the parker; the
		// --no-park path splices through net.TCPConn and keeps Go's dial.
		p.dialer.DialContext = sock.Dial
	}
	p.metrics.WatchDialer(p.reg, &p.holder, p.dialer)
	resolver, err := p.newResolver()
	if err != nil {
		return err
	}
	var gwTLS *tls.Config
	if o.gatewayTLS {
		if gwTLS, err = tlsconf.Gateway(o.gatewayCA); err != nil {
			return err
		}
	}
	var clientTLS *tls.Config
	if o.tls != nil {
		clientTLS = o.tls.Config()
		p.log.Info("tls on", zap.Strings("certificates", o.tls.Names()), zap.Bool("shared_ticket_keys", o.tlsTicketKeys != ""))
	}
	if o.gatewayRate > 0 {
		if p.rate, err = proxy.NewGatewayRate(o.gatewayRate, p.metrics, p.log.Named("rate")); err != nil {
			return err
		}
	}
	p.srv, err = proxy.New(proxy.Config{
		GatewayRate:      p.rate,
		MaxHandshakes:    o.maxHandshakes,
		TLS:              clientTLS,
		GatewayTLS:       gwTLS,
		Resolver:         resolver,
		Dialer:           p.dialer,
		Extractor:        o.extractor,
		NoKeyHashSource:  o.noKey == "hash-source",
		HandshakeTimeout: o.handshakeTimeout,
		ProxyProtocolOut: o.proxyProtocolOut == "v2",
		MaxConns:         o.maxConns,
		Park:             !o.noPark,
		EventLoop:        !o.noPark,
		EventLoops:       o.eventLoops,
		ClientKeepAlive:  p.keepAlive(),
		ParkAfter:        o.parkAfter,
		Logger:           p.log.Named("proxy"),
		Metrics:          p.metrics,
	})
	if err != nil {
		return err
	}
	p.reg.MustRegister(proxy.GatewaySessions(p.srv.SessionsByGateway, func() []string {
		var ids []string
		for _, m := range p.holder.Load().Members() {
			ids = append(ids, m.ID)
		}
		return ids
	}))
	return nil
}

func (p *process) newResolver() (route.Resolver, error) {
	o := p.o
	if o.redisURL == "" {
		return &route.RingResolver{Ring: &p.holder, Candidates: o.maxTries}, nil
	}
	rc, err := redisbind.NewClient(o.redisURL, o.redisTimeout)
	if err != nil {
		return nil, err
	}
	p.undo = append(p.undo, func() { rc.Close() })
	br, err := redisbind.New(redisbind.Config{
		Client: rc, Ring: &p.holder, Candidates: o.maxTries, TTL: o.bindingTTL, Timeout: o.redisTimeout,
		Logger:  p.log.Named("redis"),
		OnError: func(err error) { p.metrics.RedisError(redisbind.IsWriteRefused(err)) },
	})
	if err != nil {
		return nil, err
	}
	if err := br.Preload(context.Background()); err != nil {
		p.log.Warn("redis not reachable at start: routing by the ring until it answers", zap.Error(err))
	} else {
		p.log.Info("redis bindings on", zap.Duration("binding_ttl", o.bindingTTL), zap.Duration("redis_timeout", o.redisTimeout))
	}
	return br, nil
}

// startAdmin serves the admin API when --admin is set (on the old
// process's socket after an upgrade).
func (p *process) startAdmin() error {
	o := p.o
	p.log.Info("listening", zap.String("addr", p.tcpLn.Addr().String()), zap.Int("static_gateways", len(o.gateways)),
		zap.String("proxy_protocol_in", o.proxyProtocolIn), zap.String("proxy_protocol_out", o.proxyProtocolOut),
		zap.Int("max_conns", o.maxConns), zap.String("version", version.Get().Version), zap.Int("pid", os.Getpid()))
	if o.admin == "" {
		return nil
	}
	var aln net.Listener
	if p.parent != nil {
		ln, err := p.parent.Listener("admin", o.admin)
		if err != nil {
			return err
		}
		if ln != nil {
			p.upm.Listeners.WithLabelValues("received").Inc()
		}
		aln = ln
	}
	if aln == nil {
		ln, err := net.Listen("tcp", o.admin)
		if err != nil {
			return fmt.Errorf("admin listen: %w", err)
		}
		aln = ln
	}
	srv, syncer := p.srv, p.syncer
	p.adminH = admin.Handler(admin.Config{
		Gatherer: p.reg,
		Resolver: srv.Resolver(),
		Ready:    func() bool { return !srv.Closing() && p.holder.Load().Len() > 0 },
		Gateways: admin.GatewayView{Ring: &p.holder, Syncer: syncer, Live: func(id string) bool { return !p.dialer.CoolingDown(id) },
			Sessions: srv.SessionsByGateway, Rate: rateLimits(p.rate)}.Rows,
		Drain: func(id string, drain, force bool) error {
			if err := syncer.SetDrained(id, drain, force); err != nil {
				return err
			}
			p.log.Info("admin drain", zap.String("gateway", id), zap.Bool("drained", drain), zap.Bool("forced", force))
			return nil
		},
		Lookup:      p.lookup(),
		Token:       o.adminToken,
		LookupToken: o.lookupToken,
		Pprof:       o.pprof,
	})
	p.adminLn = aln
	p.log.Info("admin listening", zap.String("addr", aln.Addr().String()), zap.Bool("token", o.adminToken != ""), zap.Bool("lookup_token", o.lookupToken != ""))
	if o.lookupToken != "" && o.adminToken == "" {
		p.log.Warn("--lookup-token without --admin-token: lookups need the token, but /gateways and drain stay open to anyone who reaches the (loopback) admin address")
	}
	if p.parent == nil {
		p.serveAdmin(aln)
	}
	p.undo = append(p.undo, func() {
		if a := p.admin.Load(); a != nil {
			_ = a.Close()
		}
		aln.Close()
	})
	return nil
}

// lookup answers /lookup from the resolver in use, passing over gateways
// whose last connection attempt failed, as connects fail over from them.
func (p *process) lookup() func(ctx context.Context, keys []string) ([]route.Answer, error) {
	l, ok := p.srv.Resolver().(route.Looker)
	if !ok {
		return nil
	}
	return func(ctx context.Context, keys []string) ([]route.Answer, error) {
		return route.Lookup(ctx, l, keys, p.dialer.Unreachable)
	}
}

// rateLimits is r for the admin view, or nil (a nil *GatewayRate inside an
// interface would not be nil).
func rateLimits(r *proxy.GatewayRate) admin.RateLimits {
	if r == nil {
		return nil
	}
	return r
}

// serveAdmin serves the admin API on ln in the background.
func (p *process) serveAdmin(ln net.Listener) {
	a := &http.Server{Handler: p.adminH, ReadHeaderTimeout: 5 * time.Second}
	p.admin.Store(a)
	go func() {
		if err := a.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			p.log.Error("admin server stopped", zap.Error(err))
		}
	}()
}

// startServing runs the proxy on ln until Shutdown or StopAccepting.
func (p *process) startServing(ln net.Listener) {
	done := make(chan struct{})
	p.serveMu.Lock()
	p.serving = done
	p.serveMu.Unlock()
	go func() {
		defer close(done)
		err := p.srv.Serve(ln)
		if errors.Is(err, proxy.ErrAcceptStopped) || errors.Is(err, proxy.ErrServerClosed) {
			return
		}
		p.serveErr <- err
	}()
}

// servingDone is closed when the current Serve returned (nil before the
// first one started).
func (p *process) servingDone() <-chan struct{} {
	p.serveMu.Lock()
	defer p.serveMu.Unlock()
	return p.serving
}

// writePidFile writes --pid-file.
func (p *process) writePidFile() {
	if p.o.pidFile == "" {
		return
	}
	if err := pidfile.Write(p.o.pidFile, os.Getpid()); err != nil {
		p.log.Error("cannot write the pid file", zap.String("pid_file", p.o.pidFile), zap.Error(err))
	}
}

// removePidFile removes --pid-file if it still names this process (after
// an upgrade it names the new one).
func (p *process) removePidFile() {
	if p.o.pidFile != "" {
		pidfile.RemoveIf(p.o.pidFile, os.Getpid())
	}
}

// run serves until a stop signal (SIGHUP reloads, SIGUSR2 upgrades), then
// drains; a second stop signal closes every session at once (errForced).
// After a successful upgrade it drains only what it could not hand over.
func (p *process) run(sigs <-chan os.Signal, level zap.AtomicLevel, stderr io.Writer) error {
	var (
		upgraded chan upgradeResult // non-nil while this process upgrades
		cancelUp context.CancelFunc
	)
	for stopping := false; !stopping; {
		select {
		case err := <-p.serveErr:
			return fmt.Errorf("serve: %w", err)
		case err := <-p.taken:
			p.taken = nil
			if err != nil {
				return err
			}
		case r := <-upgraded:
			upgraded, cancelUp = nil, nil
			if r.err != nil {
				p.log.Error("upgrade failed; this process keeps serving", zap.Error(r.err), zap.Int("new_pid", r.res.PID))
				continue
			}
			p.log.Info("upgrade: the new process took over; this one exits", zap.Int("new_pid", r.res.PID),
				zap.Int("sessions_handed", r.res.Sessions), zap.Int("listeners_handed", r.res.Listeners),
				zap.Int("left", r.res.Left), zap.Duration("took", r.res.Took))
			stopping = true
		case sig := <-sigs:
			switch {
			case sig == syscall.SIGHUP:
				p.reloadTLS()
				reload(p.args, p.o, p.syncer, p.node.Load(), level, p.log, stderr)
			case sig == syscall.SIGUSR2:
				if ch, cancel := p.upgrade(upgraded != nil); ch != nil {
					upgraded, cancelUp = ch, cancel
				}
			default:
				if upgraded != nil {
					p.log.Warn("stop signal during an upgrade: abandoning it; this process drains and exits", zap.String("signal", sig.String()))
					cancelUp()
					if r := <-upgraded; r.err != nil {
						p.log.Error("upgrade failed", zap.Error(r.err), zap.Int("new_pid", r.res.PID))
					}
				}
				p.log.Info("shutting down: closing open sessions spread over the drain timeout (a second signal closes them at once)", zap.String("signal", sig.String()),
					zap.Int("sessions", p.srv.Active()), zap.Duration("drain_timeout", p.o.drainTimeout))
				stopping = true
			}
		}
	}
	dctx, cancel := context.WithTimeout(context.Background(), p.o.drainTimeout)
	defer cancel()
	drained := make(chan error, 1)
	go func() { drained <- p.srv.Shutdown(dctx) }()
	var forced error
	for waiting := true; waiting; {
		select {
		case err := <-drained:
			if err != nil && forced == nil {
				p.log.Info("drain timeout reached; remaining sessions closed")
			}
			waiting = false
		case sig := <-sigs:
			if sig == syscall.SIGHUP || sig == syscall.SIGUSR2 || forced != nil {
				continue
			}
			p.log.Warn("second stop signal: closing every session now", zap.String("signal", sig.String()), zap.Int("sessions", p.srv.Active()))
			forced = errForced
			cancel()
		}
	}
	if done := p.servingDone(); done != nil {
		<-done
	}
	p.log.Info("stopped")
	return forced
}

// reloadTLS re-reads the certificates and ticket keys; a failure keeps
// the ones in service, logged and counted.
func (p *process) reloadTLS() {
	if p.o.tls == nil {
		return
	}
	if err := p.o.tls.Reload(); err != nil {
		p.metrics.TLSReloadErrors.Inc()
		p.log.Error("SIGHUP: TLS files rejected; the certificates in service stay", zap.Error(err))
		return
	}
	p.log.Info("SIGHUP: reloaded TLS certificates", zap.Strings("certificates", p.o.tls.Names()), zap.Bool("ticket_keys", p.o.tlsTicketKeys != ""))
}

// reload re-reads the gossip keyring (key rotation) and the config file
// (flags on the command line still win), and applies what can change
// without a restart: the keyring, the static gateway list and the log
// level. Anything invalid leaves the running configuration as is.
func reload(args []string, old options, syncer *cluster.Syncer, node *cluster.Cluster, level zap.AtomicLevel, log *zap.Logger, stderr io.Writer) {
	if node != nil && old.gossip.KeyFile != "" {
		cli.ReloadKeys(log, old.gossip, node.SetKeys)
	}
	if old.config == "" {
		if (node == nil || old.gossip.KeyFile == "") && old.tls == nil {
			log.Warn("SIGHUP ignored: no --config file, --gossip-key or TLS files to reload")
		}
		return
	}
	o, err := parseFlags(args, stderr)
	if err != nil {
		log.Error("SIGHUP: config invalid; keeping the running configuration", zap.String("config", old.config), zap.Error(err))
		return
	}
	if err := syncer.SetStatic(o.gateways); err != nil {
		log.Error("SIGHUP: gateway list rejected; keeping the running one", zap.Error(err))
		return
	}
	lvl, _ := cli.ParseLevel(o.logLevel)
	level.SetLevel(lvl)
	ids := make([]string, 0, len(o.gateways))
	for _, g := range o.gateways {
		ids = append(ids, g.ID)
	}
	log.Info("SIGHUP: reloaded gateway list and log level", zap.String("config", old.config),
		zap.Strings("static_gateways", ids), zap.String("log_level", o.logLevel))
}

// startGossip joins the cluster as a proxy node.
func startGossip(o options, listenAddr string, extraSeeds []string, log *zap.Logger) (*cluster.Cluster, error) {
	keys, err := o.gossip.Keys()
	if err != nil {
		return nil, err
	}
	node, err := cluster.New(cluster.Config{
		NodeName: o.gossip.NodeName,
		BindAddr: o.gossip.Bind,
		Join:     mergeSeeds(cli.SplitList(o.gossip.Join), extraSeeds),
		Keys:     keys,
		Profile:  cluster.Profile(o.gossip.Profile),
		Meta:     cluster.Meta{Role: cluster.RoleProxy, Addr: listenAddr},
		Logger:   log.Named("gossip"),
	})
	if err != nil {
		return nil, err
	}
	cli.WarnInsecureGossip(log, o.gossip)
	log.Info("gossip listening", zap.String("addr", node.Addr()), zap.String("node", node.Name()),
		zap.Strings("join", cli.SplitList(o.gossip.Join)), zap.Bool("encrypted", node.Encrypted()))
	return node, nil
}
