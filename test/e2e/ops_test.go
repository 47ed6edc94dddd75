//go:build e2e

package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/pkg/proto"
)

// holdSessions opens n sessions through via and keeps them open.
func holdSessions(t *testing.T, via, prefix string, n int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, n)
	parallel(n, 16, func(i int) {
		c, err := net.Dial("tcp", via)
		if err != nil {
			t.Error(err)
			return
		}
		_ = c.SetDeadline(time.Now().Add(60 * time.Second))
		h, _ := proto.AppendHello(nil, []byte(fmt.Sprintf("%s-%d", prefix, i)), nil)
		if _, err := c.Write(h); err != nil {
			t.Error(err)
			return
		}
		if _, _, err := stub.ReadReply(c); err != nil {
			t.Error(err)
			return
		}
		conns[i] = c
	})
	if t.Failed() {
		t.FailNow()
	}
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	return conns
}

// TestMetricsAddUp scrapes /metrics while sessions are open and after they
// close: accepted = closed + active, and handshake failures by reason match
// the bad inputs sent.
func TestMetricsAddUp(t *testing.T) {
	gw := gatewayStub(t, 1, 0)
	p := proxyFor(t, []*proc{gw}, "--handshake-timeout", "500ms")
	held := holdSessions(t, p.addr, "held", 20)
	const good = 200
	parallel(good, 16, func(i int) {
		if _, err := session(p.addr, "127.0.0.2", fmt.Sprintf("g-%d", i)); err != nil {
			t.Error(err)
		}
	})
	bad := map[string][][]byte{
		"bad_version": {{0, 0, 0, 3, 7, 1, 'k'}, {0, 0, 0, 3, 0, 1, 'k'}},
		"bad_keylen":  {{0, 0, 0, 2, 1, 0}},
		"bad_length":  {{0, 0, 0, 0}, {0, 0, 0, 1, 1}},
		"too_large":   {{0xff, 0xff, 0xff, 0xff}, []byte("GET / HTTP/1.1\r\n\r\n"), {0, 0, 0x10, 1}},
		"timeout":     {nil},
	}
	for _, inputs := range bad {
		for _, in := range inputs {
			if got, _, err := badClient(p.addr, in, false, false); err != nil || len(got) != 0 {
				t.Fatalf("bad client: %q %v", got, err)
			}
		}
	}
	check := func(active float64) map[string]float64 {
		t.Helper()
		// The gauge and the counters are separate atomics: a scrape
		// while connections close may see a connection already gone
		// from active and not yet counted closed. At rest they add up.
		var m map[string]float64
		waitFor(t, 5*time.Second, fmt.Sprintf("%v active connections, and accepted = closed + active", active), func() bool {
			m = metrics(t, p)
			return m["tether_connections_active"] == active &&
				m["tether_connections_accepted_total"] == m["tether_connections_closed_total"]+active
		}, func() string {
			return fmt.Sprintf("accepted %v, closed %v, active %v", m["tether_connections_accepted_total"], m["tether_connections_closed_total"], m["tether_connections_active"])
		})
		return m
	}
	m := check(20)
	total := 0
	for reason, inputs := range bad {
		total += len(inputs)
		if got := m[fmt.Sprintf(`tether_handshake_failures_total{reason="%s"}`, reason)]; got != float64(len(inputs)) {
			t.Errorf("reason %s: counted %v, sent %d", reason, got, len(inputs))
		}
	}
	if acc := m["tether_connections_accepted_total"]; acc != float64(20+good+total) {
		t.Errorf("accepted %v, want %d", acc, 20+good+total)
	}
	if r := m[`tether_routes_total{source="ring"}`]; r != float64(20+good) {
		t.Errorf("routes %v, want %d", r, 20+good)
	}
	if m[`tether_bytes_total{direction="gateway_to_client"}`] == 0 || m["tether_session_duration_seconds_count"] != good {
		t.Errorf("bytes %v, sessions %v", m[`tether_bytes_total{direction="gateway_to_client"}`], m["tether_session_duration_seconds_count"])
	}
	for _, c := range held {
		c.Close()
	}
	m = check(0)
	if m["tether_session_duration_seconds_count"] != good+20 {
		t.Errorf("session histogram count %v, want %d", m["tether_session_duration_seconds_count"], good+20)
	}
}

