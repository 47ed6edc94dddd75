//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/internal/testenv"
	"github.com/tether-proxy/tether/pkg/proto"
	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route"
	"github.com/tether-proxy/tether/pkg/route/redisbind"
)

// lookupAPI talks to one proxy's admin API with a bearer token.
type lookupAPI struct {
	t     *testing.T
	admin string
	c     http.Client
}

// do sends method path (with body, as JSON, unless nil) with token and
// returns the status and body.
func (a *lookupAPI) do(method, path, token string, body any) (int, []byte) {
	a.t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			a.t.Fatal(err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://"+a.admin+path, rd)
	if err != nil {
		a.t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := a.c.Do(req)
	if err != nil {
		a.t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out
}

// batch POSTs keys to /lookup and returns the answers.
func (a *lookupAPI) batch(token string, keys []string) []route.Answer {
	a.t.Helper()
	code, body := a.do("POST", "/lookup", token, map[string]any{"keys": keys})
	if code != 200 {
		a.t.Fatalf("POST /lookup: %d %s", code, body)
	}
	var res struct {
		Results []route.Answer `json:"results"`
	}
	if err := json.Unmarshal(body, &res); err != nil {
		a.t.Fatal(err)
	}
	return res.Results
}

// tokenFile writes a token into a 0600 file and returns its path.
func tokenFile(t *testing.T, name, token string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestLookups: a dispatch service's view of a proxy with real Redis
// bindings. Keys that connected are looked up where they were served
// (binding); a batch of keys never seen answers in order and leaves Redis
// as it was; the lookup token reads but cannot drain; after kill -9 of a
// gateway and one failed-over reconnect, lookups of its keys name the
// gateway that now serves them, within a second.
func TestLookups(t *testing.T) {
	rd := testenv.StartRedis(t)
	var gws []*proc
	for i := 1; i <= 3; i++ {
		gws = append(gws, gatewayStub(t, i, 0))
	}
	const adminTok, lookTok = "admin-secret", "lookup-secret"
	px := proxyFor(t, gws, "--redis", "redis://"+rd.Addr,
		"--admin-token-file", tokenFile(t, "admin", adminTok), "--lookup-token-file", tokenFile(t, "lookup", lookTok))
	api := &lookupAPI{t: t, admin: px.admin, c: http.Client{Timeout: 5 * time.Second}}
	rc, err := redisbind.NewClient("redis://"+rd.Addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	ctx := context.Background()

	// 1. 200 keys connect once; each lookup names the gateway that served it.
	const n = 200
	served := make([]string, n)
	keys := make([]string, n)
	var mu sync.Mutex
	parallel(n, 16, func(i int) {
		key := fmt.Sprintf("lk-%d", i)
		res, err := session(px.addr, "127.0.0.2", key)
		if err != nil {
			t.Errorf("%s: %v", key, err)
			return
		}
		mu.Lock()
		keys[i], served[i] = key, res.reply.Gateway
		mu.Unlock()
	})
	if t.Failed() {
		t.FailNow()
	}
	for i, key := range keys {
		code, body := api.do("GET", "/lookup?key="+key, lookTok, nil)
		var a route.Answer
		if code != 200 || json.Unmarshal(body, &a) != nil {
			t.Fatalf("GET /lookup?key=%s: %d %s", key, code, body)
		}
		if a.Gateway != served[i] || a.Source != route.SourceBinding || !a.Live || a.Key != key || a.KeyHash != ring.KeyHashHex([]byte(key)) {
			t.Fatalf("lookup %s = %+v; it was served by %s", key, a, served[i])
		}
	}
	bindings := rc.DBSize(ctx).Val()
	if bindings != n {
		t.Fatalf("Redis holds %d keys after %d sessions", bindings, n)
	}

	// A batch of 500 keys never seen: 500 answers in order, no new binding.
	unseen := make([]string, 500)
	for i := range unseen {
		unseen[i] = fmt.Sprintf("never-%d", i)
	}
	ans := api.batch(lookTok, unseen)
	if len(ans) != len(unseen) {
		t.Fatalf("%d answers for %d keys", len(ans), len(unseen))
	}
	for i, a := range ans {
		if a.Key != unseen[i] || a.Source != route.SourceRing || a.Gateway == "" || !a.Live {
			t.Fatalf("answer %d: %+v", i, a)
		}
	}
	if got := rc.DBSize(ctx).Val(); got != bindings {
		t.Fatalf("Redis holds %d keys after the batch, %d before", got, bindings)
	}
	// A connect for one of them goes where the lookup said.
	res, err := session(px.addr, "127.0.0.2", unseen[7])
	if err != nil || res.reply.Gateway != ans[7].Gateway {
		t.Fatalf("connect of %s went to %s (%v); the lookup said %s", unseen[7], res.reply.Gateway, err, ans[7].Gateway)
	}

	// 2. Auth: the lookup token reads but cannot drain; no token reads
	// nothing; the admin token does both.
	for _, tc := range []struct {
		method, path, token string
		want                int
	}{
		{"GET", "/lookup?key=lk-1", "", 401},
		{"GET", "/lookup?key=lk-1", "wrong", 401},
		{"GET", "/route?key=lk-1", "", 401},
		{"GET", "/route?key=lk-1", lookTok, 200},
		{"POST", "/gateways/gw-1/drain?force=1", lookTok, 403},
		{"POST", "/gateways/gw-1/undrain", lookTok, 403},
		{"GET", "/gateways", lookTok, 403},
		{"GET", "/lookup?key=lk-1", adminTok, 200},
		{"POST", "/gateways/gw-1/drain", adminTok, 200},
		{"POST", "/gateways/gw-1/undrain", adminTok, 200},
	} {
		if code, body := api.do(tc.method, tc.path, tc.token, nil); code != tc.want {
			t.Errorf("%s %s with token %q: %d %s, want %d", tc.method, tc.path, tc.token, code, body, tc.want)
		}
	}
	if strings.Contains(strings.Join(px.allLines(), "\n"), lookTok) || strings.Contains(strings.Join(px.allLines(), "\n"), adminTok) {
		t.Error("a token shows in the proxy's logs")
	}

	// 3. kill -9 a gateway; one of its clients reconnects and fails over;
	// within a second lookups of all its keys name a live gateway, the
	// reconnected key's the one that serves it now.
	victim := served[0]
	var victimKeys []string
	for i, g := range served {
		if g == victim {
			victimKeys = append(victimKeys, keys[i])
		}
	}
	for _, g := range gws {
		if strings.Contains(g.name, "--id "+victim+" ") {
			g.kill()
		}
	}
	res, err = session(px.addr, "127.0.0.3", victimKeys[0])
	if err != nil || res.reply.Gateway == victim {
		t.Fatalf("reconnect of %s after %s was killed: %+v, %v", victimKeys[0], victim, res.reply, err)
	}
	reconnected := time.Now()
	var last []route.Answer
	waitFor(t, time.Second, "lookups of the dead gateway's keys to name a live one", func() bool {
		last = api.batch(lookTok, victimKeys)
		for _, a := range last {
			if a.Gateway == victim || !a.Live {
				return false
			}
		}
		return true
	}, func() string { return fmt.Sprint(last) })
	t.Logf("%s killed: lookups of its %d keys name live gateways %v after the first reconnect", victim, len(victimKeys), time.Since(reconnected).Round(time.Millisecond))
	if last[0].Gateway != res.reply.Gateway {
		t.Fatalf("lookup of the reconnected %s names %s; it is served by %s", victimKeys[0], last[0].Gateway, res.reply.Gateway)
	}
	// Every other victim key then connects where its lookup said.
	for i, key := range victimKeys[1:] {
		r, err := session(px.addr, "127.0.0.3", key)
		if err != nil || r.reply.Gateway != last[i+1].Gateway {
			t.Fatalf("%s: served by %s (%v), lookup said %s", key, r.reply.Gateway, err, last[i+1].Gateway)
		}
	}
}

// TestLiveAccounting: 90 idle sessions and one bulk stream through a proxy:
// tether_gateway_sessions_active sums to 91 and tether_bytes_total (and
// the per-gateway bytes) grow second by second while the stream runs, not
// only when it ends.
func TestLiveAccounting(t *testing.T) {
	gws := []*proc{gatewayStub(t, 1, 0), gatewayStub(t, 2, 0)}
	px := proxyFor(t, gws)
	var idle []net.Conn
	defer func() {
		for _, c := range idle {
			c.Close()
		}
	}()
	for i := range 90 {
		c, err := net.DialTimeout("tcp", px.addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		h, _ := proto.AppendHello(nil, []byte(fmt.Sprintf("idle-%d", i)), nil)
		if _, err := c.Write(h); err != nil {
			t.Fatal(err)
		}
		if _, _, err := stub.ReadReply(c); err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Time{})
	}

	bulk, err := net.DialTimeout("tcp", px.addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer bulk.Close()
	h, _ := proto.AppendHello(nil, []byte("bulk"), nil)
	if _, err := bulk.Write(h); err != nil {
		t.Fatal(err)
	}
	if _, _, err := stub.ReadReply(bulk); err != nil {
		t.Fatal(err)
	}
	// The stream: writes until stop (bounded: at most 30 s), echo
	// drained by a reader.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		buf := make([]byte, 64<<10)
		end := time.Now().Add(30 * time.Second)
		for time.Now().Before(end) {
			select {
			case <-stop:
				return
			default:
			}
			_ = bulk.SetWriteDeadline(time.Now().Add(5 * time.Second))
			if _, err := bulk.Write(buf); err != nil {
				return
			}
		}
	}()
	go func() { defer wg.Done(); _, _ = io.Copy(io.Discard, bulk) }()
	defer func() { close(stop); bulk.Close(); wg.Wait() }()

	sessions := func(m map[string]float64) (sum float64) {
		for k, v := range m {
			if strings.HasPrefix(k, "tether_gateway_sessions_active{") {
				sum += v
			}
		}
		return sum
	}
	up := func(m map[string]float64) float64 { return m[`tether_bytes_total{direction="client_to_gateway"}`] }
	perGW := func(m map[string]float64) (sum float64) {
		for k, v := range m {
			if strings.HasPrefix(k, "tether_gateway_bytes_total{") && strings.Contains(k, `direction="gateway_to_client"`) {
				sum += v
			}
		}
		return sum
	}
	m := metrics(t, px)
	if got := sessions(m); got != 91 {
		t.Fatalf("tether_gateway_sessions_active sums to %v, want 91", got)
	}
	// Sampled once a second for three seconds: each sample sees more
	// bytes than the one before, in total and per gateway.
	prev, prevGW := up(m), perGW(m)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for sec := 1; sec <= 3; sec++ {
		<-tick.C
		m = metrics(t, px)
		if up(m) <= prev || perGW(m) <= prevGW {
			t.Fatalf("second %d: tether_bytes_total %v (was %v), gateway bytes %v (was %v): not growing while the stream runs", sec, up(m), prev, perGW(m), prevGW)
		}
		t.Logf("second %d: client_to_gateway %.0f MiB, gateway_to_client (per gateway, summed) %.0f MiB", sec, up(m)/(1<<20), perGW(m)/(1<<20))
		prev, prevGW = up(m), perGW(m)
	}
	if got := sessions(m); got != 91 {
		t.Fatalf("after the stream ran: %v sessions active, want 91 (the bulk session must still be open)", got)
	}
}
