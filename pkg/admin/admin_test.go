package admin

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route"
)

func TestEndpoints(t *testing.T) {
	var h ring.Holder
	var ready atomic.Bool
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_test_total", Help: "x"})
	reg.MustRegister(c)
	c.Inc()
	srv := httptest.NewServer(Handler(Config{Gatherer: reg, Ready: func() bool { return ready.Load() }, Resolver: &route.RingResolver{Ring: &h}}))
	defer srv.Close()

	get := func(path string) (int, string) {
		t.Helper()
		return request(t, http.MethodGet, srv.URL+path, "")
	}
	tests := []struct {
		path string
		code int
		body string
	}{
		{"/healthz", 200, "ok"},
		{"/readyz", 503, "not ready"},
		{"/metrics", 200, "tether_test_total 1"},
		{"/route?key=abc", 503, "no live gateway"},
		{"/route", 400, "key"},
	}
	for _, tt := range tests {
		code, body := get(tt.path)
		if code != tt.code || !strings.Contains(body, tt.body) {
			t.Errorf("%s: %d %q, want %d containing %q", tt.path, code, body, tt.code, tt.body)
		}
	}
	ready.Store(true)
	if code, _ := get("/readyz"); code != 200 {
		t.Fatalf("readyz %d when ready", code)
	}
	r, _ := ring.New([]ring.Member{{ID: "gw-1", Addr: "127.0.1.1:9000", Weight: 1}, {ID: "gw-2", Addr: "127.0.1.2:9000", Weight: 1}})
	h.Store(r)
	code, body := get("/route?key=abc")
	var ans RouteAnswer
	if err := json.Unmarshal([]byte(body), &ans); err != nil || code != 200 {
		t.Fatalf("%d %q: %v", code, body, err)
	}
	owner, _ := r.Lookup([]byte("abc"))
	if ans.Key != "abc" || ans.Gateway != owner.ID || ans.Addr != owner.Addr || ans.Source != "ring" || len(ans.Candidates) != 2 ||
		ans.KeyHash != strconv.FormatUint(ring.KeyHash([]byte("abc")), 16) {
		t.Fatalf("answer %+v", ans)
	}
}

func TestGatewaysDrainAndToken(t *testing.T) {
	drained := map[string]bool{}
	var mu sync.Mutex
	cfg := Config{
		Token: "s3cret",
		Gateways: func() []GatewayStatus {
			mu.Lock()
			defer mu.Unlock()
			return []GatewayStatus{{ID: "gw-1", Addr: "127.0.1.1:9000", Weight: 1, State: "active", Live: true, Source: "static", AdminDrained: drained["gw-1"]}}
		},
		Drain: func(id string, d, force bool) error {
			if id != "gw-1" {
				return ErrUnknownGateway
			}
			if d && !force {
				return fmt.Errorf("%w: gw-1", ErrLastActive)
			}
			mu.Lock()
			drained[id] = d
			mu.Unlock()
			return nil
		},
	}
	srv := httptest.NewServer(Handler(cfg))
	defer srv.Close()
	do := func(method, path, token string) (int, string) {
		t.Helper()
		return request(t, method, srv.URL+path, token)
	}
	tests := []struct {
		method, path, token string
		code                int
		body                string
	}{
		{"GET", "/gateways", "", 401, "unauthorized"},
		{"GET", "/gateways", "wrong", 401, "unauthorized"},
		{"GET", "/gateways", "s3cret", 200, `"admin_drained":false`},
		{"POST", "/gateways/gw-1/drain", "", 401, "unauthorized"},
		{"POST", "/gateways/gw-1/drain", "s3cret", 409, "?force=1"},
		{"GET", "/gateways", "s3cret", 200, `"admin_drained":false`},
		{"POST", "/gateways/gw-1/drain?force=1", "s3cret", 200, `"admin_drained":true`},
		{"GET", "/gateways", "s3cret", 200, `"admin_drained":true`},
		{"POST", "/gateways/gw-1/undrain", "s3cret", 200, `"admin_drained":false`},
		{"POST", "/gateways/nope/drain", "s3cret", 404, "unknown gateway"},
		{"GET", "/gateways/gw-1/drain", "s3cret", 405, ""},
		{"GET", "/healthz", "", 200, "ok"},
	}
	for _, tt := range tests {
		code, body := do(tt.method, tt.path, tt.token)
		if code != tt.code || !strings.Contains(body, tt.body) {
			t.Errorf("%s %s (token %q): %d %q, want %d containing %q", tt.method, tt.path, tt.token, code, body, tt.code, tt.body)
		}
	}
}

func TestCheckBind(t *testing.T) {
	tests := []struct {
		addr, token string
		ok          bool
	}{
		{"127.0.0.1:7100", "", true},
		{"[::1]:7100", "", true},
		{"localhost:7100", "", true},
		{"0.0.0.0:7100", "", false},
		{":7100", "", false},
		{"10.0.0.5:7100", "", false},
		{"10.0.0.5:7100", "tok", true},
	}
	for _, tt := range tests {
		if err := CheckBind(tt.addr, tt.token); (err == nil) != tt.ok {
			t.Errorf("CheckBind(%q, %q) = %v", tt.addr, tt.token, err)
		}
	}
}

