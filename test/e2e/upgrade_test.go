//go:build e2e

package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tether-proxy/tether/internal/pidfile"
	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/internal/testenv"
	"github.com/tether-proxy/tether/pkg/proto"
)

// nextVersion is the version of the proxy-next build.
const nextVersion = "e2e-next"

// upgradable is a proxy binary of the test's own, which the test may
// replace on disk, with a pid file beside it.
type upgradable struct {
	t       *testing.T
	exe     string
	pidFile string
}

func newUpgradable(t *testing.T) *upgradable {
	t.Helper()
	dir := t.TempDir()
	u := &upgradable{t: t, exe: filepath.Join(dir, "proxy"), pidFile: filepath.Join(dir, "proxy.pid")}
	u.install(filepath.Join(binDir, "proxy"))
	return u
}

// install puts a binary (or script) at u.exe the way a deploy does: a new
// file renamed over the old one, which a running process keeps using.
func (u *upgradable) install(from string) {
	u.t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		u.t.Fatal(err)
	}
	u.installBytes(b)
}

func (u *upgradable) installBytes(b []byte) {
	u.t.Helper()
	tmp := u.exe + ".new"
	if err := os.WriteFile(tmp, b, 0o755); err != nil {
		u.t.Fatal(err)
	}
	if err := os.Rename(tmp, u.exe); err != nil {
		u.t.Fatal(err)
	}
}

// start runs the proxy from u.exe with --pid-file; at cleanup whichever
// process the pid file names is stopped too (a new process is not the
// test's child).
func (u *upgradable) start(args ...string) *proc {
	u.t.Helper()
	p := startCmd(u.t, "proxy", u.exe, append([]string{"--pid-file", u.pidFile}, args...)...)
	u.t.Cleanup(func() {
		// Every process that announced itself on this output, not only the
		// one the pid file names: a test that failed half way must not
		// leave one running (its output pipe would keep the harness waiting).
		for _, pid := range announcedPids(p) {
			if pid != p.cmd.Process.Pid {
				stopPid(u.t, pid)
			}
		}
	})
	return p
}

// announcedPids are the pids of the "listening" lines on p's output (the
// process, and the new ones of its upgrades).
func announcedPids(p *proc) []int {
	var out []int
	for _, l := range p.allLines() {
		var e struct {
			Msg string
			PID int
		}
		if json.Unmarshal([]byte(l), &e) == nil && e.Msg == "listening" && e.PID > 0 {
			out = append(out, e.PID)
		}
	}
	return out
}

// pid reads the pid file.
func (u *upgradable) pid() int {
	u.t.Helper()
	pid, err := readPid(u.pidFile)
	if err != nil {
		u.t.Fatal(err)
	}
	return pid
}

