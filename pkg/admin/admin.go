// Package admin serves the proxy's operator HTTP endpoints: Prometheus
// metrics, liveness, readiness, read-only key lookups for dispatch services,
// route lookups, the gateway list and per-proxy drain/undrain
// (docs/operating.md).
//
// It is meant for a loopback or private address: /lookup, /route and
// /gateways answer with gateway addresses, which clients must never see.
package admin

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tether-proxy/tether/pkg/cluster"
	"github.com/tether-proxy/tether/pkg/proto"
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
	// Lookup answers GET /lookup?key= and POST /lookup, read-only (see
	// route.Lookup); nil disables them.
	Lookup func(ctx context.Context, keys []string) ([]route.Answer, error)
	// Gateways lists the known gateways for GET /gateways; nil disables it.
	Gateways func() []GatewayStatus
	// Drain drains (true) or undrains a gateway for POST
	// /gateways/{id}/drain and /undrain; force is ?force=1, which drains
	// even the last active gateway. nil disables them.
	Drain func(id string, drain, force bool) error
	// Token, when set, is required as "Authorization: Bearer <token>" on
	// every endpoint except /healthz, /readyz and /metrics.
	Token string
	// LookupToken, when set, is a read-only bearer token: it is accepted
	// (as is Token) on /lookup and /route, which then require one of the
	// two, and refused with 403 everywhere else.
	LookupToken string
	// Pprof mounts net/http/pprof under /debug/pprof/ (behind Token).
	Pprof bool
}

// LookupRequest is the JSON body of POST /lookup.
type LookupRequest struct {
	// Keys are the session keys to look up, at most route.MaxLookupKeys.
	Keys []string `json:"keys"`
}

// LookupResults is the JSON answer of POST /lookup: one result per key,
// in the order asked.
type LookupResults struct {
	Results []route.Answer `json:"results"`
}

// maxLookupBody bounds a POST /lookup body: 1000 keys of 255 bytes, each
// byte escaped (\u00XX), fit with room to spare.
const maxLookupBody = 2 << 20

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
		mux.Handle("GET /route", cfg.readAuth(func(w http.ResponseWriter, r *http.Request) {
			key, ok := queryKey(w, r)
			if !ok {
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
			ans := RouteAnswer{Key: key, KeyHash: ring.KeyHashHex([]byte(key)), Gateway: rt.Candidates[0].ID, Addr: rt.Candidates[0].Addr, Source: string(rt.Source)}
			for _, c := range rt.Candidates {
				ans.Candidates = append(ans.Candidates, c.ID)
			}
			writeJSON(w, http.StatusOK, ans)
		}))
	}
	if cfg.Lookup != nil {
		mux.Handle("GET /lookup", cfg.readAuth(func(w http.ResponseWriter, r *http.Request) {
			key, ok := queryKey(w, r)
			if !ok {
				return
			}
			if ans, ok := cfg.lookup(w, r, []string{key}); ok {
				writeJSON(w, http.StatusOK, ans[0])
			}
		}))
		mux.Handle("POST /lookup", cfg.readAuth(func(w http.ResponseWriter, r *http.Request) {
			var req LookupRequest
			dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxLookupBody))
			if err := dec.Decode(&req); err != nil {
				http.Error(w, `want a JSON body {"keys":["...", ...]}: `+err.Error(), http.StatusBadRequest)
				return
			}
			if len(req.Keys) > route.MaxLookupKeys {
				http.Error(w, fmt.Sprintf("%d keys: at most %d per request", len(req.Keys), route.MaxLookupKeys), http.StatusRequestEntityTooLarge)
				return
			}
			for i, k := range req.Keys {
				if err := checkKey(k); err != nil {
					http.Error(w, fmt.Sprintf("keys[%d]: %v", i, err), http.StatusBadRequest)
					return
				}
			}
			if ans, ok := cfg.lookup(w, r, req.Keys); ok {
				writeJSON(w, http.StatusOK, LookupResults{Results: ans})
			}
		}))
	}
	return mux
}

// lookup runs cfg.Lookup and answers its errors itself (ok false).
func (cfg Config) lookup(w http.ResponseWriter, r *http.Request, keys []string) ([]route.Answer, bool) {
	ans, err := cfg.Lookup(r.Context(), keys)
	switch {
	case errors.Is(err, route.ErrNoGateway):
		http.Error(w, "no live gateway", http.StatusServiceUnavailable)
	case err != nil:
		http.Error(w, err.Error(), http.StatusInternalServerError)
	default:
		return ans, true
	}
	return nil, false
}

// checkKey accepts the keys a hello can carry: 1..proto.MaxKeyLen bytes.
func checkKey(k string) error {
	if k == "" || len(k) > proto.MaxKeyLen {
		return fmt.Errorf("a key has 1..%d bytes, not %d", proto.MaxKeyLen, len(k))
	}
	return nil
}

// queryKey is the ?key= of r, or answers 400 (ok false).
func queryKey(w http.ResponseWriter, r *http.Request) (key string, ok bool) {
	key = r.URL.Query().Get("key")
	if checkKey(key) != nil {
		http.Error(w, fmt.Sprintf("want ?key= with 1..%d bytes", proto.MaxKeyLen), http.StatusBadRequest)
		return "", false
	}
	return key, true
}

// auth wraps an admin endpoint with the admin token check when a token is
// configured; the lookup token is refused with 403 (it is read-only).
func (cfg Config) auth(h http.HandlerFunc) http.Handler {
	if cfg.Token == "" && cfg.LookupToken == "" {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got := r.Header.Get("Authorization")
		switch {
		case bearer(got, cfg.Token):
			h(w, r)
		case bearer(got, cfg.LookupToken):
			http.Error(w, "forbidden: the lookup token is read-only (/lookup and /route); this endpoint needs the admin token", http.StatusForbidden)
		case cfg.Token == "":
			h(w, r)
		default:
			unauthorized(w)
		}
	})
}

// readAuth wraps a read-only endpoint: either token is accepted, and one is
// required when either is configured.
func (cfg Config) readAuth(h http.HandlerFunc) http.Handler {
	if cfg.Token == "" && cfg.LookupToken == "" {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got := r.Header.Get("Authorization")
		if bearer(got, cfg.Token) || bearer(got, cfg.LookupToken) {
			h(w, r)
			return
		}
		unauthorized(w)
	})
}

// bearer reports whether header carries token ("Bearer <token>"), in
// constant time; an empty token matches nothing.
func bearer(header, token string) bool {
	return token != "" && subtle.ConstantTimeCompare([]byte(header), []byte("Bearer "+token)) == 1
}

func unauthorized(w http.ResponseWriter) {
	w.Header().Set("WWW-Authenticate", `Bearer realm="tether"`)
	http.Error(w, "unauthorized", http.StatusUnauthorized)
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
