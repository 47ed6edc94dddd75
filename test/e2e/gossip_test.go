//go:build e2e

package e2e

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/pkg/proto"
)

// gossipGateway starts a stub on 127.0.1.<n> that joins the cluster through
// seed ("" for the first node).
func gossipGateway(t *testing.T, n int, seed string, extra ...string) *proc {
	t.Helper()
	// A short drain keeps test cleanup quick; tests that drain pass their
	// own --drain-timeout, which wins as the later flag.
	args := []string{"--id", fmt.Sprintf("gw-%d", n), "--listen", fmt.Sprintf("127.0.1.%d:0", n),
		"--proxy-protocol", "require", "--gossip-bind", fmt.Sprintf("127.0.1.%d:0", n), "--drain-timeout", "500ms"}
	if seed != "" {
		args = append(args, "--join", seed)
	}
	return start(t, "gateway-stub", append(args, extra...)...)
}

// gossipProxy starts a proxy with no static gateways that joins through seed.
func gossipProxy(t *testing.T, seed string, extra ...string) *proc {
	t.Helper()
	args := []string{"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--gossip-bind", "127.0.0.1:0", "--join", seed}
	return start(t, "proxy", append(args, extra...)...)
}

// ringState reads a proxy's gateway gauges.
func ringState(t *testing.T, p *proc) (active, draining float64) {
	t.Helper()
	m := metrics(t, p)
	return m[`tether_gateways{state="active"}`], m[`tether_gateways{state="draining"}`]
}

func waitRing(t *testing.T, timeout time.Duration, active, draining float64, proxies ...*proc) {
	t.Helper()
	var last []string // what each proxy saw at the last poll, for the failure
	waitFor(t, timeout, fmt.Sprintf("%v active and %v draining gateways on every proxy", active, draining), func() bool {
		last = last[:0]
		ok := true
		for _, p := range proxies {
			a, d := ringState(t, p)
			last = append(last, fmt.Sprintf("%v active/%v draining", a, d))
			ok = ok && a == active && d == draining
		}
		return ok
	}, func() string { return fmt.Sprintf("last seen per proxy: %v", last) })
}

// ownersVia connects once per key (alternating proxies and source IPs) and
// returns the gateway that answered each key. Any client error fails.
func ownersVia(t *testing.T, proxies []*proc, keys []string) map[string]string {
	t.Helper()
	var mu sync.Mutex
	out := make(map[string]string, len(keys))
	parallel(len(keys), 16, func(i int) {
		res, err := session(proxies[i%len(proxies)].addr, fmt.Sprintf("127.0.0.%d", 2+i%2), keys[i])
		if err != nil {
			t.Errorf("%s: client error: %v", keys[i], err)
			return
		}
		mu.Lock()
		out[keys[i]] = res.reply.Gateway
		mu.Unlock()
	})
	if t.Failed() {
		t.FailNow()
	}
	return out
}

func keyList(prefix string, n int) []string {
	ks := make([]string, n)
	for i := range ks {
		ks[i] = fmt.Sprintf("%s-%04d", prefix, i)
	}
	return ks
}