// upgrade sends SIGUSR2 to pid.
func upgrade(t *testing.T, pid int) {
	t.Helper()
	if err := syscall.Kill(pid, syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
}

func readPid(path string) (int, error) { return pidfile.Read(path) }

func alive(pid int) bool { return pidfile.Alive(pid) }

// stopPid sends SIGTERM to a process that is not the test's child and
// waits for it, then SIGKILL.
func stopPid(t *testing.T, pid int) {
	if pidfile.Stop(pid, 15*time.Second) {
		t.Errorf("process %d ignored SIGTERM for 15s; killed it", pid)
	}
}

// bulk is a client streaming seeded pseudo-random bytes through an echo
// session until stopped, then checking that every byte came back in order.
type bulk struct {
	c                *net.TCPConn
	stop             chan struct{}
	sent, got        atomic.Int64
	writeErr, result chan error
}

func startBulk(t *testing.T, via, key string, seed uint64) *bulk {
	t.Helper()
	nc, err := net.Dial("tcp", via)
	if err != nil {
		t.Fatal(err)
	}
	c := nc.(*net.TCPConn)
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
	h, _ := proto.AppendHello(nil, []byte(key), nil)
	if _, err := c.Write(h); err != nil {
		t.Fatal(err)
	}
	if _, _, err := stub.ReadReply(c); err != nil {
		t.Fatal(err)
	}
	b := &bulk{c: c, stop: make(chan struct{}), writeErr: make(chan error, 1), result: make(chan error, 1)}
	go func() {
		r := rand.New(rand.NewPCG(seed, 2))
		buf := make([]byte, 16<<10)
		for deadline := time.Now().Add(90 * time.Second); time.Now().Before(deadline); {
			select {
			case <-b.stop:
				b.writeErr <- c.CloseWrite()
				return
			default:
			}
			for i := range buf {
				buf[i] = byte(r.Uint32())
			}
			n, err := c.Write(buf)
			b.sent.Add(int64(n))
			if err != nil {
				b.writeErr <- err
				return
			}
		}
		b.writeErr <- errors.New("bulk stream not stopped within 90s")
	}()
	go func() {
		r := rand.New(rand.NewPCG(seed, 2))
		buf := make([]byte, 64<<10)
		for {
			n, err := c.Read(buf)
			for i := range buf[:n] {
				if buf[i] != byte(r.Uint32()) {
					b.result <- fmt.Errorf("byte %d differs: lost, duplicated or reordered", b.got.Load()+int64(i))
					return
				}
			}
			b.got.Add(int64(n))
			if errors.Is(err, io.EOF) {
				b.result <- nil
				return
			}
			if err != nil {
				b.result <- fmt.Errorf("read after %d bytes: %w", b.got.Load(), err)
				return
			}
		}
	}()
	return b
}

// finish stops the stream and returns its outcome.
func (b *bulk) finish() error {
	close(b.stop)
	if err := <-b.writeErr; err != nil {
		return fmt.Errorf("write after %d bytes: %w", b.sent.Load(), err)
	}
	if err := <-b.result; err != nil {
		return err
	}
	if s, g := b.sent.Load(), b.got.Load(); s != g {
		return fmt.Errorf("sent %d bytes, %d came back", s, g)
	}
	return nil
}

// echoer is a session that echoes a message every 20 ms until stopped.
type echoer struct {
	stop    chan struct{}
	done    chan struct{}
	echoes  atomic.Int64
	err     error
	slowest time.Duration
}

func startEchoer(t *testing.T, via, key string) *echoer {
	t.Helper()
	c := holdSessions(t, via, key, 1)[0]
	e := &echoer{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(e.done)
		for i := 0; ; i++ {
			select {
			case <-e.stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			msg := []byte(fmt.Sprintf("%s-%d;", key, i))
			got := make([]byte, len(msg))
			t0 := time.Now()
			if _, err := c.Write(msg); err != nil {
				e.err = err
				return
			}
			if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
				e.err = fmt.Errorf("echo %d: %q, %v", i, got, err)
				return
			}
			e.slowest = max(e.slowest, time.Since(t0))
			e.echoes.Add(1)
		}
	}()
	return e
}

func (e *echoer) finish() error {
	close(e.stop)
	<-e.done
	return e.err
}

// echoAll checks that every held session still echoes.
func echoAll(t *testing.T, conns []net.Conn, tag string) {
	t.Helper()
	var failed atomic.Int64
	parallel(len(conns), 32, func(i int) {
		msg := []byte(fmt.Sprintf("%s-%d", tag, i))
		got := make([]byte, len(msg))
		if _, err := conns[i].Write(msg); err != nil {
			failed.Add(1)
			t.Errorf("session %d: write: %v", i, err)
			return
		}
		if _, err := io.ReadFull(conns[i], got); err != nil || !bytes.Equal(got, msg) {
			failed.Add(1)
			t.Errorf("session %d: echo %q, %v", i, got, err)
		}
	})
	if n := failed.Load(); n > 0 {
		t.Fatalf("%d of %d sessions did not echo (%s)", n, len(conns), tag)
	}
}

// waitTakeover waits until the pid file names a process other than old,
// and old has exited.
func waitTakeover(t *testing.T, u *upgradable, old int, within time.Duration) int {
	t.Helper()
	var pid int
	waitFor(t, within, "the pid file to name the new process", func() bool {
		p, err := readPid(u.pidFile)
		pid = p
		return err == nil && p != old
	})
	waitFor(t, within, "the old process to exit", func() bool { return !alive(old) })
	return pid
}

// TestUpgradeNoSessionNotices is issue 16's first demonstration: 1,000
// idle sessions, 16 echoing every 20 ms, 4 bulk streams and a client
// opening sessions back to back go through a proxy whose binary is
// replaced and which gets SIGUSR2. The new process (the new file: its
// version says so) takes over within seconds, the old one exits, and no
// client notices.
func TestUpgradeNoSessionNotices(t *testing.T) {
	gws := []*proc{gatewayStub(t, 1, 0), gatewayStub(t, 2, 0)}
	u := newUpgradable(t)
	args := []string{"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"}
	for i, g := range gws {
		args = append(args, "--gateway", fmt.Sprintf("gw-%d=%s", i+1, g.addr))
	}
	p := u.start(args...)
	old := u.pid()
	if old != p.cmd.Process.Pid {
		t.Fatalf("pid file says %d, the proxy is %d", old, p.cmd.Process.Pid)
	}

	idle := holdSessions(t, p.addr, "idle", 1000)
	var echoers []*echoer
	for i := range 16 {
		echoers = append(echoers, startEchoer(t, p.addr, fmt.Sprintf("echo-%d", i)))
	}
	var streams []*bulk
	for i := range 4 {
		streams = append(streams, startBulk(t, p.addr, fmt.Sprintf("bulk-%d", i), uint64(i)))
	}
	tr := startTraffic(t, 2, p.addr, "127.0.0.3", func(w, i int) string { return fmt.Sprintf("new-%d-%d", w, i) })
	waitFor(t, 10*time.Second, "traffic", func() bool {
		return tr.served.Load() > 50 && echoers[0].echoes.Load() > 10 && streams[0].got.Load() > 1<<20
	})

	u.install(filepath.Join(binDir, "proxy-next"))
	signalled := time.Now()
	upgrade(t, old)
	pid := waitTakeover(t, u, old, 20*time.Second)
	took := time.Since(signalled)
	before := tr.served.Load()
	waitFor(t, 10*time.Second, "new sessions through the new process", func() bool { return tr.served.Load() > before+50 })
	tr.Stop()

	for i, e := range echoers {
		if err := e.finish(); err != nil {
			t.Errorf("echo session %d: %v", i, err)
		}
	}
	var bulkBytes int64
	for i, b := range streams {
		if err := b.finish(); err != nil {
			t.Errorf("bulk stream %d: %v", i, err)
		}
		bulkBytes += b.got.Load()
	}
	echoAll(t, idle, "after")
	if n := tr.failed.Load(); n != 0 {
		t.Errorf("%d new connections failed during the upgrade", n)
	}

	m := metrics(t, p) // the admin socket is the new process's now
	if buildVersion(m) != nextVersion {
		t.Errorf("admin answers for a process that is not the new build: %v", buildInfo(m))
	}
	if got := m[`tether_handoff_sessions_total{side="received"}`]; got < 1020 {
		t.Errorf("new process received %v sessions, want at least 1,020", got)
	}
	if got := m[`tether_handoff_listeners_total{side="received"}`]; got != 2 {
		t.Errorf("new process received %v listeners, want 2", got)
	}
	if p.logCount("upgrade complete: this process serves everything", "") != 1 || p.logCount("upgrade: the new process took over; this one exits", "") != 1 {
		t.Errorf("missing upgrade start/end log lines:\n%s", p.logs())
	}
	var slowest time.Duration
	for _, e := range echoers {
		slowest = max(slowest, e.slowest)
	}
	t.Logf("upgrade %d → %d: pid file and old exit after %v; 1,000 idle + 16 echoing + 4 bulk (%d MiB intact) sessions kept, %d new sessions meanwhile without an error; slowest echo %v",
		old, pid, took.Round(time.Millisecond), bulkBytes>>20, tr.served.Load(), slowest.Round(time.Millisecond))
}

// buildVersion is the version label of the one tether_build_info series
// at value 1 ("" if there is not exactly one).
func buildVersion(m map[string]float64) string {
	found := ""
	for k, v := range m {
		if !strings.HasPrefix(k, "tether_build_info{") || v != 1 {
			continue
		}
		i := strings.Index(k, `,version="`)
		if i < 0 || found != "" {
			return ""
		}
		rest := k[i+len(`,version="`):]
		found = rest[:strings.IndexByte(rest, '"')]
	}
	return found
}

func buildInfo(m map[string]float64) []string {
	var out []string
	for k := range m {
		if strings.HasPrefix(k, "tether_build_info") {
			out = append(out, k)
		}
	}
	return out
}

// TestUpgradeWithRedisAndGossip: with Redis bindings and gossip on, the new
// process routes 300 keys exactly as the old one did and rejoins gossip
// under the same node name.
func TestUpgradeWithRedisAndGossip(t *testing.T) {
	redis := testenv.StartRedis(t)
	seed := gossipGateway(t, 1, "")
	gossipGateway(t, 2, seed.gossip)
	gossipGateway(t, 3, seed.gossip)
	other := gossipProxy(t, seed.gossip)
	u := newUpgradable(t)
	// A fixed gossip port, as in production: the new process binds it
	// once the old one let go.
	gossipAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t, "127.0.0.1"))
	p := u.start("--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--gossip-bind", gossipAddr,
		"--join", seed.gossip, "--redis", "redis://"+redis.Addr, "--node-name", "proxy-under-upgrade")
	waitRing(t, 10*time.Second, 3, 0, p, other)
	waitFor(t, 10*time.Second, "both proxies to see 5 members", func() bool {
		return metrics(t, p)["tether_cluster_members"] == 5 && metrics(t, other)["tether_cluster_members"] == 5
	})
	keys := keyList("upg", 300)
	before := ownersVia(t, []*proc{p}, keys) // binds every key in Redis
	routesBefore := map[string]string{}
	for _, k := range keys {
		routesBefore[k] = strings.Join(routeOf(t, p, k), " ")
	}
	held := holdSessions(t, p.addr, "held", 50)

	old := u.pid()
	u.install(filepath.Join(binDir, "proxy-next"))
	upgrade(t, old)
	waitTakeover(t, u, old, 20*time.Second)
	waitFor(t, 15*time.Second, "the new process to rejoin gossip", func() bool {
		return metrics(t, p)["tether_cluster_members"] == 5 && metrics(t, other)["tether_cluster_members"] == 5
	})
	after := ownersVia(t, []*proc{p}, keys)
	for _, k := range keys {
		if before[k] != after[k] {
			t.Errorf("key %s: gateway %s before the upgrade, %s after", k, before[k], after[k])
		}
		if r := strings.Join(routeOf(t, p, k), " "); r != routesBefore[k] {
			t.Errorf("key %s: /route %q before, %q after", k, routesBefore[k], r)
		}
	}
	echoAll(t, held, "after")
	nodes := gossipNodes(p)
	if len(nodes) < 2 || nodes[0] != "proxy-under-upgrade" || nodes[len(nodes)-1] != "proxy-under-upgrade" {
		t.Errorf("gossip node names of the old and new process: %v, want proxy-under-upgrade for both", nodes)
	}
	if n := len(p.errorLines()); n != 0 {
		t.Errorf("error lines during the upgrade:\n%s", strings.Join(p.errorLines(), "\n"))
	}
	t.Logf("300 keys route the same before and after (Redis bindings and ring); the new process rejoined gossip as %q; both proxies see 5 members", nodes[len(nodes)-1])
}

