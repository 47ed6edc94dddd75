//go:build e2e

// Package e2e runs the real tether binaries on loopback addresses: gateway
// stubs on 127.0.1.x (so a leaked gateway address is easy to spot), proxies
// on 127.0.0.1, clients from 127.0.0.2 and up.
package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tether-proxy/tether/internal/procrun"
	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/pkg/proto"
)

// binDir holds the binaries built once for the whole run (with -race, so the
// real processes are race-checked too).
var binDir string

func TestMain(m *testing.M) {
	if os.Getenv(floodEnv) != "" {
		os.Exit(floodMain()) // a helper process of TestFDFlood
	}
	if os.Getenv(probeEnv) != "" {
		os.Exit(probeMain()) // a helper process of the storm tests
	}
	dir, err := os.MkdirTemp("", "tether-e2e-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	for _, name := range []string{"proxy", "gateway-stub", "tether-agent", "tether-client"} {
		cmd := exec.Command("go", "build", "-race", "-o", filepath.Join(dir, name), "../../cmd/"+name)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintf(os.Stderr, "building %s: %v\n", name, err)
			os.Exit(1)
		}
	}
	// A second proxy build with another version: the binary an upgrade
	// test swaps in, so the new process is provably the new file.
	cmd := exec.Command("go", "build", "-race", "-ldflags", "-X github.com/tether-proxy/tether/internal/version.Version="+nextVersion, "-o", filepath.Join(dir, "proxy-next"), "../../cmd/proxy")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "building proxy-next: %v\n", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// proc is one running binary. It parses the JSON log lines on stderr and
// remembers the addresses the process announced.
type proc struct {
	t      *testing.T
	name   string
	cmd    *exec.Cmd
	addr   string // from the "listening" line
	admin  string // from the "admin listening" line
	gossip string // from the "gossip listening" line
	done   <-chan struct{}

	wantListen, wantAdmin, wantGossip bool // what ready waits for

	mu        sync.Mutex
	signalled bool           // ready is closed
	tail      []string       // last log lines, for failure reports
	all       []string       // every line (up to maxLines), for tests that read them
	warns     []string       // every warn and error line
	seen      map[string]int // "msg|reason" → count of such log lines
	ready     chan struct{}
}

const keepLines = 200

// maxLines bounds proc.all.
const maxLines = 200_000

// start runs a binary and waits until it logs that it listens (and, when
// wantAdmin, that its admin server listens).
func start(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	return startCmd(t, name, filepath.Join(binDir, name), args...)
}

// startCmd is start for any program that logs tether's JSON lines (the
// Python example gateway does); name labels it. tether-agent is ready once
// it gossips (it listens for no clients).
func startCmd(t *testing.T, name, path string, args ...string) *proc {
	t.Helper()
	p := &proc{t: t, name: name + " " + strings.Join(args, " "), ready: make(chan struct{}), seen: map[string]int{}}
	p.wantListen = !strings.HasSuffix(name, "tether-agent")
	for _, a := range args {
		p.wantAdmin = p.wantAdmin || a == "--admin"
		p.wantGossip = p.wantGossip || a == "--gossip-bind"
	}
	// Race-built binaries otherwise sleep 1s at exit.
	pr, err := procrun.Start(path, args, procrun.Options{Env: []string{"GORACE=atexit_sleep_ms=0 halt_on_error=0"}, OnLine: p.line})
	if err != nil {
		t.Fatal(err)
	}
	p.cmd, p.done = pr.Cmd, pr.Done()
	t.Cleanup(p.stop)
	select {
	case <-p.ready:
	case <-p.done:
		t.Fatalf("%s exited before listening:\n%s", p.name, p.logs())
	case <-time.After(30 * time.Second):
		t.Fatalf("%s did not report listening within 30s:\n%s", p.name, p.logs())
	}
	return p
}

