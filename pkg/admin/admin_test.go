package admin

import (
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