// gossipNodes returns the node names of the "gossip listening" lines, in
// order (the old process's first).
func gossipNodes(p *proc) []string {
	var out []string
	for _, l := range p.allLines() {
		var e struct{ Msg, Node string }
		if json.Unmarshal([]byte(l), &e) == nil && e.Msg == "gossip listening" {
			out = append(out, e.Node)
		}
	}
	return out
}

// upgradeFixture is a proxy from its own binary over one gateway, with
// idle sessions and an echoing one.
type upgradeFixture struct {
	u    *upgradable
	p    *proc
	idle []net.Conn
	echo *echoer
	pid  int
}

func newUpgradeFixture(t *testing.T, extra ...string) *upgradeFixture {
	gw := gatewayStub(t, 1, 0)
	u := newUpgradable(t)
	p := u.start(append([]string{"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--gateway", "gw-1=" + gw.addr}, extra...)...)
	f := &upgradeFixture{u: u, p: p, idle: holdSessions(t, p.addr, "idle", 100), echo: startEchoer(t, p.addr, "echo"), pid: u.pid()}
	waitFor(t, 5*time.Second, "echoes", func() bool { return f.echo.echoes.Load() > 5 })
	return f
}

// keptServing checks that the old process still serves everything.
func (f *upgradeFixture) keptServing(t *testing.T) {
	t.Helper()
	if pid := f.u.pid(); pid != f.pid || !alive(f.pid) {
		t.Fatalf("pid file %d (old %d, alive %v): the old process should still serve", pid, f.pid, alive(f.pid))
	}
	echoAll(t, f.idle, "kept")
	if err := f.echo.finish(); err != nil {
		t.Fatalf("echo session: %v", err)
	}
	if _, err := session(f.p.addr, "127.0.0.2", "fresh"); err != nil {
		t.Fatalf("new session after the failed upgrade: %v", err)
	}
}