// TestGossipMembership: no static list anywhere. Three gateways and two
// proxies find each other by gossip; a fourth gateway takes about a quarter
// of the keys and only those; SIGTERM on it drains (open sessions live on,
// new connections go back to their old gateways); kill -9 of another moves
// only its keys, and clients see no error meanwhile.
func TestGossipMembership(t *testing.T) {
	gw1 := gossipGateway(t, 1, "")
	gw2 := gossipGateway(t, 2, gw1.gossip)
	gw3 := gossipGateway(t, 3, gw1.gossip)
	proxies := []*proc{gossipProxy(t, gw2.gossip), gossipProxy(t, gw3.gossip)}
	waitRing(t, 15*time.Second, 3, 0, proxies...)

	keys := keyList("g", 400)
	before := ownersVia(t, proxies, keys)
	again := ownersVia(t, proxies, keys)
	for _, k := range keys {
		if before[k] != again[k] {
			t.Fatalf("%s: %s then %s through the other proxy", k, before[k], again[k])
		}
	}

	// Scale out: gw-4 joins through a proxy.
	// 15s of drain: the draining state must reach both proxies and the
	// checks below must run inside it, on a loaded machine too (a full
	// e2e run once missed an 8s window).
	gw4 := gossipGateway(t, 4, proxies[0].gossip, "--drain-timeout", "15s")
	waitRing(t, 15*time.Second, 4, 0, proxies...)
	after := ownersVia(t, proxies, keys)
	moved := 0
	var onGW4 []string
	for _, k := range keys {
		if after[k] != before[k] {
			if after[k] != "gw-4" {
				t.Fatalf("%s moved %s → %s, not to the new gateway", k, before[k], after[k])
			}
			moved++
			onGW4 = append(onGW4, k)
		}
	}
	frac := float64(moved) / float64(len(keys))
	t.Logf("gw-4 joined: %d of %d keys (%.1f%%) moved, all to gw-4", moved, len(keys), 100*frac)
	if frac < 0.15 || frac > 0.35 {
		t.Fatalf("%.1f%% of keys moved, want 15%%..35%%", 100*frac)
	}

	// Open sessions on gw-4, then SIGTERM it.
	var open []net.Conn
	for _, k := range onGW4[:10] {
		c, rep := openSession(t, proxies[0].addr, k)
		if rep.Gateway != "gw-4" {
			t.Fatalf("%s on %s", k, rep.Gateway)
		}
		open = append(open, c)
	}
	drainStart := time.Now()
	if err := gw4.cmd.Process.Signal(sigterm); err != nil {
		t.Fatal(err)
	}
	waitRing(t, 12*time.Second, 3, 1, proxies...)
	drained := ownersVia(t, proxies, onGW4)
	for _, k := range onGW4 {
		if drained[k] != before[k] {
			t.Errorf("%s during drain: %s, want its old gateway %s", k, drained[k], before[k])
		}
	}
	for i, c := range open {
		echo(t, c, fmt.Sprintf("during drain %d", i))
	}
	if code := gw4.exitCode(30 * time.Second); code != 0 {
		t.Fatalf("gw-4 exit code %d", code)
	}
	took := time.Since(drainStart)
	if took < 15*time.Second {
		t.Fatalf("gw-4 exited after %v, before its 15s drain", took)
	}
	for _, c := range open {
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadAll(c); err != nil && !isReset(err) {
			t.Errorf("session after drain: %v", err)
		}
		c.Close()
	}
	waitRing(t, 15*time.Second, 3, 0, proxies...)
	t.Logf("gw-4 drained for %v with %d open sessions echoing, then left", took.Round(time.Millisecond), len(open))

	// kill -9 gw-3: clients keep being served (dial failover) while gossip
	// notices, then its keys rest on their second choice.
	second := map[string]string{}
	for _, k := range keys {
		if before[k] == "gw-3" {
			second[k] = routeOf(t, proxies[0], k)[1]
		}
	}
	gw3.kill()
	killed := time.Now()
	var served atomic.Int64
	converged := false
	for !converged && time.Since(killed) < 30*time.Second {
		got := ownersVia(t, proxies, keys) // fails the test on any client error
		served.Add(int64(len(keys)))
		for _, k := range keys {
			want := before[k]
			if want == "gw-3" {
				want = second[k]
			}
			if got[k] != want {
				t.Fatalf("%s after kill -9 of gw-3: %s, want %s", k, got[k], want)
			}
		}
		a, _ := ringState(t, proxies[0])
		b, _ := ringState(t, proxies[1])
		converged = a == 2 && b == 2
	}
	if !converged {
		t.Fatal("proxies did not drop gw-3 within 30s")
	}
	t.Logf("kill -9 gw-3: gossip dropped it after %v; %d connections meanwhile, none failed; %d keys on their second choice, the rest unmoved",
		time.Since(killed).Round(100*time.Millisecond), served.Load(), len(second))
}

