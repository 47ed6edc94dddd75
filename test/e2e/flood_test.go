//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
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

// floodEnv makes the test binary a flood helper: it holds as many sessions
// as it can through the proxy named by the variable.
const floodEnv = "TETHER_E2E_FLOOD"

// floodStats is what a flood helper reports on stdout.
type floodStats struct {
	Held, Failed, Silent int
}

// floodMain opens TETHER_E2E_FLOOD_SLOTS connections to the proxy from
// TETHER_E2E_FLOOD_SRC for TETHER_E2E_FLOOD_FOR: three in four send a hello
// and are held once the gateway answers (retried until then), one in four
// sends nothing and is reopened whenever the proxy closes it at its
// handshake timeout, so descriptors keep churning at the proxy's limit.
// It reports on stdout, then holds until SIGTERM. Bounded in time and
// count.
func floodMain() int {
	target, src := os.Getenv(floodEnv), os.Getenv("TETHER_E2E_FLOOD_SRC")
	slots, _ := strconv.Atoi(os.Getenv("TETHER_E2E_FLOOD_SLOTS"))
	dur, _ := time.ParseDuration(os.Getenv("TETHER_E2E_FLOOD_FOR"))
	deadline := time.Now().Add(dur)
	d := net.Dialer{Timeout: 2 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	var held, failed, silent atomic.Int64
	var mu sync.Mutex
	var keep []net.Conn
	var wg sync.WaitGroup
	for i := range slots {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				c, err := d.Dial("tcp", target)
				if err != nil {
					failed.Add(1)
					time.Sleep(20 * time.Millisecond)
					continue
				}
				_ = c.SetDeadline(deadline)
				if i%4 == 0 { // silent: held by the proxy until its handshake timeout
					silent.Add(1)
					_, _ = io.Copy(io.Discard, c)
					c.Close()
					continue
				}
				h, _ := proto.AppendHello(nil, []byte(fmt.Sprintf("flood-%d-%d", os.Getpid(), i)), nil)
				if _, err := c.Write(h); err == nil {
					if _, _, err = stub.ReadReply(c); err == nil {
						_ = c.SetDeadline(time.Time{})
						held.Add(1)
						mu.Lock()
						keep = append(keep, c)
						mu.Unlock()
						return
					}
				}
				failed.Add(1)
				c.Close()
				time.Sleep(20 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	_ = json.NewEncoder(os.Stdout).Encode(floodStats{Held: int(held.Load()), Failed: int(failed.Load()), Silent: int(silent.Load())})
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	<-term
	mu.Lock()
	for _, c := range keep {
		c.Close()
	}
	mu.Unlock()
	return 0
}

var (
	noRaceOnce sync.Once
	noRaceErr  error
)

// noRace builds proxy and gateway-stub without the race detector under
// binDir/norace: a race-built process may not run more than 8,128
// goroutines, and a flood to the descriptor limit runs more.
func noRace(t *testing.T) {
	t.Helper()
	noRaceOnce.Do(func() {
		for _, name := range []string{"proxy", "gateway-stub"} {
			out, err := exec.Command("go", "build", "-o", filepath.Join(binDir, "norace", name), "../../cmd/"+name).CombinedOutput()
			if err != nil {
				noRaceErr = fmt.Errorf("building %s: %v\n%s", name, err, out)
				return
			}
		}
	})
	if noRaceErr != nil {
		t.Fatal(noRaceErr)
	}
}

// fdLimit is the process's open-file limit (what the proxy gets too).
func fdLimit(t *testing.T) uint64 {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	return rl.Max
}

// TestFDFlood: several processes flood the proxy to its open-file limit
// while good clients keep connecting. The proxy's own EMFILE is counted as
// local_resources and logged once per state change, never blamed on a
// gateway (no dial failure, no cooldown); once the flood ends every client
// is served again.
func TestFDFlood(t *testing.T) {
	noRace(t)
	limit := fdLimit(t)
	if limit > 65536 {
		t.Skipf("open-file limit %d: flooding it would take too long here", limit)
	}
	gws := make([]*proc, 3)
	for i := range gws {
		gws[i] = start(t, "norace/gateway-stub", "--id", fmt.Sprintf("gw-%d", i+1), "--listen", fmt.Sprintf("127.0.1.%d:0", i+1),
			"--proxy-protocol", "require", "--echo-buffer", "512")
	}
	args := []string{"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--gateway-cooldown", "60s", "--handshake-timeout", "1s"}
	for i, g := range gws {
		args = append(args, "--gateway", fmt.Sprintf("gw-%d=%s", i+1, g.addr))
	}
	p := start(t, "norace/proxy", args...)

	// Enough slots that the proxy (two descriptors a session) runs out.
	flooders := 4
	slots := int(limit)*3/(4*flooders) + 500
	var helpers []*procrun.Proc
	stats := make(chan string, flooders)
	for i := range flooders {
		h, err := procrun.Start(os.Args[0], []string{"-test.run", "^$"}, procrun.Options{
			Env: []string{floodEnv + "=" + p.addr, fmt.Sprintf("TETHER_E2E_FLOOD_SRC=127.0.0.%d", 10+i),
				fmt.Sprintf("TETHER_E2E_FLOOD_SLOTS=%d", slots), "TETHER_E2E_FLOOD_FOR=8s", "GORACE=atexit_sleep_ms=0"},
			OnLine: func(l string) {
				if strings.HasPrefix(l, "{") {
					stats <- l
				} else {
					t.Log("flood helper: " + l)
				}
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		helpers = append(helpers, h)
	}
	release := func() {
		for _, h := range helpers {
			h.Stop(10 * time.Second)
		}
	}
	released := false
	defer func() {
		if !released {
			release()
		}
	}()

	// Good clients alongside the flood.
	var served, failed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := session(p.addr, "127.0.0.2", fmt.Sprintf("good-%d-%d", w, i)); err != nil {
					failed.Add(1)
				} else {
					served.Add(1)
				}
			}
		}()
	}
	var total floodStats
	for range helpers {
		var line string
		select {
		case line = <-stats:
		case <-time.After(60 * time.Second):
			t.Fatal("a flood helper did not report")
		}
		var st floodStats
		if err := json.Unmarshal([]byte(line), &st); err != nil {
			t.Fatal(err)
		}
		total.Held, total.Failed, total.Silent = total.Held+st.Held, total.Failed+st.Failed, total.Silent+st.Silent
	}
	close(stop)
	wg.Wait()
	duringServed, duringFailed := served.Load(), failed.Load()
	release()
	released = true

	waitFor(t, 30*time.Second, "the flood's sessions to close", func() bool {
		m, err := tryMetrics(p)
		return err == nil && m["tether_connections_active"] < 10
	})
	for i := range 100 {
		if _, err := session(p.addr, "127.0.0.3", fmt.Sprintf("after-%d", i)); err != nil {
			t.Fatalf("after the flood: %v", err)
		}
	}
	m := metrics(t, p)
	local := m[`tether_route_failures_total{reason="local_resources"}`]
	dialFailures := 0.0
	for k, v := range m {
		if strings.HasPrefix(k, "tether_dial_failures_total") {
			dialFailures += v
		}
	}
	t.Logf("fd limit %d; flood held %d sessions (%d failed attempts, %d silent connections); good clients during the flood: %d served, %d failed; local_resources %v, accept errors %v, dial failures %v",
		limit, total.Held, total.Failed, total.Silent, duringServed, duringFailed, local, m["tether_accept_errors_total"], dialFailures)
	if total.Held < int(limit)/3 {
		t.Fatalf("the flood held only %d sessions: it did not reach the limit", total.Held)
	}
	if local == 0 {
		t.Fatal("no failure counted as local_resources")
	}
	if dialFailures != 0 || m["tether_gateways_unreachable"] != 0 {
		t.Fatalf("gateways blamed for the proxy's own exhaustion: %v dial failures, %v unreachable", dialFailures, m["tether_gateways_unreachable"])
	}
	for id, r := range gatewaysOf(t, p, "") {
		if !r.Live {
			t.Fatalf("%s in cooldown after the flood", id)
		}
	}
	const exhausted = "out of local resources (file descriptors or ports): new clients are closed until they free up; gateways are not blamed"
	if n := p.logCount(exhausted, ""); n < 1 || n > 10 || float64(n) > local {
		t.Fatalf("%d exhaustion warnings for %v failures: want one per state change", n, local)
	}
	// The state ends with the first connection served a quiet second
	// after the last failure. A loaded machine may see the state end and
	// begin again while the flood's sockets close: one recovery line per
	// warning, never more.
	const recovered = "local resources available again"
	i := 0
	waitFor(t, 10*time.Second, "the recovery log line", func() bool {
		i++
		if _, err := session(p.addr, "127.0.0.3", fmt.Sprintf("later-%d", i)); err != nil {
			t.Fatalf("after the flood: %v", err)
		}
		return p.logCount(recovered, "") >= 1 && p.logCount(recovered, "") == p.logCount(exhausted, "")
	})
}

// tryMetrics is metrics without failing the test (the admin server may be
// out of descriptors too).
func tryMetrics(p *proc) (map[string]float64, error) {
	c, err := net.DialTimeout("tcp", p.admin, time.Second)
	if err != nil {
		return nil, err
	}
	c.Close()
	return metrics(p.t, p), nil
}