// waitLog waits for a log line with msg.
func waitLog(t *testing.T, p *proc, msg string, within time.Duration) {
	t.Helper()
	waitFor(t, within, "log line "+strconv.Quote(msg), func() bool { return p.logCount(msg, "") > 0 })
}

// TestUpgradeNewBinaryExits: a new binary that exits at start costs
// nothing: the old process says why and keeps every session.
func TestUpgradeNewBinaryExits(t *testing.T) {
	f := newUpgradeFixture(t)
	f.u.installBytes([]byte("#!/bin/sh\necho 'this build is broken' >&2\nexit 1\n"))
	upgrade(t, f.pid)
	waitLog(t, f.p, "upgrade failed; this process keeps serving", 10*time.Second)
	if !f.p.alerted("exited before it was ready") {
		t.Errorf("the failure does not say the new process exited:\n%s", f.p.logs())
	}
	f.keptServing(t)
	if got := metrics(t, f.p)[`tether_upgrade_failures_total{reason="exited"}`]; got != 1 {
		t.Errorf("failures{exited} = %v, want 1", got)
	}
}

// TestUpgradeNewBinaryHangs: a new process that never becomes ready is
// killed at --upgrade-timeout; a second SIGUSR2 meanwhile is ignored and
// logged; the old process keeps every session, and a later SIGUSR2 with a
// good binary upgrades.
func TestUpgradeNewBinaryHangs(t *testing.T) {
	f := newUpgradeFixture(t, "--upgrade-timeout", "2s")
	f.u.installBytes([]byte("#!/bin/sh\nexec sleep 600\n"))
	upgrade(t, f.pid)
	waitLog(t, f.p, "upgrade: started the new process", 5*time.Second)
	hung := f.p.lastInt("upgrade: started the new process", "pid")
	upgrade(t, f.pid) // twice
	waitLog(t, f.p, "SIGUSR2 ignored: an upgrade is already under way", 5*time.Second)
	waitLog(t, f.p, "upgrade failed; this process keeps serving", 10*time.Second)
	if !f.p.alerted("did not become ready in time") {
		t.Errorf("the failure does not name the timeout:\n%s", f.p.logs())
	}
	if hung == 0 || alive(hung) {
		t.Errorf("the hung new process %d was not killed", hung)
	}
	if n := f.p.logCount("upgrade: started the new process", ""); n != 1 {
		t.Errorf("%d new processes started for two SIGUSR2, want 1", n)
	}
	f.keptServing(t)
	if got := metrics(t, f.p)[`tether_upgrade_failures_total{reason="not_ready"}`]; got != 1 {
		t.Errorf("failures{not_ready} = %v, want 1", got)
	}

	// The old process can still upgrade.
	f.u.install(filepath.Join(binDir, "proxy-next"))
	upgrade(t, f.pid)
	waitTakeover(t, f.u, f.pid, 20*time.Second)
	echoAll(t, f.idle, "upgraded")
}