// TestSIGTERMDrainUnderLoad: 200 sessions echo continuously; on SIGTERM new
// connections are refused at once, the sessions are closed one by one over
// --drain-timeout (the first soon, the last near its end, none before the
// signal) and the proxy exits 0.
func TestSIGTERMDrainUnderLoad(t *testing.T) {
	const drain = 3 * time.Second
	gw := gatewayStub(t, 1, 0)
	p := proxyFor(t, []*proc{gw}, "--drain-timeout", drain.String())
	conns := holdSessions(t, p.addr, "drain", 200)
	var echoes atomic.Int64
	ended := make([]int64, len(conns)) // unix nanos of each session's error
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := []byte(fmt.Sprintf("m%03d", i))
			buf := make([]byte, len(msg))
			for {
				if _, err := c.Write(msg); err != nil {
					ended[i] = time.Now().UnixNano()
					return
				}
				if _, err := readFull(c, buf); err != nil || string(buf) != string(msg) {
					ended[i] = time.Now().UnixNano()
					return
				}
				echoes.Add(1)
				time.Sleep(20 * time.Millisecond)
			}
		}()
	}
	waitFor(t, 5*time.Second, "echo traffic", func() bool { return echoes.Load() > 1000 })
	sigAt := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Second, "new connections refused", func() bool {
		c, err := net.DialTimeout("tcp", p.addr, time.Second)
		if err != nil {
			return errors.Is(err, syscall.ECONNREFUSED)
		}
		c.Close()
		return false
	})
	if refusedAfter := time.Since(sigAt); refusedAfter > time.Second {
		t.Fatalf("new connections still accepted %v after SIGTERM", refusedAfter)
	}
	if code := p.exitCode(drain + 10*time.Second); code != 0 {
		t.Fatalf("exit code %d", code)
	}
	wg.Wait()
	first, last := time.Duration(1<<62), time.Duration(0)
	for _, at := range ended {
		d := time.Unix(0, at).Sub(sigAt)
		if at == 0 || d < 0 {
			t.Fatalf("a session ended before SIGTERM (or never): %v", d)
		}
		first, last = min(first, d), max(last, d)
	}
	if first > drain/4 || last < drain/2 {
		t.Fatalf("sessions closed from %v to %v after SIGTERM: not spread over the %v drain", first, last, drain)
	}
	t.Logf("SIGTERM with 200 echoing sessions: refused new connections at once; sessions closed from %v to %v after the signal (drain %v); exit 0",
		first.Round(10*time.Millisecond), last.Round(10*time.Millisecond), drain)
}

func readFull(c net.Conn, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := c.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// TestMaxConns: with --max-conns 100, 150 clients: 100 are served, 50 are
// closed at once, and the proxy stays healthy.
func TestMaxConns(t *testing.T) {
	gw := gatewayStub(t, 1, 0)
	p := proxyFor(t, []*proc{gw}, "--max-conns", "100")
	held := holdSessions(t, p.addr, "mc", 100)
	var refused atomic.Int64
	parallel(50, 10, func(i int) {
		start := time.Now()
		got, _, err := badClient(p.addr, mustHello(t, fmt.Sprintf("over-%d", i)), false, false)
		if err != nil && !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("over-limit client: %v", err)
			return
		}
		if len(got) != 0 {
			t.Errorf("over-limit client served: %q", got)
			return
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("over-limit client closed after %v, not at once", d)
		}
		refused.Add(1)
	})
	if refused.Load() != 50 {
		t.Fatalf("%d of 50 over-limit clients refused", refused.Load())
	}
	m := metrics(t, p)
	if m[`tether_connections_rejected_total{reason="max_conns"}`] != 50 || m["tether_connections_active"] != 100 {
		t.Fatalf("rejected %v, active %v", m[`tether_connections_rejected_total{reason="max_conns"}`], m["tether_connections_active"])
	}
	for i, c := range held {
		echoOnce(t, c, fmt.Sprintf("held %d", i))
	}
	if code := httpStatus(t, "http://"+p.admin+"/readyz"); code != 200 {
		t.Fatalf("readyz %d", code)
	}
	held[0].Close()
	waitFor(t, 5*time.Second, "a free slot", func() bool { return metrics(t, p)["tether_connections_active"] == 99 })
	if _, err := session(p.addr, "127.0.0.2", "after"); err != nil {
		t.Fatalf("proxy did not recover a slot: %v", err)
	}
}

