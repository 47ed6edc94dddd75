package upgrade

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the upgrade's Prometheus instruments (the sessions handed
// over are counted by the proxy: tether_handoff_sessions_total).
type Metrics struct {
	// Failures counts upgrades that failed, by reason: start, exited,
	// not_ready, refused, lost, cancelled, unsupported, other.
	Failures *prometheus.CounterVec
	// Listeners counts listening sockets handed over, by side.
	Listeners *prometheus.CounterVec
	// Duration is how long the upgrade that started this process took.
	Duration prometheus.Gauge
}

// NewMetrics creates the instruments and registers them with reg (nil:
// not registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_upgrade_failures_total",
			Help: "SIGUSR2 upgrades that failed, by reason (start, exited, not_ready, refused, lost, cancelled, unsupported); this process kept serving.",
		}, []string{"reason"}),
		Listeners: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_handoff_listeners_total",
			Help: "Listening sockets handed between processes by SIGUSR2 upgrades, by side: sent or received.",
		}, []string{"side"}),
		Duration: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_upgrade_duration_seconds",
			Help: "How long the upgrade that started this process took, from SIGUSR2 to the old process letting go (0 if it was not started by one).",
		}),
	}
	for _, r := range []string{"start", "exited", "not_ready", "refused", "lost", "cancelled", "unsupported"} {
		m.Failures.WithLabelValues(r)
	}
	for _, s := range []string{"sent", "received"} {
		m.Listeners.WithLabelValues(s)
	}
	if reg != nil {
		reg.MustRegister(m.Failures, m.Listeners, m.Duration)
	}
	return m
}