// TestUpgradeRefusedWithNoPark: --no-park sessions cannot move; SIGUSR2
// says so and changes nothing.
func TestUpgradeRefusedWithNoPark(t *testing.T) {
	f := newUpgradeFixture(t, "--no-park")
	upgrade(t, f.pid)
	waitLog(t, f.p, "SIGUSR2 refused: with --no-park sessions live in goroutines and Go's splice pipes, which cannot move to another process; restart instead, or run without --no-park", 5*time.Second)
	f.keptServing(t)
	if got := metrics(t, f.p)[`tether_upgrade_failures_total{reason="unsupported"}`]; got != 1 {
		t.Errorf("failures{unsupported} = %v, want 1", got)
	}
}

// lastInt returns an integer field of the last log line with msg.
func (p *proc) lastInt(msg, field string) int {
	lines := p.allLines()
	for i := len(lines) - 1; i >= 0; i-- {
		var e map[string]any
		if json.Unmarshal([]byte(lines[i]), &e) == nil && e["msg"] == msg {
			if v, ok := e[field].(float64); ok {
				return int(v)
			}
		}
	}
	return 0
}

// TestSIGTERMPacedDrain: SIGTERM with 500 open sessions and
// --drain-timeout 5s closes them spread over the 5 s, at most a fifth in
// any second (the proxy's own log timestamps, from its shutdown line).
func TestSIGTERMPacedDrain(t *testing.T) {
	const sessions, drain = 500, 5 * time.Second
	gw := gatewayStub(t, 1, 0)
	p := proxyFor(t, []*proc{gw}, "--drain-timeout", drain.String())
	conns := holdSessions(t, p.addr, "paced", sessions)
	var wg sync.WaitGroup
	var closed atomic.Int64
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = c.SetReadDeadline(time.Now().Add(drain + 10*time.Second))
			if _, err := c.Read(make([]byte, 1)); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
				closed.Add(1)
			}
		}()
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := p.exitCode(drain + 10*time.Second); code != 0 {
		t.Fatalf("exit code %d", code)
	}
	wg.Wait()
	if n := closed.Load(); n != sessions {
		t.Fatalf("%d of %d clients saw their session closed", n, sessions)
	}
	origin, ends := drainTimes(t, p)
	if len(ends) != sessions {
		t.Fatalf("%d drain_timeout session ends logged, want %d", len(ends), sessions)
	}
	perSecond := make([]int, int(drain/time.Second)+1)
	for _, at := range ends {
		sec := int(at.Sub(origin) / time.Second)
		if sec < 0 || sec >= len(perSecond) {
			t.Fatalf("a session closed %v after the shutdown began", at.Sub(origin))
		}
		perSecond[sec]++
	}
	for sec, n := range perSecond {
		if n > sessions/5 {
			t.Errorf("second %d closed %d sessions (%d%%), more than 20%%: %v", sec, n, 100*n/sessions, perSecond)
		}
	}
	if perSecond[0] == 0 || perSecond[len(perSecond)-2] == 0 {
		t.Errorf("closes not spread over the drain: %v per second", perSecond)
	}
	t.Logf("SIGTERM with %d sessions, --drain-timeout %v: closed per second %v; exit 0", sessions, drain, perSecond)
}