func mustHello(t *testing.T, key string) []byte {
	t.Helper()
	h, err := proto.AppendHello(nil, []byte(key), nil)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func echoOnce(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, len(msg))
	if _, err := readFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo %q: %q %v", msg, buf, err)
	}
}

func writeConfig(t *testing.T, path string, lines ...string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
}

func gatewayLines(gws []*proc) []string {
	lines := []string{"gateway:"}
	for i, g := range gws {
		lines = append(lines, fmt.Sprintf("  - gw-%d=%s", i+1, g.addr))
	}
	return lines
}

// TestSIGHUPReload: SIGHUP with a gateway added to the config file drops no
// session and sends new keys to the new gateway; the log level follows the
// file; an invalid file changes nothing.
func TestSIGHUPReload(t *testing.T) {
	gws := []*proc{gatewayStub(t, 1, 0), gatewayStub(t, 2, 0), gatewayStub(t, 3, 0)}
	cfg := filepath.Join(t.TempDir(), "tether.yaml")
	writeConfig(t, cfg, append([]string{`listen: "127.0.0.1:0"`, `admin: "127.0.0.1:0"`, "log-level: info"}, gatewayLines(gws)...)...)
	p := start(t, "proxy", "--config", cfg, "--admin", "127.0.0.1:0")
	held := holdSessions(t, p.addr, "hup", 100)

	gws = append(gws, gatewayStub(t, 4, 0))
	writeConfig(t, cfg, append([]string{`listen: "127.0.0.1:0"`, "log-level: debug"}, gatewayLines(gws)...)...)
	if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "reload", func() bool { return p.logCount("SIGHUP: reloaded gateway list and log level", "") == 1 })
	for i, c := range held {
		echoOnce(t, c, fmt.Sprintf("after reload %d", i))
	}
	owners := ownersVia(t, []*proc{p}, keyList("hupnew", 300))
	onNew := 0
	for _, g := range owners {
		if g == "gw-4" {
			onNew++
		}
	}
	if onNew < 30 {
		t.Fatalf("only %d of 300 new keys on the added gateway", onNew)
	}
	// Debug logging is now on: a bad hello is logged.
	badClient(p.addr, []byte{0, 0, 0, 2, 1, 0}, false, false)
	waitFor(t, 5*time.Second, "a debug line", func() bool {
		return p.logCount("handshake failed; closing client without a reply", "bad_keylen") == 1
	})

	// An invalid file is refused and changes nothing.
	writeConfig(t, cfg, "gateway: [nope]")
	p.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, 5*time.Second, "rejection", func() bool {
		return p.logCount("SIGHUP: config invalid; keeping the running configuration", "") == 1
	})
	if a, _ := ringState(t, p); a != 4 {
		t.Fatalf("invalid reload changed the ring: %v gateways", a)
	}
	for i, c := range held {
		echoOnce(t, c, fmt.Sprintf("after bad reload %d", i))
	}
	t.Logf("SIGHUP: 100 open sessions kept echoing; %d of 300 new keys went to the added gateway", onNew)
}

type gatewayRow struct {
	ID             string `json:"id"`
	Addr           string `json:"addr"`
	State          string `json:"state"`
	AdminDrained   bool   `json:"admin_drained"`
	ActiveSessions int    `json:"active_sessions"`
	Live           bool   `json:"live"`
	Conflict       []struct {
		Node    string `json:"node"`
		Addr    string `json:"addr"`
		Routing bool   `json:"routing"`
	} `json:"conflict"`
}

func gatewaysOf(t *testing.T, p *proc, token string) map[string]gatewayRow {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+p.admin+"/gateways", nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var rows []gatewayRow
	if err := json.NewDecoder(resp.Body).Decode(&rows); err != nil {
		t.Fatal(err)
	}
	out := map[string]gatewayRow{}
	for _, r := range rows {
		out[r.ID] = r
	}
	return out
}