// line takes one line of the process's output: JSON log lines are counted
// and their announced addresses kept; ready closes once every address the
// process was asked for is known.
func (p *proc) line(line string) {
	var entry struct {
		Level  string `json:"level"`
		Msg    string `json:"msg"`
		Addr   string `json:"addr"`
		Reason string `json:"reason"`
	}
	_ = json.Unmarshal([]byte(line), &entry)
	p.mu.Lock()
	p.seen[entry.Msg+"|"+entry.Reason]++
	if entry.Level == "warn" || entry.Level == "error" {
		p.warns = append(p.warns, line)
	}
	p.tail = append(p.tail, line)
	if len(p.all) < maxLines {
		p.all = append(p.all, line)
	}
	if len(p.tail) > keepLines {
		p.tail = p.tail[len(p.tail)-keepLines:]
	}
	// Addresses are fixed once ready: a process started by an upgrade
	// announces the same ones again on the same output.
	switch msg := entry.Msg; {
	case p.signalled:
	case msg == "listening":
		p.addr = entry.Addr
	case msg == "admin listening":
		p.admin = entry.Addr
	case msg == "gossip listening":
		p.gossip = entry.Addr
	}
	if !p.signalled && (p.addr != "" || !p.wantListen) && (!p.wantAdmin || p.admin != "") && (!p.wantGossip || p.gossip != "") {
		p.signalled = true
		close(p.ready)
	}
	p.mu.Unlock()
	if strings.Contains(line, "WARNING: DATA RACE") {
		p.t.Errorf("data race in %s", p.name)
	}
}

// allLines returns every line logged so far.
func (p *proc) allLines() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.all...)
}

func (p *proc) logs() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.tail, "\n")
}

// alerted reports whether a warn or error line contains s.
func (p *proc) alerted(s string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.warns {
		if strings.Contains(l, s) {
			return true
		}
	}
	return false
}

// errorLines returns the error-level lines logged so far.
func (p *proc) errorLines() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, l := range p.warns {
		if strings.Contains(l, `"level":"error"`) {
			out = append(out, l)
		}
	}
	return out
}

// logCount counts log lines with this message and reason field.
func (p *proc) logCount(msg, reason string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.seen[msg+"|"+reason]
}

// stop sends SIGTERM and waits; SIGKILL after 15s. Safe to call twice.
func (p *proc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		p.t.Errorf("%s ignored SIGTERM for 15s; killing", p.name)
		p.kill()
	}
	if p.t.Failed() {
		p.t.Logf("last log lines of %s:\n%s", p.name, p.logs())
	}
}

// kill is kill -9.
func (p *proc) kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

// exitCode waits for the process and returns its exit status.
func (p *proc) exitCode(timeout time.Duration) int {
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(timeout):
		p.t.Fatalf("%s still running after %v", p.name, timeout)
		return -1
	}
}

// gatewayStub starts a stub with PROXY headers required on 127.0.1.<n>.
func gatewayStub(t *testing.T, n int, port int) *proc {
	t.Helper()
	return start(t, "gateway-stub", "--id", fmt.Sprintf("gw-%d", n),
		"--listen", fmt.Sprintf("127.0.1.%d:%d", n, port), "--proxy-protocol", "require")
}

// proxyFor starts a proxy over the given gateways, with an admin server.
func proxyFor(t *testing.T, gws []*proc, extra ...string) *proc {
	t.Helper()
	return proxyAt(t, "127.0.0.1:0", "127.0.0.1:0", gws, extra...)
}

// proxyAt is proxyFor on given listen and admin addresses (to restart a
// proxy where a load balancer expects it).
func proxyAt(t *testing.T, listen, admin string, gws []*proc, extra ...string) *proc {
	t.Helper()
	args := []string{"--listen", listen, "--admin", admin}
	for i, g := range gws {
		args = append(args, "--gateway", fmt.Sprintf("gw-%d=%s", i+1, g.addr))
	}
	return start(t, "proxy", append(args, extra...)...)
}

// result is what one client connection saw.
type result struct {
	reply stub.Reply
	raw   []byte // every byte received
	local *net.TCPAddr
}

