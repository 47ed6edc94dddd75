//go:build e2e

package e2e

import (
	"bufio"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tether-proxy/tether/internal/procrun"
	"github.com/tether-proxy/tether/internal/testenv"
)

// pythonGateway starts the example Python gateway on 127.0.1.<n>:port.
func pythonGateway(t *testing.T, id string, listen string) *proc {
	t.Helper()
	py := testenv.Need(t, "python3")
	return startCmd(t, "python-gateway "+id, py, "../../examples/python-gateway/gateway.py", "--id", id, "--listen", listen, "--trusted", "127.0.0.0/8")
}

// ownersOf counts keys per gateway.
func ownersOf(owners map[string]string) map[string]int {
	n := map[string]int{}
	for _, g := range owners {
		n[g]++
	}
	return n
}

// TestForeignGatewayWithAgent: a Python gateway (standard library only)
// joins a gossip cluster of two Go stubs through tether-agent and takes
// about a third of the keys; kill -9 of the Python process (the agent stays
// alive, so gossip alone would never notice) takes it out of the ring
// within 5 s moving only its keys; restarting it brings every key back
// within 5 s; SIGTERM on the agent stops new keys within 2 s, then it
// leaves and exits 0.
func TestForeignGatewayWithAgent(t *testing.T) {
	gw1 := gossipGateway(t, 1, "")
	gossipGateway(t, 2, gw1.gossip)
	p := gossipProxy(t, gw1.gossip)
	waitRing(t, 20*time.Second, 2, 0, p)

	py := pythonGateway(t, "gw-py", "127.0.1.5:0")
	agent := start(t, "tether-agent", "--id", "gw-py", "--service", py.addr, "--gossip-bind", "127.0.1.5:0",
		"--join", gw1.gossip, "--drain-timeout", "3s")
	waitRing(t, 10*time.Second, 3, 0, p)
	keys := keyList("py", 300)
	before := ownersVia(t, []*proc{p}, keys)
	share := ownersOf(before)["gw-py"]
	if share < 60 || share > 140 {
		t.Fatalf("the Python gateway took %d of 300 keys, want about a third: %v", share, ownersOf(before))
	}

	killed := time.Now()
	py.kill()
	waitRing(t, 5*time.Second, 2, 0, p)
	outAfter := time.Since(killed)
	select {
	case <-agent.done:
		t.Fatal("the agent exited with its gateway")
	default:
	}
	during := ownersVia(t, []*proc{p}, keys)
	for _, k := range keys {
		if before[k] != "gw-py" && during[k] != before[k] {
			t.Fatalf("%s moved from %s to %s though its gateway is fine", k, before[k], during[k])
		}
		if during[k] == "gw-py" {
			t.Fatalf("%s still reached the dead gateway", k)
		}
	}

	restarted := time.Now()
	pythonGateway(t, "gw-py", py.addr)
	waitRing(t, 5*time.Second, 3, 0, p)
	backAfter := time.Since(restarted)
	after := ownersVia(t, []*proc{p}, keys)
	for _, k := range keys {
		if after[k] != before[k] {
			t.Fatalf("%s: %s before, %s after the restart", k, before[k], after[k])
		}
	}
	if agent.logCount("health check failed: gateway published down, its keys go to their next choice", "") != 1 ||
		agent.logCount("health check passed again: gateway active", "") != 1 {
		t.Fatalf("the agent did not log each change once:\n%s", agent.logs())
	}

	stopped := time.Now()
	_ = agent.cmd.Process.Signal(syscall.SIGTERM)
	waitFor(t, 2*time.Second, "no new keys to the draining gateway", func() bool {
		a, d := ringState(t, p)
		return a == 2 && d == 1
	})
	for _, k := range keys[:50] {
		if g := routeOf(t, p, k)[0]; g == "gw-py" {
			t.Fatalf("%s still routed to the draining gateway", k)
		}
	}
	if code := agent.exitCode(15 * time.Second); code != 0 {
		t.Fatalf("agent exit %d after SIGTERM, want 0", code)
	}
	waitRing(t, 10*time.Second, 2, 0, p)
	t.Logf("Python gateway via tether-agent: %d/300 keys; kill -9 out of the ring in %v; restart back in %v; SIGTERM drained, left and exited 0 in %v",
		share, outAfter.Round(100*time.Millisecond), backAfter.Round(100*time.Millisecond), time.Since(stopped).Round(100*time.Millisecond))
}