func post(t *testing.T, url, token string) int {
	t.Helper()
	req, _ := http.NewRequest("POST", url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestAdminDrain: draining a gateway through the admin API moves its new
// connections within a second, leaves its open sessions alone, shows in
// /gateways, and undrain brings the keys back.
func TestAdminDrain(t *testing.T) {
	const token = "t0ken"
	gws := []*proc{gatewayStub(t, 1, 0), gatewayStub(t, 2, 0), gatewayStub(t, 3, 0)}
	p := proxyFor(t, gws, "--admin-token", token)
	keys := keyList("ad", 200)
	before := ownersVia(t, []*proc{p}, keys)
	var onGW2 []string
	for _, k := range keys {
		if before[k] == "gw-2" {
			onGW2 = append(onGW2, k)
		}
	}
	open, rep := openSession(t, p.addr, onGW2[0])
	defer open.Close()
	if rep.Gateway != "gw-2" {
		t.Fatalf("open session on %s", rep.Gateway)
	}
	if code := post(t, "http://"+p.admin+"/gateways/gw-2/drain", ""); code != 401 {
		t.Fatalf("drain without token: %d", code)
	}
	start := time.Now()
	if code := post(t, "http://"+p.admin+"/gateways/gw-2/drain", token); code != 200 {
		t.Fatalf("drain: %d", code)
	}
	waitFor(t, time.Second, "gw-2's keys to move", func() bool { return routeOfAuth(t, p, onGW2[0], token) != "gw-2" })
	took := time.Since(start)
	rows := gatewaysOf(t, p, token)
	if r := rows["gw-2"]; r.State != "draining" || !r.AdminDrained || r.ActiveSessions != 1 {
		t.Fatalf("/gateways row for gw-2: %+v", r)
	}
	after := ownersVia(t, []*proc{p}, keys)
	for _, k := range keys {
		if after[k] == "gw-2" || (before[k] != "gw-2" && after[k] != before[k]) {
			t.Fatalf("%s: %s before, %s during drain", k, before[k], after[k])
		}
	}
	echoOnce(t, open, "still open during the admin drain")
	if code := post(t, "http://"+p.admin+"/gateways/gw-2/undrain", token); code != 200 {
		t.Fatalf("undrain: %d", code)
	}
	back := ownersVia(t, []*proc{p}, keys)
	for _, k := range keys {
		if back[k] != before[k] {
			t.Fatalf("%s: %s before, %s after undrain", k, before[k], back[k])
		}
	}
	if code := post(t, "http://"+p.admin+"/gateways/nope/drain", token); code != 404 {
		t.Fatalf("unknown gateway: %d", code)
	}
	t.Logf("admin drain of gw-2 (%d keys) took effect in %v; its open session kept echoing; undrain restored all", len(onGW2), took.Round(time.Millisecond))
}

func routeOfAuth(t *testing.T, p *proc, key, token string) string {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+p.admin+"/route?key="+key, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var ans struct {
		Gateway string `json:"gateway"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&ans)
	return ans.Gateway
}

// TestCheckConfig: --check-config validates like haproxy -c; the sample
// config in examples/ is valid.
func TestCheckConfig(t *testing.T) {
	out, err := exec.Command(filepath.Join(binDir, "proxy"), "--config", "../../examples/proxy.yaml", "--check-config").CombinedOutput()
	if err != nil {
		t.Fatalf("examples/proxy.yaml: %v\n%s", err, out)
	}
	dir := t.TempDir()
	good, bad := filepath.Join(dir, "good.yaml"), filepath.Join(dir, "bad.yaml")
	writeConfig(t, good, `listen: ":7000"`, "gateway: [gw-1=127.0.1.1:9000]", `handshake-timeout: "3s"`)
	writeConfig(t, bad, `listen: ":7000"`, "gateway: [gw-1=127.0.1.1:9000]", "handshake-timout: 3s")
	out, err = exec.Command(filepath.Join(binDir, "proxy"), "--config", good, "--check-config").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "configuration valid") {
		t.Fatalf("good config: %v\n%s", err, out)
	}
	out, err = exec.Command(filepath.Join(binDir, "proxy"), "--config", bad, "--check-config").CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), `line 3: unknown key "handshake-timout"`) {
		t.Fatalf("bad config: %v\n%s", err, out)
	}
}