// drainTimes returns when the proxy began shutting down and when each
// session it closed for the drain ended, from its log timestamps.
func drainTimes(t *testing.T, p *proc) (time.Time, []time.Time) {
	t.Helper()
	var origin time.Time
	var ends []time.Time
	for _, l := range p.allLines() {
		var e struct{ Msg, Reason, TS string }
		if json.Unmarshal([]byte(l), &e) != nil {
			continue
		}
		ts, err := time.Parse("2006-01-02T15:04:05.000Z0700", e.TS)
		if err != nil {
			continue
		}
		switch {
		case strings.HasPrefix(e.Msg, "shutting down"):
			origin = ts
		case e.Msg == "session end" && e.Reason == "drain_timeout":
			ends = append(ends, ts)
		}
	}
	if origin.IsZero() {
		t.Fatal("no shutdown log line")
	}
	return origin, ends
}

// TestUpgradeAsPID1UnderSupervise: in a PID namespace of its own (as in a
// container), `proxy --supervise` is PID 1; SIGUSR2 sent to it upgrades
// the proxy below it, sessions survive, and SIGTERM then stops everything
// with exit 0.
func TestUpgradeAsPID1UnderSupervise(t *testing.T) {
	unshare := testenv.Need(t, "unshare")
	gw := gatewayStub(t, 1, 0)
	u := newUpgradable(t)
	p := startCmd(t, "proxy", unshare, "--pid", "--fork", "--mount-proc", "--kill-child", u.exe, "--supervise",
		"--pid-file", u.pidFile, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--gateway", "gw-1="+gw.addr, "--drain-timeout", "1s")
	supervisor := childOf(t, p.cmd.Process.Pid)
	if p.logCount("supervise: started the proxy", "") != 1 || p.lastInt("supervise: started the proxy", "supervisor_pid") != 1 {
		t.Fatalf("the supervisor is not PID 1 of its namespace:\n%s", p.logs())
	}
	held := holdSessions(t, p.addr, "pid1", 50)
	u.install(filepath.Join(binDir, "proxy-next"))
	upgrade(t, supervisor) // forwarded to the proxy
	waitLog(t, p, "supervise: the proxy was upgraded", 20*time.Second)
	echoAll(t, held, "after")
	if m := metrics(t, p); buildVersion(m) != nextVersion {
		t.Errorf("the new build does not answer: %v", buildInfo(m))
	}
	if err := syscall.Kill(supervisor, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := p.exitCode(15 * time.Second); code != 0 {
		t.Fatalf("exit code %d, want 0:\n%s", code, p.logs())
	}
	if n := p.logCount("supervise: the proxy exited", ""); n != 1 {
		t.Fatalf("supervisor did not report the proxy's exit:\n%s", p.logs())
	}
}

// childOf returns the only child process of pid.
func childOf(t *testing.T, pid int) int {
	t.Helper()
	var child int
	waitFor(t, 5*time.Second, "the child of "+strconv.Itoa(pid), func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
		f := strings.Fields(string(b))
		if err != nil || len(f) != 1 {
			return false
		}
		child, err = strconv.Atoi(f[0])
		return err == nil
	})
	return child
}

// halfHello opens a connection that has sent part of a hello, which keeps
// the old process's handoff waiting for it; finish sends the rest.
func halfHello(t *testing.T, via, key string) (c net.Conn, finish func()) {
	t.Helper()
	c, err := net.Dial("tcp", via)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(60 * time.Second))
	h, _ := proto.AppendHello(nil, []byte(key), nil)
	if _, err := c.Write(h[:3]); err != nil {
		t.Fatal(err)
	}
	return c, func() {
		if _, err := c.Write(h[3:]); err != nil {
			t.Fatal(err)
		}
	}
}

