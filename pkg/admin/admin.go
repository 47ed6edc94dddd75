// Package admin serves the proxy's operator HTTP endpoints: Prometheus
// metrics, liveness, readiness and route lookups (DESIGN §4).
//
// It is meant for a loopback or private address: /route answers with gateway
// addresses, which clients must never see.
package admin

import (
	"encoding/json"
	"errors"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tether-proxy/tether/pkg/route"
)

// Config wires the endpoints to the running proxy.
type Config struct {
	// Gatherer provides /metrics; nil disables the endpoint.
	Gatherer prometheus.Gatherer
	// Ready reports readiness for /readyz (listening, at least one live
	// gateway, not shutting down); nil means always ready.
	Ready func() bool
	// Resolver answers /route?key=; nil disables the endpoint.
	Resolver route.Resolver
}

// RouteAnswer is the JSON body of /route.
type RouteAnswer struct {
	Key     string `json:"key"`
	Gateway string `json:"gateway"`
	Addr    string `json:"addr"`
	Source  string `json:"source"`
	// Candidates is the whole failover order, owner first.
	Candidates []string `json:"candidates"`
}

// Handler returns the admin mux.
func Handler(cfg Config) http.Handler {
	mux := http.NewServeMux()
	if cfg.Gatherer != nil {
		mux.Handle("GET /metrics", promhttp.HandlerFor(cfg.Gatherer, promhttp.HandlerOpts{}))
	}
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if cfg.Ready != nil && !cfg.Ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	if cfg.Resolver != nil {
		mux.HandleFunc("GET /route", func(w http.ResponseWriter, r *http.Request) {
			key := r.URL.Query().Get("key")
			if key == "" || len(key) > 255 {
				http.Error(w, "want ?key= with 1..255 bytes", http.StatusBadRequest)
				return
			}
			rt, err := cfg.Resolver.Resolve(r.Context(), []byte(key))
			if errors.Is(err, route.ErrNoGateway) {
				http.Error(w, "no live gateway", http.StatusServiceUnavailable)
				return
			}
			if err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			ans := RouteAnswer{Key: key, Gateway: rt.Candidates[0].ID, Addr: rt.Candidates[0].Addr, Source: string(rt.Source)}
			for _, c := range rt.Candidates {
				ans.Candidates = append(ans.Candidates, c.ID)
			}
			w.Header().Set("Content-Type", "application/json")
			_ = json.NewEncoder(w).Encode(ans)
		})
	}
	return mux
}
