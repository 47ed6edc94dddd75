// Package admin serves the proxy's operator HTTP endpoints: Prometheus
// metrics, liveness, readiness, route lookups, the gateway list and
// per-proxy drain/undrain (docs/operating.md).
//
// It is meant for a loopback or private address: /route answers with gateway
// addresses, which clients must never see.
package admin

import (
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tether-proxy/tether/pkg/cluster"
	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route"
)

// GatewayStatus is one row of /gateways.
type GatewayStatus struct {
	ID   string `json:"id"`
	Addr string `json:"addr"`
	// Weight is the weight the ring uses now (0 while draining).
	Weight float64 `json:"weight"`
	// State is active or draining (by gossip or by an operator).
	State string `json:"state"`
	// Live is false while the proxy skips the gateway after a failed
	// connection attempt.
	Live bool `json:"live"`
	// Source is static, gossip or static+gossip.
	Source string `json:"source"`
	// AdminDrained is true when drained through this API.
	AdminDrained bool `json:"admin_drained"`
	// ActiveSessions counts sessions this proxy has open to the gateway.
	ActiveSessions int `json:"active_sessions"`
	// Conflict lists every live gossip member claiming this ID when there
	// is more than one, the one routing uses first; empty otherwise.
	Conflict []Claimant `json:"conflict,omitempty"`
	// RateLimit is --gateway-rate, new sessions per second (0: off).
	RateLimit float64 `json:"rate_limit"`
	// RateLimited is true while the gateway refuses new sessions for its
	// rate (one refused in the last second); RateRefused counts them.
	RateLimited bool   `json:"rate_limited"`
	RateRefused uint64 `json:"rate_refused"`
}

// Claimant is one gossip member claiming a gateway ID.
type Claimant struct {
	Node  string `json:"node"`
	Addr  string `json:"addr"`
	State string `json:"state"`
	// Routing is true for the claimant this proxy sends the ID's keys to.
	Routing bool `json:"routing"`
}

// Errors Config.Drain returns (possibly wrapped) that the API answers with
// their own status.
var (
	// ErrUnknownGateway: an ID no source knows (404).
	ErrUnknownGateway = cluster.ErrUnknownGateway
	// ErrLastActive: draining the only gateway taking new keys without
	// ?force=1 (409).
	ErrLastActive = cluster.ErrLastActive
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
	// Gateways lists the known gateways for GET /gateways; nil disables it.
	Gateways func() []GatewayStatus
	// Drain drains (true) or undrains a gateway for POST
	// /gateways/{id}/drain and /undrain; force is ?force=1, which drains
	// even the last active gateway. nil disables them.
	Drain func(id string, drain, force bool) error
	// Token, when set, is required as "Authorization: Bearer <token>" on
	// every endpoint except /healthz, /readyz and /metrics.
	Token string
	// Pprof mounts net/http/pprof under /debug/pprof/ (behind Token).
	Pprof bool
}

// RouteAnswer is the JSON body of /route.
type RouteAnswer struct {
	Key string `json:"key"`
	// KeyHash is the key's hash as the proxy's logs show it (they never
	// show the key).
	KeyHash string `json:"key_hash"`
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
	if cfg.Gateways != nil {
		mux.Handle("GET /gateways", cfg.auth(func(w http.ResponseWriter, _ *http.Request) {
			writeJSON(w, http.StatusOK, cfg.Gateways())
		}))
	}
	if cfg.Drain != nil {
		for path, drain := range map[string]bool{"drain": true, "undrain": false} {
			mux.Handle("POST /gateways/{id}/"+path, cfg.auth(func(w http.ResponseWriter, r *http.Request) {
				id := r.PathValue("id")
				err := cfg.Drain(id, drain, r.URL.Query().Get("force") == "1")
				switch {
				case errors.Is(err, ErrUnknownGateway):
					http.Error(w, "unknown gateway "+id, http.StatusNotFound)
				case errors.Is(err, ErrLastActive):
					http.Error(w, id+" is the last gateway taking new keys: new clients would have nowhere to go; add ?force=1 to drain it anyway", http.StatusConflict)
				case err != nil:
					http.Error(w, err.Error(), http.StatusInternalServerError)
				default:
					writeJSON(w, http.StatusOK, map[string]any{"id": id, "admin_drained": drain})
				}
			}))
		}
	}
	if cfg.Pprof {
		mux.Handle("/debug/pprof/", cfg.auth(pprof.Index))
		mux.Handle("/debug/pprof/cmdline", cfg.auth(pprof.Cmdline))
		mux.Handle("/debug/pprof/profile", cfg.auth(pprof.Profile))
		mux.Handle("/debug/pprof/symbol", cfg.auth(pprof.Symbol))
		mux.Handle("/debug/pprof/trace", cfg.auth(pprof.Trace))
	}
	if cfg.Resolver != nil {
		mux.Handle("GET /route", cfg.auth(func(w http.ResponseWriter, r *http.Request) {
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
			ans := RouteAnswer{Key: key, KeyHash: strconv.FormatUint(ring.KeyHash([]byte(key)), 16), Gateway: rt.Candidates[0].ID, Addr: rt.Candidates[0].Addr, Source: string(rt.Source)}
			for _, c := range rt.Candidates {
				ans.Candidates = append(ans.Candidates, c.ID)
			}
			writeJSON(w, http.StatusOK, ans)
		}))
	}
	return mux
}

// auth wraps h with the bearer-token check when a token is configured.
func (cfg Config) auth(h http.HandlerFunc) http.Handler {
	if cfg.Token == "" {
		return h
	}
	want := []byte("Bearer " + cfg.Token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if subtle.ConstantTimeCompare([]byte(r.Header.Get("Authorization")), want) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="tether"`)
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		h(w, r)
	})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// CheckBind refuses an admin address that is not loopback when no token
// protects it: /route and /gateways reveal gateway addresses and the POST
// endpoints change routing.
func CheckBind(addr, token string) error {
	if token != "" {
		return nil
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("admin address %q: %w", addr, err)
	}
	if host == "localhost" {
		return nil
	}
	ip, err := netip.ParseAddr(host)
	if err != nil || !ip.IsLoopback() {
		return fmt.Errorf("admin address %q is not loopback: set --admin-token to expose the admin API beyond this host", addr)
	}
	return nil
}