// openSession connects, sends a hello and returns the live connection.
func openSession(t *testing.T, via, key string) (net.Conn, stub.Reply) {
	t.Helper()
	c, err := net.Dial("tcp", via)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	h, _ := proto.AppendHello(nil, []byte(key), nil)
	if _, err := c.Write(h); err != nil {
		t.Fatal(err)
	}
	rep, _, err := stub.ReadReply(c)
	if err != nil {
		t.Fatal(err)
	}
	return c, rep
}

// echo checks one round trip on an open session.
func echo(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
		t.Fatalf("echo %q: got %q, %v", msg, got, err)
	}
}

// TestGossipWrongKey: a gateway with another gossip key never enters a
// proxy's ring; one with the right key does.
func TestGossipWrongKey(t *testing.T) {
	dir := t.TempDir()
	good, bad := filepath.Join(dir, "good.key"), filepath.Join(dir, "bad.key")
	os.WriteFile(good, []byte("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n"), 0o600)
	os.WriteFile(bad, []byte("ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=\n"), 0o600)
	gw1 := gossipGateway(t, 1, "", "--gossip-key", good)
	p := gossipProxy(t, gw1.gossip, "--gossip-key", good)
	waitRing(t, 15*time.Second, 1, 0, p)

	intruder := gossipGateway(t, 5, gw1.gossip, "--gossip-key", bad)
	gossipGateway(t, 2, gw1.gossip, "--gossip-key", good)
	waitRing(t, 15*time.Second, 2, 0, p) // the right key gets in...
	// ...and for longer than a join takes, the wrong one never does.
	deadline := time.Now().Add(4 * time.Second)
	for time.Now().Before(deadline) {
		if a, d := ringState(t, p); a+d != 2 {
			t.Fatalf("proxy ring has %v gateways: the intruder got in", a+d)
		}
		for _, k := range keyList("w", 50) {
			if owner := routeOf(t, p, k)[0]; owner == "gw-5" {
				t.Fatalf("key %s routes to the intruder", k)
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	if intruder.logCount("no seed answered; retrying", "") == 0 {
		t.Fatalf("intruder never reported failing to join:\n%s", intruder.logs())
	}
}

// TestProxyRejoin: a proxy killed with -9 and restarted with the same node
// name and gossip address rejoins and serves without manual steps — both
// when it comes back before the others noticed it died, and after they
// declared it dead.
func TestProxyRejoin(t *testing.T) {
	gw1 := gossipGateway(t, 1, "")
	gossipGateway(t, 2, gw1.gossip)
	other := gossipProxy(t, gw1.gossip)
	p := gossipProxy(t, gw1.gossip, "--node-name", "proxy-fixed")
	waitRing(t, 15*time.Second, 2, 0, other, p)
	members := func() float64 { return metrics(t, other)["tether_cluster_members"] }
	waitFor(t, 10*time.Second, "4 members", func() bool { return members() == 4 })
	gossipAddr := p.gossip
	restart := func() *proc {
		t.Helper()
		np := start(t, "proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--gossip-bind", gossipAddr,
			"--join", gw1.gossip, "--node-name", "proxy-fixed")
		waitRing(t, 15*time.Second, 2, 0, np)
		if code := httpStatus(t, "http://"+np.admin+"/readyz"); code != 200 {
			t.Fatalf("restarted proxy readyz %d", code)
		}
		ownersVia(t, []*proc{np}, keyList("r", 50))
		return np
	}

	// Quick restart: back before failure detection could run. It must not
	// be declared dead afterwards (its new incarnation refutes the old).
	p.kill()
	p = restart()
	// Watch for longer than failure detection takes (~6s): nothing may flap.
	for end := time.Now().Add(8 * time.Second); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		if m := members(); m != 4 {
			t.Fatalf("after a quick restart the cluster counts %v members, want 4", m)
		}
	}

	// Slow restart: the cluster declares it dead first.
	p.kill()
	waitFor(t, 20*time.Second, "the killed proxy to be declared dead", func() bool { return members() == 3 })
	restart()
	waitFor(t, 15*time.Second, "the restarted proxy to be alive again", func() bool { return members() == 4 })
}
