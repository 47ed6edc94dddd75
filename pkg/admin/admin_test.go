package admin

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
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
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
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
	if ans.Key != "abc" || ans.Gateway != owner.ID || ans.Addr != owner.Addr || ans.Source != "ring" || len(ans.Candidates) != 2 {
		t.Fatalf("answer %+v", ans)
	}
}