// TestNewestSessionWins: a phone holds a session from 127.0.0.2 through one
// proxy and vanishes (no FIN, no RST); the same key comes back from
// 127.0.0.3 through the other proxy. Within a second the gateway resets the
// stale session, the first proxy's active connections drop by one, and the
// new session echoes.
func TestNewestSessionWins(t *testing.T) {
	gws := []*proc{gatewayStub(t, 1, 0), gatewayStub(t, 2, 0)}
	pa, pb := proxyFor(t, gws), proxyFor(t, gws)
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}
	stale, err := d.Dial("tcp", pa.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer stale.Close()
	hello := []byte("\x00\x00\x00\x0a\x01\x08phone-42")
	if _, err := stale.Write(hello); err != nil {
		t.Fatal(err)
	}
	if _, err := bufio.NewReader(stale).Peek(4); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the session on proxy A", func() bool { return metrics(t, pa)["tether_connections_active"] == 1 })

	t0 := time.Now()
	res, err := session(pb.addr, "127.0.0.3", "phone-42")
	if err != nil {
		t.Fatalf("the reconnect: %v", err)
	}
	waitFor(t, time.Second, "proxy A to drop the stale session", func() bool { return metrics(t, pa)["tether_connections_active"] == 0 })
	took := time.Since(t0)
	_ = stale.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err = io.ReadAll(stale)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("the stale client saw %v, want a reset", err)
	}
	if res.reply.Conns != 2 {
		t.Fatalf("gateway counted %d connections for the key, want 2", res.reply.Conns)
	}
	t.Logf("newest session wins: the stale session through proxy A ended %v after the reconnect through proxy B", took.Round(time.Millisecond))
}

// TestGoGatewayOutsideModule: examples/go-gateway, a module of its own that
// imports only pkg/gateway (with a replace to this checkout), builds, joins
// the cluster, serves its share of keys and drains on SIGTERM.
func TestGoGatewayOutsideModule(t *testing.T) {
	repo, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	src, err := os.ReadFile(filepath.Join(repo, "examples/go-gateway/main.go"))
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(src), "\n"); n >= 60 {
		t.Fatalf("the example gateway has %d lines, want under 60", n)
	}
	for _, f := range []string{"main.go", "go.mod", "go.sum"} {
		b, err := os.ReadFile(filepath.Join(repo, "examples/go-gateway", f))
		if err != nil {
			t.Fatal(err)
		}
		if f == "go.mod" {
			b = []byte(strings.Replace(string(b), "=> ../..", "=> "+repo, 1))
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	build := exec.Command("go", "build", "-o", "gw", ".")
	build.Dir = dir
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the example outside the module: %v\n%s", err, out)
	}

	gw1 := gossipGateway(t, 1, "")
	p := gossipProxy(t, gw1.gossip)
	waitRing(t, 20*time.Second, 1, 0, p)
	var mu sync.Mutex
	var logs strings.Builder
	gwProc, err := procrun.Start(filepath.Join(dir, "gw"), []string{"--id", "gw-9", "--listen", "127.0.1.9:0", "--gossip-bind", "127.0.1.9:0", "--join", gw1.gossip},
		procrun.Options{OnLine: func(l string) { mu.Lock(); logs.WriteString(l + "\n"); mu.Unlock() }})
	if err != nil {
		t.Fatal(err)
	}
	defer gwProc.Kill()
	output := func() string { mu.Lock(); defer mu.Unlock(); return logs.String() }
	waitFor(t, 20*time.Second, "the Go example in the ring", func() bool { a, _ := ringState(t, p); return a == 2 }, output)
	owners := ownersOf(ownersVia(t, []*proc{p}, keyList("ex", 200)))
	if owners["gw-9"] < 50 {
		t.Fatalf("the example gateway served %d of 200 keys: %v", owners["gw-9"], owners)
	}
	if gwProc.Stop(15*time.Second) || gwProc.ExitCode() != 0 {
		t.Fatalf("example gateway after SIGTERM: exit %d\n%s", gwProc.ExitCode(), output())
	}
	waitRing(t, 10*time.Second, 1, 0, p)
	t.Logf("examples/go-gateway (%d lines, built outside the module): %d of 200 keys, drained and exited 0", strings.Count(string(src), "\n"), owners["gw-9"])
}

// TestClientRaw: tether-client works against any gateway that speaks the
// documented reply (here the stub, two hops), and with --raw against one
// that sends no reply at all (a bare echo behind --proxy-protocol-out off).
func TestClientRaw(t *testing.T) {
	client := filepath.Join(binDir, "tether-client")
	gw := gatewayStub(t, 1, 0)
	p := proxyFor(t, []*proc{gw})
	out, err := exec.Command(client, "--key", "alice", "--via", p.addr, "--from", "127.0.0.2,127.0.0.3", "--hops", "2").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "same gateway") {
		t.Fatalf("tether-client against the stub: %v\n%s", err, out)
	}

	ln, err := net.Listen("tcp", "127.0.1.8:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	bare := start(t, "proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--proxy-protocol-out", "off",
		"--gateway", "bare="+ln.Addr().String())
	out, err = exec.Command(client, "--key", "bob", "--via", bare.addr, "--raw", "--timeout", "2s").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "echo ok (raw") {
		t.Fatalf("tether-client --raw against a bare echo: %v\n%s", err, out)
	}
	out, err = exec.Command(client, "--key", "bob", "--via", bare.addr, "--timeout", "2s").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "--raw") {
		t.Fatalf("without --raw a gateway without replies must fail with a hint: %v\n%s", err, out)
	}
}