// TestUpgradeNewProcessDiesMidHandoff: the new process is killed while the
// old one still waits for a connection's handshake: the old process
// notices at once, accepts again, names itself in the pid file, serves
// that connection, and counts the failure as lost.
func TestUpgradeNewProcessDiesMidHandoff(t *testing.T) {
	f := newUpgradeFixture(t, "--handshake-timeout", "30s")
	c, finish := halfHello(t, f.p.addr, "late")
	f.u.install(filepath.Join(binDir, "proxy-next"))
	upgrade(t, f.pid)
	var next int
	waitFor(t, 10*time.Second, "the new process to serve", func() bool {
		p, err := readPid(f.u.pidFile)
		next = p
		return err == nil && p != f.pid
	})
	if err := syscall.Kill(next, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitLog(t, f.p, "upgrade failed; this process keeps serving", 10*time.Second)
	waitFor(t, 5*time.Second, "the pid file to name the old process again", func() bool { return f.u.pid() == f.pid })
	if !alive(f.pid) {
		t.Fatal("the old process exited")
	}
	finish()
	if _, _, err := stub.ReadReply(c); err != nil {
		t.Fatalf("the connection the old process kept: %v", err)
	}
	if _, err := session(f.p.addr, "127.0.0.2", "after-lost"); err != nil {
		t.Fatalf("new connection after the lost upgrade: %v", err)
	}
	if got := metrics(t, f.p)[`tether_upgrade_failures_total{reason="lost"}`]; got != 1 {
		t.Errorf("failures{lost} = %v, want 1", got)
	}
}

// TestUpgradeStalledNewProcess: a new process that stops answering in the
// middle of the handoff is killed before the old one resumes the batch it
// did not confirm, so no session is served by two processes; that session
// then works through the old one.
func TestUpgradeStalledNewProcess(t *testing.T) {
	f := newUpgradeFixture(t, "--handshake-timeout", "30s", "--upgrade-timeout", "2s")
	c, finish := halfHello(t, f.p.addr, "late")
	f.u.install(filepath.Join(binDir, "proxy-next"))
	upgrade(t, f.pid)
	var next int
	waitFor(t, 10*time.Second, "the new process to take the first sessions", func() bool {
		p, err := readPid(f.u.pidFile)
		if err != nil || p == f.pid {
			return false
		}
		next = p
		m, err := tryMetrics(f.p)
		return err == nil && m[`tether_handoff_sessions_total{side="received"}`] >= 101
	})
	if err := syscall.Kill(next, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	finish() // the old process makes it a session and sends it to a stopped process
	waitLog(t, f.p, "upgrade failed; this process keeps serving", 15*time.Second)
	if alive(next) {
		t.Fatalf("the stalled new process %d is still alive", next)
	}
	if _, _, err := stub.ReadReply(c); err != nil {
		t.Fatalf("the unconfirmed session after resuming in the old process: %v", err)
	}
	c.Write([]byte("still one owner"))
	got := make([]byte, len("still one owner"))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "still one owner" {
		t.Fatalf("echo %q, %v", got, err)
	}
	if f.u.pid() != f.pid {
		t.Fatalf("pid file names %d, want the old process %d", f.u.pid(), f.pid)
	}
}

// TestUpgradeThroughSymlink: a proxy started through a "current" symlink
// upgrades to whatever the link points at when SIGUSR2 comes.
func TestUpgradeThroughSymlink(t *testing.T) {
	gw := gatewayStub(t, 1, 0)
	dir := t.TempDir()
	for _, r := range []struct{ name, from string }{{"v1", "proxy"}, {"v2", "proxy-next"}} {
		if err := os.MkdirAll(filepath.Join(dir, r.name), 0o755); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(binDir, r.from))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, r.name, "proxy"), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	current := filepath.Join(dir, "current")
	if err := os.Symlink("v1", current); err != nil {
		t.Fatal(err)
	}
	u := &upgradable{t: t, exe: filepath.Join(current, "proxy"), pidFile: filepath.Join(dir, "pid")}
	p := u.start("--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--gateway", "gw-1="+gw.addr)
	old := u.pid()
	if err := os.Symlink("v2", current+".new"); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(current+".new", current); err != nil {
		t.Fatal(err)
	}
	upgrade(t, old)
	waitTakeover(t, u, old, 20*time.Second)
	if m := metrics(t, p); buildVersion(m) != nextVersion {
		t.Fatalf("after switching the symlink, the build answering is %v", buildInfo(m))
	}
}

// TestUpgradeRefusesDroppedAdmin: a configuration that no longer has the
// admin socket the old process serves is refused; the old one serves on.
func TestUpgradeRefusesDroppedAdmin(t *testing.T) {
	gw := gatewayStub(t, 1, 0)
	u := newUpgradable(t)
	cfg := filepath.Join(t.TempDir(), "proxy.yaml")
	writeConfig(t, cfg, "listen: 127.0.0.1:0", "admin: 127.0.0.1:0", "gateway: [gw-1="+gw.addr+"]")
	p := u.start("--config", cfg)
	// The harness learns the admin address from the command line only.
	waitLog(t, p, "admin listening", 5*time.Second)
	for _, l := range p.allLines() {
		var e struct{ Msg, Addr string }
		if json.Unmarshal([]byte(l), &e) == nil && e.Msg == "admin listening" {
			p.mu.Lock()
			p.admin = e.Addr
			p.mu.Unlock()
		}
	}
	writeConfig(t, cfg, "listen: 127.0.0.1:0", "gateway: [gw-1="+gw.addr+"]")
	upgrade(t, u.pid())
	waitLog(t, p, "upgrade failed; this process keeps serving", 10*time.Second)
	if !p.alerted("no longer serves admin") {
		t.Errorf("the refusal does not name the admin socket:\n%s", p.logs())
	}
	if got := metrics(t, p)[`tether_upgrade_failures_total{reason="refused"}`]; got != 1 {
		t.Errorf("failures{refused} = %v, want 1", got)
	}
}
