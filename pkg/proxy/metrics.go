package proxy

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route"
)

// Metrics are the proxy's Prometheus instruments. The names are part of the
// operator contract (docs/operating.md); create them once per process with
// NewMetrics.
type Metrics struct {
	Accepted          prometheus.Counter
	AcceptErrors      prometheus.Counter
	Active            prometheus.Gauge
	Closed            prometheus.Counter
	Rejected          *prometheus.CounterVec
	HandshakeFailures *prometheus.CounterVec
	HandshakeSeconds  prometheus.Histogram
	Routes            *prometheus.CounterVec
	RouteFailures     *prometheus.CounterVec
	DialFailures      *prometheus.CounterVec
	Failovers         *prometheus.CounterVec
	SessionSeconds    prometheus.Histogram
	SessionEnds       *prometheus.CounterVec
	Gateways          *prometheus.GaugeVec
	ClusterMembers    prometheus.Gauge
	GossipEncrypted   prometheus.Gauge
	IDConflicts       prometheus.Gauge
	RedisErrors       prometheus.Counter
	RedisRefusals     prometheus.Counter
	NoKey             *prometheus.CounterVec
	Parked            prometheus.Gauge
	ParkErrors        prometheus.Counter
	Wakeups           *prometheus.CounterVec
	Handoffs          *prometheus.CounterVec
	TLSHandshakes     *prometheus.CounterVec
	InHandshake       prometheus.Gauge
	RateLimited       *prometheus.CounterVec
	TLSReloadErrors   prometheus.Counter

	// traffic collects tether_bytes_total and tether_gateway_bytes_total
	// from the Server using these metrics.
	traffic *traffic
}

// ObserveRing sets the gateway gauges from the ring now in use: members
// with weight > 0 are active, weight 0 draining.
//
// It also creates the per-gateway series of the ring's members at zero,
// so a gateway's failures and failovers exist before they first happen.
func (m *Metrics) ObserveRing(r *ring.Ring) {
	ids := make([]string, 0, len(r.Members()))
	for _, g := range r.Members() {
		ids = append(ids, g.ID)
		m.DialFailures.WithLabelValues(g.ID)
		m.Failovers.WithLabelValues(g.ID)
		m.RateLimited.WithLabelValues(g.ID)
	}
	m.traffic.setMembers(ids)
	all := len(r.Members())
	m.Gateways.WithLabelValues("active").Set(float64(r.Len()))
	m.Gateways.WithLabelValues("draining").Set(float64(all - r.Len()))
}

// WatchDialer registers tether_gateways_unreachable: the gateways of the
// ring in h that d is skipping after a failed connection attempt.
func (m *Metrics) WatchDialer(reg prometheus.Registerer, h *ring.Holder, d *route.Dialer) {
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "tether_gateways_unreachable",
		Help: "Gateways in the ring this proxy is skipping after a failed connection attempt (--gateway-cooldown).",
	}, func() float64 {
		n := 0
		for _, g := range h.Load().Members() {
			if d.CoolingDown(g.ID) {
				n++
			}
		}
		return float64(n)
	}))
}

// RedisError counts a failed Redis call (the binding resolver's OnError).
func (m *Metrics) RedisError(refused bool) {
	m.RedisErrors.Inc()
	if refused {
		m.RedisRefusals.Inc()
	}
}

// labelValues are every value of the fixed labels, created at zero by
// NewMetrics: a dashboard or an alert on a reason works before its first
// occurrence (rate() of a series that appears later misses its first
// increase).
var labelValues = []struct {
	vec    func(*Metrics) *prometheus.CounterVec
	values []string
}{
	{func(m *Metrics) *prometheus.CounterVec { return m.Rejected },
		[]string{"max_conns", "overload", "gateway_rate", "shutdown", "untrusted_peer"}},
	{func(m *Metrics) *prometheus.CounterVec { return m.HandshakeFailures },
		[]string{"too_large", "bad_version", "bad_keylen", "bad_length", "malformed", "truncated", "no_key", reasonEOF, reasonTimeout, reasonReadError,
			reasonHeaderUntrusted, reasonHeaderMissing, reasonHeaderInvalid, reasonTLS, reasonTLSHandshake}},
	{func(m *Metrics) *prometheus.CounterVec { return m.Routes }, []string{"binding", "ring", "fallback"}},
	{func(m *Metrics) *prometheus.CounterVec { return m.RouteFailures }, []string{"no_gateway", "unreachable", "local_resources"}},
	{func(m *Metrics) *prometheus.CounterVec { return m.SessionEnds },
		[]string{string(endClosed), string(endClientError), string(endGatewayError), string(endDrainTimeout), string(endParkError)}},
	{func(m *Metrics) *prometheus.CounterVec { return m.NoKey }, []string{"reject", "hash_source"}},
	{func(m *Metrics) *prometheus.CounterVec { return m.Wakeups }, []string{"inline", "worker"}},
	{func(m *Metrics) *prometheus.CounterVec { return m.Handoffs }, []string{"sent", "received"}},
	{func(m *Metrics) *prometheus.CounterVec { return m.TLSHandshakes }, []string{"true", "false"}},
}

