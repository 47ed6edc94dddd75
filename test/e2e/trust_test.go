//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tether-proxy/tether/internal/procrun"
	"github.com/tether-proxy/tether/internal/testenv"
	gossip "github.com/tether-proxy/tether/pkg/cluster"
)

// Two gossip keys (base64 of 32 bytes) for the trust tests.
const (
	keyA = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
	keyB = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA="
)

// refuses runs a binary that must refuse to start and returns its exit
// code and output.
func refuses(t *testing.T, name string, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, filepath.Join(binDir, name), args...).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("%s %v: want a non-zero exit, got %v\n%s", name, args, err, out)
	}
	return ee.ExitCode(), string(out)
}

// routeAddr asks a proxy which address a key's owner has.
func routeAddr(t *testing.T, p *proc, key string) string {
	t.Helper()
	resp, err := http.Get("http://" + p.admin + "/route?key=" + key)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var ans struct {
		Addr string `json:"addr"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&ans); err != nil {
		t.Fatal(err)
	}
	return ans.Addr
}

// TestGossipNeedsKeyBeyondLoopback: gossip on a non-loopback address
// without --gossip-key refuses to start (proxy and gateway) unless
// --gossip-insecure, which warns at start and shows in the metric.
func TestGossipNeedsKeyBeyondLoopback(t *testing.T) {
	for _, bind := range []string{"0.0.0.0:0", ":0"} {
		code, out := refuses(t, "proxy", "--listen", "127.0.0.1:0", "--gateway", "gw-1=127.0.1.1:9", "--gossip-bind", bind)
		if code != 2 || !strings.Contains(out, "--gossip-key") || !strings.Contains(out, "--gossip-insecure") {
			t.Fatalf("proxy --gossip-bind %s without a key: exit %d\n%s", bind, code, out)
		}
		code, out = refuses(t, "gateway-stub", "--id", "gw-1", "--listen", "127.0.1.1:0", "--gossip-bind", bind)
		if code != 2 || !strings.Contains(out, "--gossip-key") {
			t.Fatalf("gateway-stub --gossip-bind %s without a key: exit %d\n%s", bind, code, out)
		}
	}
	gw := gatewayStub(t, 1, 0)
	p := start(t, "proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--gateway", "gw-1="+gw.addr,
		"--gossip-bind", "0.0.0.0:0", "--gossip-insecure")
	if n := p.logCount("gossip is unencrypted and unauthenticated on a non-loopback address (--gossip-insecure): any host that reaches it can announce gateways and receive their sessions; set --gossip-key", ""); n != 1 {
		t.Fatalf("%d insecure-gossip warnings at start, want 1:\n%s", n, p.logs())
	}
	if v, ok := metrics(t, p)["tether_gossip_encrypted"]; !ok || v != 0 {
		t.Fatalf("tether_gossip_encrypted = %v (present %v), want 0", v, ok)
	}
	if _, err := session(p.addr, "127.0.0.2", "insecure-but-serving"); err != nil {
		t.Fatal(err)
	}
}

// TestRogueGatewayNeverEntersRing: on a cluster started with a gossip key,
// a node without it that claims gw-1, with weight 1000 and a node name that
// sorts first, never reaches any proxy's ring: every key keeps its owner
// and gw-1 keeps its address.
func TestRogueGatewayNeverEntersRing(t *testing.T) {
	key := filepath.Join(t.TempDir(), "gossip.key")
	writeConfig(t, key, keyA)
	gw1 := gossipGateway(t, 1, "", "--gossip-key", key)
	gw2 := gossipGateway(t, 2, gw1.gossip, "--gossip-key", key)
	proxies := []*proc{gossipProxy(t, gw1.gossip, "--gossip-key", key), gossipProxy(t, gw2.gossip, "--gossip-key", key)}
	waitRing(t, 20*time.Second, 2, 0, proxies...)
	keys := keyList("rogue", 200)
	before := ownersVia(t, proxies, keys)
	addrBefore := routeAddr(t, proxies[0], keys[0])

	rogue := start(t, "gateway-stub", "--id", "gw-1", "--weight", "1000", "--node-name", "aaa-rogue", "--log-level", "debug",
		"--listen", "127.0.1.66:0", "--gossip-bind", "127.0.1.66:0", "--join", gw1.gossip+","+gw2.gossip)
	// Longer than the hijack took without a key (2 s): the rogue keeps
	// trying and nobody lets it in.
	waitFor(t, 20*time.Second, "the rogue to fail several joins", func() bool {
		return rogue.logCount("no seed answered; retrying", "") >= 6
	})
	for _, p := range proxies {
		m := metrics(t, p)
		if m["tether_gateway_id_conflicts"] != 0 || m["tether_cluster_members"] != 4 || m["tether_gossip_encrypted"] != 1 {
			t.Fatalf("proxy metrics: conflicts %v, members %v, encrypted %v", m["tether_gateway_id_conflicts"], m["tether_cluster_members"], m["tether_gossip_encrypted"])
		}
		rows := gatewaysOf(t, p, "")
		if r := rows["gw-1"]; len(r.Conflict) != 0 || r.Addr == rogue.addr {
			t.Fatalf("/gateways gw-1: %+v (rogue at %s)", r, rogue.addr)
		}
		for _, k := range keys {
			if a := routeAddr(t, p, k); a == rogue.addr {
				t.Fatalf("%s routes to the rogue", k)
			}
		}
	}
	after := ownersVia(t, proxies, keys)
	for _, k := range keys {
		if after[k] != before[k] {
			t.Fatalf("%s moved from %s to %s", k, before[k], after[k])
		}
	}
	if a := routeAddr(t, proxies[1], keys[0]); a != addrBefore && before[keys[0]] == "gw-1" {
		t.Fatalf("gw-1's address changed to %s", a)
	}
	t.Logf("a keyless rogue claiming gw-1 (weight 1000) failed %d joins; 200 keys unmoved on both proxies", rogue.logCount("no seed answered; retrying", ""))
}

// TestGossipKeyRotation: a running cluster moves from key A to key B in the
// documented three steps (add B, make B primary, drop A), each applied with
// SIGHUP on every node, while clients keep connecting: no member is lost,
// no key moves, and at the end a node with only B joins while one with
// only A cannot.
func TestGossipKeyRotation(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "gossip.key")
	writeConfig(t, key, keyA)
	gw1 := gossipGateway(t, 1, "", "--gossip-key", key)
	gw2 := gossipGateway(t, 2, gw1.gossip, "--gossip-key", key)
	gw3 := gossipGateway(t, 3, gw1.gossip, "--gossip-key", key)
	proxies := []*proc{gossipProxy(t, gw1.gossip, "--gossip-key", key), gossipProxy(t, gw2.gossip, "--gossip-key", key)}
	waitRing(t, 20*time.Second, 3, 0, proxies...)
	keys := keyList("rot", 200)
	before := ownersVia(t, proxies, keys)

	bg := startTraffic(t, 4, proxies[0].addr, "127.0.0.2", func(w, i int) string { return keys[w*50+i%50] })
	nodes := []*proc{gw1, gw2, gw3, proxies[0], proxies[1]}
	steps := []struct {
		name string
		file []string
	}{
		{"add B as a secondary", []string{"# rotation step 1", keyA, keyB}},
		{"make B the primary", []string{keyB, keyA}},
		{"drop A", []string{keyB}},
	}
	for i, st := range steps {
		writeConfig(t, key, st.file...)
		for _, n := range nodes {
			if err := n.cmd.Process.Signal(syscall.SIGHUP); err != nil {
				t.Fatal(err)
			}
		}
		for _, n := range nodes {
			waitFor(t, 10*time.Second, fmt.Sprintf("step %q applied on %s", st.name, n.name), func() bool {
				return n.logCount("SIGHUP: gossip keyring reloaded", "") == i+1
			}, n.logs)
		}
		// A state change must still cross the cluster after each step.
		for _, p := range proxies {
			if a, d := ringState(t, p); a != 3 || d != 0 {
				t.Fatalf("after %q: ring %v active, %v draining", st.name, a, d)
			}
		}
	}
	bg.Stop()
	if bg.failed.Load() != 0 {
		t.Fatalf("%d client sessions failed during the rotation", bg.failed.Load())
	}
	after := ownersVia(t, proxies, keys)
	for _, k := range keys {
		if after[k] != before[k] {
			t.Fatalf("%s moved from %s to %s during the rotation", k, before[k], after[k])
		}
	}
	onlyB, onlyA := filepath.Join(dir, "b.key"), filepath.Join(dir, "a.key")
	writeConfig(t, onlyB, keyB)
	writeConfig(t, onlyA, keyA)
	late := gossipProxy(t, gw3.gossip, "--gossip-key", onlyB)
	waitRing(t, 20*time.Second, 3, 0, late)
	stale := gossipProxy(t, gw3.gossip, "--gossip-key", onlyA, "--log-level", "debug")
	waitFor(t, 20*time.Second, "the old-key proxy to fail several joins", func() bool {
		return stale.logCount("no seed answered; retrying", "") >= 4
	})
	if a, d := ringState(t, stale); a+d != 0 {
		t.Fatalf("a proxy with only the retired key sees %v gateways", a+d)
	}
	t.Logf("rotated A → A,B → B,A → B on 5 nodes with %d sessions meanwhile, none failed; 200 keys unmoved", bg.served.Load())
}

// TestDuplicateGatewayID: a second gateway started with a used --id (with
// the default node name, or one of its own) refuses to announce and exits
// 3; a conflict forced through pkg/cluster shows on every proxy's log,
// metric and /gateways, and both proxies route the ID to one address.
func TestDuplicateGatewayID(t *testing.T) {
	gw1 := gossipGateway(t, 1, "")
	gw2 := gossipGateway(t, 2, gw1.gossip)
	proxies := []*proc{gossipProxy(t, gw1.gossip), gossipProxy(t, gw2.gossip)}
	waitRing(t, 20*time.Second, 2, 0, proxies...)

	for _, extra := range [][]string{nil, {"--node-name", "gw-1-second"}} {
		args := append([]string{"--id", "gw-1", "--listen", "127.0.1.7:0", "--gossip-bind", "127.0.1.7:0", "--join", gw1.gossip}, extra...)
		dup := start(t, "gateway-stub", args...)
		if code := dup.exitCode(20 * time.Second); code != 3 {
			t.Fatalf("duplicate %v: exit %d, want 3:\n%s", extra, code, dup.logs())
		}
		if dup.logCount("refusing to announce: this gateway ID is taken; exiting", "") != 1 {
			t.Fatalf("duplicate %v: no clear refusal:\n%s", extra, dup.logs())
		}
		for _, p := range proxies {
			for _, k := range keyList("dup", 50) {
				if routeAddr(t, p, k) == dup.addr {
					t.Fatalf("a key routes to the refused duplicate")
				}
			}
		}
	}

	// (A refused duplicate under its own node name joined as draining for a
	// moment: the proxies may have logged that conflict already.)
	const conflictLog = "gateway ID claimed by more than one live member: routing to one of them (active first, then the smaller node name); give each gateway its own --id"
	const overLog = "gateway ID conflict over: one claimant left"
	logged, over := map[*proc]int{}, map[*proc]int{}
	for _, p := range proxies {
		waitFor(t, 20*time.Second, "the refused duplicate gone from "+p.name, func() bool { return metrics(t, p)["tether_gateway_id_conflicts"] == 0 })
		// Log lines arrive through a pipe, after the metric changed: wait
		// until every conflict logged so far has its end logged too.
		waitFor(t, 5*time.Second, "the duplicate's conflict, if any, logged as over on "+p.name, func() bool {
			return p.logCount(conflictLog, "") == p.logCount(overLog, "")
		})
		logged[p], over[p] = p.logCount(conflictLog, ""), p.logCount(overLog, "")
	}

	// A conflict forced with the lower-level API: a member named so that
	// it sorts first claims gw-1 at another (real) gateway's address.
	other := start(t, "gateway-stub", "--id", "gw-1", "--listen", "127.0.1.9:0", "--proxy-protocol", "require")
	forced, err := gossip.New(gossip.Config{NodeName: "gw-0-forced", BindAddr: "127.0.1.9:0", Join: []string{gw1.gossip},
		Meta: gossip.Meta{Role: gossip.RoleGateway, ID: "gw-1", Addr: other.addr, Weight: 1, State: gossip.StateActive}})
	if err != nil {
		t.Fatal(err)
	}
	defer forced.Shutdown()
	for _, p := range proxies {
		waitFor(t, 20*time.Second, "the conflict on "+p.name, func() bool { return metrics(t, p)["tether_gateway_id_conflicts"] == 1 }, p.logs)
	}
	keys := keyList("conf", 100)
	for _, p := range proxies {
		waitFor(t, 5*time.Second, "the conflict's error line on "+p.name, func() bool { return p.logCount(conflictLog, "") > logged[p] })
		if n := p.logCount(conflictLog, "") - logged[p]; n != 1 {
			t.Fatalf("%d conflict errors on %s, want 1", n, p.name)
		}
		row := gatewaysOf(t, p, "")["gw-1"]
		if len(row.Conflict) != 2 || row.Conflict[0].Node != "gw-0-forced" || !row.Conflict[0].Routing ||
			row.Conflict[1].Node != "gw-1" || row.Conflict[1].Addr != gw1.addr || row.Addr != other.addr {
			t.Fatalf("/gateways gw-1 on %s: %+v", p.name, row)
		}
	}
	for _, k := range keys {
		if a, b := routeAddr(t, proxies[0], k), routeAddr(t, proxies[1], k); a != b {
			t.Fatalf("%s: proxies disagree (%s vs %s)", k, a, b)
		}
	}
	if err := forced.Leave(5 * time.Second); err != nil {
		t.Logf("leave not confirmed: %v", err)
	}
	for _, p := range proxies {
		waitFor(t, 20*time.Second, "the conflict to clear on "+p.name, func() bool { return metrics(t, p)["tether_gateway_id_conflicts"] == 0 })
		waitFor(t, 5*time.Second, "the conflict's end logged on "+p.name, func() bool { return p.logCount(overLog, "") > over[p] })
		if n := p.logCount(overLog, "") - over[p]; n != 1 {
			t.Fatalf("conflict end logged %d times on %s, want once", n, p.name)
		}
	}
}

// TestRedisFullKeepsBindings: with Redis full under noeviction, every bound
// key still reaches its bound gateway through every proxy; new keys use the
// ring; each proxy logs Redis's own reason once, not "unavailable".
func TestRedisFullKeepsBindings(t *testing.T) {
	rd := testenv.StartRedis(t, "--maxmemory-policy", "noeviction")
	gws := []*proc{gatewayStub(t, 1, 0), gatewayStub(t, 2, 0), gatewayStub(t, 3, 0)}
	// 500ms, not the default 50ms: this test is about what a full Redis
	// answers, and a lookup that times out on a loaded machine goes to
	// the ring by design (TestRedisPausedFallbackLatency covers that).
	// With 50ms it failed about one run in ten under three CPU hogs,
	// with one event loop or two.
	args := []string{"--redis", "redis://" + rd.Addr, "--redis-timeout", "500ms"}
	proxies := []*proc{proxyFor(t, gws, args...), proxyFor(t, gws, args...)}
	rc := redis.NewClient(&redis.Options{Addr: rd.Addr})
	defer rc.Close()
	ctx := context.Background()
	keys := keyList("full", 100)
	for _, k := range keys { // bound to gw-2 whatever the ring says
		if err := rc.Set(ctx, "tether:bind:"+k, "gw-2", time.Hour).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if err := rc.ConfigSet(ctx, "maxmemory", "1mb").Err(); err != nil {
		t.Fatal(err)
	}
	filler := strings.Repeat("x", 16<<10)
	full := false
	for i := 0; i < 1000 && !full; i++ {
		err := rc.Set(ctx, fmt.Sprintf("filler:%d", i), filler, 0).Err()
		full = err != nil && strings.HasPrefix(err.Error(), "OOM")
	}
	if !full {
		t.Fatal("redis never filled up")
	}
	const rounds = 10
	var onGW2 atomic.Int64
	parallel(len(keys)*rounds, 16, func(i int) {
		res, err := session(proxies[i%2].addr, fmt.Sprintf("127.0.0.%d", 2+i%2), keys[i%len(keys)])
		if err != nil {
			t.Errorf("client error: %v", err)
			return
		}
		if res.reply.Gateway != "gw-2" {
			t.Errorf("%s went to %s, bound to gw-2", keys[i%len(keys)], res.reply.Gateway)
			return
		}
		onGW2.Add(1)
	})
	if t.Failed() {
		t.FailNow()
	}
	if _, err := session(proxies[0].addr, "127.0.0.2", "brand-new-key"); err != nil {
		t.Fatal(err)
	}
	if rc.Exists(ctx, "tether:bind:brand-new-key").Val() != 0 {
		t.Fatal("a new binding was stored in a full Redis")
	}
	for _, p := range proxies {
		if n := p.logCount("redis refuses writes: existing bindings are still honoured; new keys go to their ring owner unbound, and bindings are not refreshed", ""); n != 1 {
			t.Fatalf("%d refusal logs on %s, want 1:\n%s", n, p.name, p.logs())
		}
		if n := p.logCount("redis unavailable: routing by the ring until it answers", ""); n != 0 {
			t.Fatalf("a full Redis was logged as unavailable on %s", p.name)
		}
		if !p.alerted("OOM command not allowed") {
			t.Fatalf("the log does not say why writes fail on %s", p.name)
		}
		if metrics(t, p)["tether_redis_write_refusals_total"] == 0 {
			t.Fatalf("no refusal counted on %s", p.name)
		}
	}
	t.Logf("Redis full: %d of %d connects of keys bound to gw-2 reached gw-2", onGW2.Load(), len(keys)*rounds)
}

// TestSecondSignalForcesExit: a second SIGTERM while draining closes every
// session at once and exits non-zero, on the proxy and on the stub.
func TestSecondSignalForcesExit(t *testing.T) {
	gw := gatewayStub(t, 1, 0)
	p := proxyFor(t, []*proc{gw}, "--drain-timeout", "60s")
	c, _ := openSession(t, p.addr, "held")
	defer c.Close()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the proxy to start draining", func() bool {
		return p.logCount("shutting down: closing open sessions spread over the drain timeout (a second signal closes them at once)", "") == 1
	})
	t0 := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := p.exitCode(10 * time.Second); code != 1 {
		t.Fatalf("proxy exit %d after a second SIGTERM, want 1", code)
	}
	if p.logCount("second stop signal: closing every session now", "") != 1 {
		t.Fatalf("no log of the forced stop:\n%s", p.logs())
	}
	t.Logf("proxy: second SIGTERM exited in %v (drain timeout 60s)", time.Since(t0).Round(time.Millisecond))

	// Two signals back to back (both queued before the first is handled).
	quick := proxyFor(t, []*proc{gw}, "--drain-timeout", "60s")
	c2, _ := openSession(t, quick.addr, "held-2")
	defer c2.Close()
	_ = quick.cmd.Process.Signal(syscall.SIGTERM)
	_ = quick.cmd.Process.Signal(syscall.SIGINT)
	if code := quick.exitCode(10 * time.Second); code != 1 {
		t.Fatalf("proxy exit %d after two quick signals, want 1:\n%s", code, quick.logs())
	}

	stubP := start(t, "gateway-stub", "--id", "gw-9", "--listen", "127.0.1.9:0", "--drain-timeout", "60s")
	held, _ := openSession(t, stubP.addr, "held")
	defer held.Close()
	_ = stubP.cmd.Process.Signal(syscall.SIGTERM)
	waitFor(t, 10*time.Second, "the stub to start draining", func() bool {
		return stubP.logCount("shutting down: draining open sessions", "") == 1
	})
	_ = stubP.cmd.Process.Signal(syscall.SIGINT)
	if code := stubP.exitCode(10 * time.Second); code != 1 {
		t.Fatalf("stub exit %d after a second signal, want 1", code)
	}
}

// TestEarlySIGHUP: a SIGHUP that arrives while the proxy is still starting
// (right after its first log line, before it listens) is not fatal.
func TestEarlySIGHUP(t *testing.T) {
	gw := gatewayStub(t, 1, 0)
	for i := range 10 {
		hupped, listening := make(chan string, 1), make(chan struct{}, 1)
		first := true
		pr, err := procrun.Start(filepath.Join(binDir, "proxy"), []string{"--listen", "127.0.0.1:0", "--gateway", "gw-1=" + gw.addr},
			procrun.Options{Env: []string{"GORACE=atexit_sleep_ms=0"}, OnLine: func(l string) {
				if first { // the first log line: still starting, not listening yet
					first = false
					hupped <- l
				}
				if strings.Contains(l, `"msg":"listening"`) {
					listening <- struct{}{}
				}
			}})
		if err != nil {
			t.Fatal(err)
		}
		firstLine := <-hupped
		_ = pr.Signal(syscall.SIGHUP)
		select {
		case <-listening:
		case <-pr.Done():
			t.Fatalf("run %d: the proxy died after an early SIGHUP (sent on %s): exit %d", i, firstLine, pr.ExitCode())
		case <-time.After(20 * time.Second):
			t.Fatalf("run %d: the proxy never listened", i)
		}
		if pr.Stop(10*time.Second) || pr.ExitCode() != 0 {
			t.Fatalf("run %d: exit %d after SIGTERM", i, pr.ExitCode())
		}
	}
}

// TestDrainLastActiveNeedsForce: the admin API refuses to drain the last
// gateway that takes new keys (409) unless ?force=1.
func TestDrainLastActiveNeedsForce(t *testing.T) {
	gws := []*proc{gatewayStub(t, 1, 0), gatewayStub(t, 2, 0)}
	p := proxyFor(t, gws)
	base := "http://" + p.admin + "/gateways/"
	if code := post(t, base+"gw-1/drain", ""); code != 200 {
		t.Fatalf("drain gw-1: %d", code)
	}
	if code := post(t, base+"gw-2/drain", ""); code != http.StatusConflict {
		t.Fatalf("drain of the last active gateway: %d, want 409", code)
	}
	if _, err := session(p.addr, "127.0.0.2", "still-served"); err != nil {
		t.Fatalf("after a refused drain: %v", err)
	}
	if code := post(t, base+"gw-2/drain?force=1", ""); code != 200 {
		t.Fatalf("forced drain: %d", code)
	}
	if rows := gatewaysOf(t, p, ""); !rows["gw-2"].AdminDrained {
		t.Fatalf("forced drain not applied: %+v", rows["gw-2"])
	}
	// A clean SIGTERM is quiet: nothing at error level.
	p.stop()
	if errs := p.errorLines(); len(errs) != 0 {
		t.Fatalf("a clean shutdown logged errors:\n%s", strings.Join(errs, "\n"))
	}
}

// TestQuietShutdown: SIGTERM with sessions open (some parked, some busy)
// drains, closes the rest at the drain timeout and exits 0 without a line
// at error level.
func TestQuietShutdown(t *testing.T) {
	gw := gatewayStub(t, 1, 0)
	p := proxyFor(t, []*proc{gw}, "--drain-timeout", "500ms", "--park-after", "50ms")
	var open []net.Conn
	for i := range 6 {
		c, _ := openSession(t, p.addr, fmt.Sprintf("quiet-%d", i))
		defer c.Close()
		open = append(open, c)
	}
	waitFor(t, 5*time.Second, "idle sessions to park", func() bool { return metrics(t, p)["tether_parked_directions"] >= 2 })
	echoOnce(t, open[0], "busy right before the signal")
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := p.exitCode(10 * time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM with open sessions, want 0", code)
	}
	if errs := p.errorLines(); len(errs) != 0 {
		t.Fatalf("shutdown with open sessions logged errors:\n%s", strings.Join(errs, "\n"))
	}
}