// request sends method to url (with a bearer token unless empty) and
// returns the status and body.
func request(t *testing.T, method, url, token string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestLookupAndTokens(t *testing.T) {
	var h ring.Holder
	r, _ := ring.New([]ring.Member{{ID: "gw-1", Addr: "127.0.1.1:9000", Weight: 1}, {ID: "gw-2", Addr: "127.0.1.2:9000", Weight: 1}})
	h.Store(r)
	res := &route.RingResolver{Ring: &h}
	cfg := Config{
		Token: "adm", LookupToken: "look",
		Resolver: res,
		Lookup: func(ctx context.Context, keys []string) ([]route.Answer, error) {
			return route.Lookup(ctx, res, keys, nil)
		},
		Gateways: func() []GatewayStatus { return nil },
		Drain:    func(string, bool, bool) error { return nil },
	}
	srv := httptest.NewServer(Handler(cfg))
	defer srv.Close()
	keys := make([]string, 500)
	for i := range keys {
		keys[i] = fmt.Sprintf("never-seen-%d", i)
	}
	batch, _ := json.Marshal(LookupRequest{Keys: keys})
	tooMany, _ := json.Marshal(LookupRequest{Keys: make([]string, route.MaxLookupKeys+1)})
	tests := []struct {
		method, path, token, body string
		code                      int
		want                      string
	}{
		{"GET", "/lookup?key=abc", "", "", 401, "unauthorized"},
		{"GET", "/lookup?key=abc", "wrong", "", 401, "unauthorized"},
		{"GET", "/lookup?key=abc", "look", "", 200, `"gateway":"gw-`},
		{"GET", "/lookup?key=abc", "adm", "", 200, `"live":true`},
		{"GET", "/route?key=abc", "look", "", 200, `"candidates"`},
		{"GET", "/route?key=abc", "", "", 401, "unauthorized"},
		{"GET", "/lookup", "look", "", 400, "key"},
		{"GET", "/lookup?key=" + strings.Repeat("x", 256), "look", "", 400, "key"},
		{"POST", "/lookup", "look", string(batch), 200, `"results":[`},
		{"POST", "/lookup", "", string(batch), 401, "unauthorized"},
		{"POST", "/lookup", "look", string(tooMany), 413, "at most 1000"},
		{"POST", "/lookup", "look", `{"keys":["a",""]}`, 400, "keys[1]"},
		{"POST", "/lookup", "look", `not json`, 400, "JSON"},
		{"POST", "/gateways/gw-1/drain", "look", "", 403, "read-only"},
		{"POST", "/gateways/gw-1/undrain", "look", "", 403, "read-only"},
		{"GET", "/gateways", "look", "", 403, "read-only"},
		{"POST", "/gateways/gw-1/drain", "adm", "", 200, "admin_drained"},
		{"POST", "/gateways/gw-1/drain", "", "", 401, "unauthorized"},
	}
	for _, tt := range tests {
		req, _ := http.NewRequest(tt.method, srv.URL+tt.path, strings.NewReader(tt.body))
		if tt.token != "" {
			req.Header.Set("Authorization", "Bearer "+tt.token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tt.code || !strings.Contains(string(b), tt.want) {
			t.Errorf("%s %s (token %q): %d %.200q, want %d containing %q", tt.method, tt.path, tt.token, resp.StatusCode, b, tt.code, tt.want)
		}
		if tt.path == "/lookup" && tt.code == 200 {
			var out LookupResults
			if err := json.Unmarshal(b, &out); err != nil || len(out.Results) != len(keys) {
				t.Fatalf("batch: %d results, %v", len(out.Results), err)
			}
			for i, a := range out.Results {
				owner, _ := r.Lookup([]byte(keys[i]))
				if a.Key != keys[i] || a.Gateway != owner.ID || a.Addr != owner.Addr || a.Source != route.SourceRing {
					t.Fatalf("result %d = %+v, want key %s on %s", i, a, keys[i], owner.ID)
				}
			}
		}
	}
}

// TestLookupTokenWithoutAdminToken: a lookup token alone protects the
// lookups; the admin endpoints stay as open as without tokens (loopback).
func TestLookupTokenWithoutAdminToken(t *testing.T) {
	srv := httptest.NewServer(Handler(Config{LookupToken: "look", Gateways: func() []GatewayStatus { return nil },
		Lookup: func(context.Context, []string) ([]route.Answer, error) { return []route.Answer{{Gateway: "gw-1"}}, nil }}))
	defer srv.Close()
	for _, tt := range []struct {
		path, token string
		code        int
	}{{"/gateways", "", 200}, {"/gateways", "look", 403}, {"/lookup?key=k", "", 401}, {"/lookup?key=k", "look", 200}} {
		if code, body := request(t, "GET", srv.URL+tt.path, tt.token); code != tt.code {
			t.Errorf("%s (token %q): %d %q, want %d", tt.path, tt.token, code, body, tt.code)
		}
	}
}