// zero creates every fixed label value of the counters at zero.
func (m *Metrics) zero() {
	for _, lv := range labelValues {
		for _, v := range lv.values {
			lv.vec(m).WithLabelValues(v)
		}
	}
	for _, st := range []string{"active", "draining"} {
		m.Gateways.WithLabelValues(st)
	}
}

// GatewaySessions is a collector of tether_gateway_sessions_active: the
// sessions open now to each gateway (sessions, typically
// Server.SessionsByGateway), with every gateway members names at 0.
func GatewaySessions(sessions func() map[string]int, members func() []string) prometheus.Collector {
	return gatewaySessions{sessions: sessions, members: members}
}

var gatewaySessionsDesc = prometheus.NewDesc("tether_gateway_sessions_active",
	"Spliced sessions open now through this proxy, by gateway (every gateway in the ring, at 0 when it has none).", []string{"gateway"}, nil)

type gatewaySessions struct {
	sessions func() map[string]int
	members  func() []string
}

func (g gatewaySessions) Describe(ch chan<- *prometheus.Desc) { ch <- gatewaySessionsDesc }

func (g gatewaySessions) Collect(ch chan<- prometheus.Metric) {
	n := g.sessions()
	seen := make(map[string]bool, len(n))
	if g.members != nil {
		for _, id := range g.members() {
			seen[id] = true
			ch <- prometheus.MustNewConstMetric(gatewaySessionsDesc, prometheus.GaugeValue, float64(n[id]), id)
		}
	}
	for id, v := range n {
		if !seen[id] {
			ch <- prometheus.MustNewConstMetric(gatewaySessionsDesc, prometheus.GaugeValue, float64(v), id)
		}
	}
}

// Handshake failure reasons beyond those of proto.Reason.
const (
	reasonTimeout   = "timeout"
	reasonEOF       = "eof"
	reasonReadError = "read_error"
)