// session connects from the source IP through via with key, reads the reply,
// checks that a message echoes, and closes with RST (a lost radio link).
func session(via, from, key string) (result, error) {
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	c, err := d.Dial("tcp", via)
	if err != nil {
		return result{}, err
	}
	tc := c.(*net.TCPConn)
	defer func() { _ = tc.SetLinger(0); tc.Close() }()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	res := result{local: c.LocalAddr().(*net.TCPAddr)}
	msg := []byte("echo:" + key + ":" + c.LocalAddr().String())
	h, err := proto.AppendHello(nil, []byte(key), nil)
	if err != nil {
		return res, err
	}
	if _, err := c.Write(append(h, msg...)); err != nil {
		return res, err
	}
	rep, raw, err := stub.ReadReply(c)
	res.raw = raw
	if err != nil {
		return res, err
	}
	res.reply = rep
	echo := make([]byte, len(msg))
	n, err := io.ReadFull(c, echo)
	res.raw = append(res.raw, echo[:n]...)
	if err != nil {
		return res, fmt.Errorf("echo: %w", err)
	}
	if !bytes.Equal(echo, msg) {
		return res, fmt.Errorf("echo %q, want %q", echo, msg)
	}
	return res, nil
}

// metrics scrapes a proxy's /metrics into name{labels} → value.
func metrics(t *testing.T, p *proc) map[string]float64 {
	t.Helper()
	c := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + p.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err == nil {
			out[line[:i]] = v
		}
	}
	return out
}

// routeOf asks a proxy's admin API for a key's failover order.
func routeOf(t *testing.T, p *proc, key string) []string {
	t.Helper()
	resp, err := http.Get("http://" + p.admin + "/route?key=" + key)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var ans struct {
		Candidates []string `json:"candidates"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&ans); err != nil {
		t.Fatal(err)
	}
	return ans.Candidates
}

// waitFor polls cond until it holds or the timeout passes; state, if
// given, describes what was seen last when it fails.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool, state ...func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			for _, s := range state {
				t.Log(s())
			}
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// parallel runs f(i) for i in [0,n) on w workers.
func parallel(n, w int, f func(i int)) {
	var wg sync.WaitGroup
	next := make(chan int)
	for range w {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				f(i)
			}
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
}

// fdCounts reads /proc/<pid>/fd: sockets and all descriptors. Go's splice
// path keeps a pool of pipes that the garbage collector trims on its own
// schedule, so leaks are judged on sockets exactly and on the total loosely.
func fdCounts(t *testing.T, p *proc) (sockets, total int) {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", p.cmd.Process.Pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		l, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // closed while we looked
		}
		total++
		if strings.HasPrefix(l, "socket:") {
			sockets++
		}
	}
	return sockets, total
}

// httpStatus GETs url and returns the status code.
func httpStatus(t *testing.T, url string) int {
	t.Helper()
	c := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// sigterm is the signal a supervisor sends to stop a process.
var sigterm = syscall.SIGTERM

// isReset reports a connection reset by the peer.
func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

// traffic is a set of clients running sessions in a loop in the background,
// to show that something else happening meanwhile costs them nothing.
type traffic struct {
	stop           chan struct{}
	wg             sync.WaitGroup
	served, failed atomic.Int64
}

// startTraffic runs workers that each loop session(via, src, key(w, i))
// until Stop; every failed session is reported as a test error. No two
// workers may use one key at once: a gateway resets the older of two open
// sessions of a key (newest session wins), as it should for one client.
func startTraffic(t *testing.T, workers int, via, src string, key func(w, i int) string) *traffic {
	tr := &traffic{stop: make(chan struct{})}
	for w := range workers {
		tr.wg.Add(1)
		go func() {
			defer tr.wg.Done()
			for i := 0; ; i++ {
				select {
				case <-tr.stop:
					return
				default:
				}
				if _, err := session(via, src, key(w, i)); err != nil {
					tr.failed.Add(1)
					t.Errorf("background client: %v", err)
				} else {
					tr.served.Add(1)
				}
			}
		}()
	}
	return tr
}

// Stop ends the loops and waits for them.
func (tr *traffic) Stop() {
	close(tr.stop)
	tr.wg.Wait()
}