// NewMetrics creates the proxy's instruments and registers them with reg
// (nil means do not register, as in tests that build several servers).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		traffic: &traffic{},
		Accepted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_connections_accepted_total",
			Help: "Client connections accepted (including ones rejected at once by --max-conns).",
		}),
		AcceptErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_accept_errors_total",
			Help: "Failed accepts (usually the process is out of file descriptors); the proxy backs off and keeps serving open sessions.",
		}),
		Active: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_connections_active",
			Help: "Client connections open now, in handshake or spliced.",
		}),
		Closed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_connections_closed_total",
			Help: "Client connections closed, for any reason. accepted = closed + active.",
		}),
		Rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_connections_rejected_total",
			Help: "Connections closed before the handshake: max_conns, shutdown, untrusted_peer (PROXY header required from trusted peers only).",
		}, []string{"reason"}),
		HandshakeFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_handshake_failures_total",
			Help: "Clients closed with zero bytes written because their first bytes carried no usable key.",
		}, []string{"reason"}),
		HandshakeSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "tether_handshake_duration_seconds",
			Help:    "Time from accept until the gateway connection is ready (hello read, resolved, dialled).",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}),
		Routes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_routes_total",
			Help: "Keys resolved, by where the owner came from: binding (Redis), ring (new or rebound key, or no Redis), fallback (Redis failed: ring).",
		}, []string{"source"}),
		RouteFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_route_failures_total",
			Help: "Clients with a valid key that could not be served: no_gateway, unreachable (every candidate failed), local_resources (this proxy was out of descriptors or ports; no gateway blamed).",
		}, []string{"reason"}),
		DialFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_dial_failures_total",
			Help: "Failed connection attempts to a gateway, by gateway ID.",
		}, []string{"gateway"}),
		Failovers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_failovers_total",
			Help: "Sessions served by a candidate other than the first one tried, by the gateway that took over.",
		}, []string{"gateway"}),
		SessionSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "tether_session_duration_seconds",
			Help:    "Lifetime of spliced sessions.",
			Buckets: prometheus.ExponentialBuckets(0.01, 4, 12),
		}),
		SessionEnds: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_session_ends_total",
			Help: "Spliced sessions ended, by reason: closed (both sides finished), client_error or gateway_error (that side reset or timed out), drain_timeout, shutdown, and the rarer internal ones listed in docs/operating.md.",
		}, []string{"reason"}),
		Gateways: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tether_gateways",
			Help: "Gateways in the ring now, by state (active takes new keys, draining does not).",
		}, []string{"state"}),
		RedisErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_redis_errors_total",
			Help: "Failed Redis binding calls; each connection they hit was routed by the ring (routes_total{source=\"fallback\"}).",
		}),
		RedisRefusals: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_redis_write_refusals_total",
			Help: "Redis calls refused with an error reply (OOM under noeviction, READONLY replica, NOAUTH/NOPERM): existing bindings are still read and honoured, new keys go to the ring unbound. Also counted in tether_redis_errors_total.",
		}),
		GossipEncrypted: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_gossip_encrypted",
			Help: "1 when gossip is encrypted and authenticated with --gossip-key, 0 when it is not (or gossip is off).",
		}),
		IDConflicts: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_gateway_id_conflicts",
			Help: "Gateway IDs claimed by more than one live gossip member now (see /gateways and the error log); should be 0.",
		}),
		NoKey: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_no_key_total",
			Help: "Clients whose first bytes carried no key, by what --no-key did: reject (HTTP 400) or hash_source (routed by IP).",
		}, []string{"action"}),
		Parked: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_parked_directions",
			Help: "Session directions idle in tether's epoll set now, holding no goroutine and no pipe (two per fully idle session).",
		}),
		Wakeups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_park_wakeups_total",
			Help: "Parked session directions woken by data, EOF or an error, by who served them: inline (the epoll loop moved a small message and re-parked) or worker (a goroutine took over).",
		}, []string{"path"}),
		ParkErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_park_errors_total",
			Help: "Idle sessions closed because epoll would not watch them (see fs.epoll.max_user_watches).",
		}),
		Handoffs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_handoff_sessions_total",
			Help: "Established sessions handed between processes by a SIGUSR2 upgrade, by side: sent (by the old process) or received (by the new one).",
		}, []string{"side"}),
		InHandshake: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_connections_in_handshake",
			Help: "Client connections accepted but not yet spliced (bounded by --max-handshakes; beyond it new ones are closed, counted in tether_connections_rejected_total{reason=\"overload\"}).",
		}),
		RateLimited: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_gateway_rate_limited_total",
			Help: "New sessions refused because their gateway's --gateway-rate had no token within the handshake deadline, by gateway (the sum is tether_connections_rejected_total{reason=\"gateway_rate\"}).",
		}, []string{"gateway"}),
		TLSHandshakes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_tls_handshakes_total",
			Help: "Completed TLS handshakes with clients, by whether the client resumed a session (resumed=\"true\": a ticket, often issued by another proxy, saved the full handshake).",
		}, []string{"resumed"}),
		TLSReloadErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_tls_reload_errors_total",
			Help: "SIGHUP reloads of --tls-cert/--tls-key or --tls-ticket-keys that failed; the previous certificates and keys stay in service.",
		}),
		ClusterMembers: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_cluster_members",
			Help: "Alive gossip members this proxy knows, itself and other proxies included (0 without gossip).",
		}),
	}
	m.zero()
	if reg != nil {
		reg.MustRegister(m.Accepted, m.AcceptErrors, m.Active, m.Closed, m.Rejected, m.HandshakeFailures,
			m.HandshakeSeconds, m.Routes, m.RouteFailures, m.DialFailures, m.Failovers,
			m.traffic, m.SessionSeconds, m.SessionEnds, m.Gateways, m.ClusterMembers, m.GossipEncrypted, m.IDConflicts, m.RedisErrors, m.RedisRefusals, m.NoKey,
			m.Parked, m.ParkErrors, m.Wakeups, m.Handoffs, m.TLSHandshakes, m.TLSReloadErrors, m.InHandshake, m.RateLimited)
	}
	return m
}
