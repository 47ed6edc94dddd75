//go:build linux

// Command bench measures tether against HAProxy (tcp mode, forced splice)
// and a direct connection, on loopback, through one load generator, with
// the targets interleaved round by round so drift in the machine's speed
// does not favour any of them. Every figure is reported next to its
// baselines and as a ratio. See docs/BENCHMARKS.md.
//
//	go run ./bench              full run (several minutes), writes bench/results/<date>.md
//	go run ./bench --quick      smoke run (< 60 s): checks every path works, measures nothing
package main

import (
	"cmp"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"
)

type options struct {
	bin, tmp       string
	quick          bool
	rounds         int
	bulkBytes      int64
	rateFor        time.Duration
	latMsgs        int
	idleSizes      []int
	idleLimit      int
	idleHold       time.Duration
	wakeSessions   int
	wakeIdle       time.Duration
	skipIdle, save bool
}

func main() {
	var o options
	fs := flag.NewFlagSet("bench", flag.ExitOnError)
	fs.StringVar(&o.bin, "bin", "bin", "directory with the proxy and gateway-stub binaries (make build)")
	fs.BoolVar(&o.quick, "quick", false, "smoke run: tiny sizes, one round; checks that every target works and reports no figures")
	fs.IntVar(&o.rounds, "rounds", 4, "rounds per metric; each round runs every target, in alternating order (ABBA)")
	var bulkMiB int
	fs.IntVar(&bulkMiB, "bulk-mib", 256, "MiB moved each way per bulk run")
	fs.DurationVar(&o.rateFor, "rate-for", 3*time.Second, "duration of each connection-rate run")
	fs.IntVar(&o.latMsgs, "lat-msgs", 5000, "64-byte round trips per session in the latency run (16 sessions)")
	fs.BoolVar(&o.skipIdle, "skip-idle", false, "skip the idle-session cost runs")
	fs.DurationVar(&o.idleHold, "idle-hold", 60*time.Second, "how long tether holds the largest idle size before every session must echo")
	fs.BoolVar(&o.save, "save", true, "write bench/results/<date>.md")
	load := fs.String("load", "", "only generate load against --addr for profiling: connrate, bulk, latency (16 sessions, --sessions round trips each), idle (--sessions held for --for) or wake (500 sessions idle --for, then one round trip each)")
	addr := fs.String("addr", "", "target HOST:PORT for --load")
	loadFor := fs.Duration("for", 20*time.Second, "how long --load runs")
	loadStreams := fs.Int("streams", 0, "concurrent streams of --load bulk (default 8) or workers of --load connrate (default 32)")
	loadSessions := fs.Int("sessions", 3000, "idle sessions --load idle opens (from 32 goroutines) and holds; round trips per session of --load latency")
	only := fs.String("only", "", "run one section only and print it: handoff, tls or lookup")
	_ = fs.Parse(os.Args[1:])
	sections := map[string]func(*strings.Builder, options) error{"handoff": handoffSection, "tls": tlsSection, "lookup": lookupSection}
	if _, ok := sections[*only]; *only != "" && !ok {
		fatal(fmt.Errorf("--only %q: want handoff, tls or lookup", *only))
	}
	if *load != "" {
		if err := loadOnly(*load, *addr, *loadFor, *loadSessions, *loadStreams); err != nil {
			fatal(err)
		}
		return
	}
	o.bulkBytes = int64(bulkMiB) << 20
	o.wakeSessions, o.wakeIdle = 500, 1500*time.Millisecond
	o.idleSizes = []int{1000, 3000}
	o.idleLimit = 20000
	if o.quick {
		o.rounds, o.bulkBytes, o.rateFor, o.latMsgs, o.idleSizes, o.save = 1, 8<<20, 300*time.Millisecond, 200, []int{100}, false
		o.wakeSessions = 50
	}
	tmp, err := os.MkdirTemp("", "tether-bench")
	if err != nil {
		fatal(err)
	}
	defer os.RemoveAll(tmp)
	o.tmp = tmp
	if *only != "" {
		var b strings.Builder
		if err := sections[*only](&b, o); err != nil {
			fatal(err)
		}
		fmt.Print(b.String())
		return
	}
	report, err := run(o)
	if err != nil {
		fatal(err)
	}
	fmt.Print(report)
	if o.save {
		path := filepath.Join("bench", "results", time.Now().UTC().Format("2006-01-02")+".md")
		if err := os.WriteFile(path, []byte(report), 0o644); err != nil {
			fatal(err)
		}
		fmt.Fprintf(os.Stderr, "bench: wrote %s\n", path)
	}
}

// loadOnly drives one kind of load at addr, for profiling a running proxy
// (proxy --admin ... --pprof; go tool pprof http://ADMIN/debug/pprof/profile).
func loadOnly(kind, addr string, d time.Duration, sessions, streams int) error {
	switch kind {
	case "connrate":
		v, _, lat, err := connRateLat(addr, cmp.Or(streams, 32), d, 1<<40)
		fmt.Printf("%.0f connections/s, p50 %v p99 %v p99.9 %v\n", v, percentile(lat, 0.5), percentile(lat, 0.99), percentile(lat, 0.999))
		return err
	case "latency":
		lat, err := latency(addr, 16, cmp.Or(sessions, 5000))
		fmt.Printf("p50 %v p99 %v p99.9 %v\n", percentile(lat, 0.5), percentile(lat, 0.99), percentile(lat, 0.999))
		return err
	case "wake":
		lat, err := wakeLatency(addr, 500, d)
		fmt.Printf("p50 %v p99 %v\n", percentile(lat, 0.5), percentile(lat, 0.99))
		return err
	case "idle":
		conns, err := openMany(addr, sessions)
		defer func() {
			for _, c := range conns {
				reset(c)
			}
		}()
		if err != nil {
			return err
		}
		fmt.Printf("holding %d idle sessions for %v\n", len(conns), d)
		time.Sleep(d)
		return nil
	case "bulk":
		deadline := time.Now().Add(d)
		for time.Now().Before(deadline) {
			v, err := bulk(addr, cmp.Or(streams, 8), 256<<20, 0)
			if err != nil {
				return err
			}
			fmt.Printf("%.0f MiB/s\n", v/(1<<20))
		}
		return nil
	}
	return fmt.Errorf("--load %q: want connrate, bulk, latency, idle or wake", kind)
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "bench: %v\n", err)
	os.Exit(1)
}

func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...)
}

// target is one way to reach the echo gateway.
type target struct {
	name string
	addr string
	p    *proc // the proxy process measured (nil for direct)
}

// env starts the shared echo gateway and the three proxies in front of it.
type env struct {
	o       options
	stub    *proc
	targets []target
	procs   []*proc
}

func (e *env) stop() {
	for _, p := range e.procs {
		p.stop()
	}
}

// start runs a tether binary listening on a free port on ip; the runner
// waits until it accepts (at --log-level warn there is no listening line).
func (e *env) start(name, ip, bin string, args ...string) (*proc, error) {
	p, err := startOn(name, ip, bin, args...)
	if err == nil {
		e.procs = append(e.procs, p)
	}
	return p, err
}

func startOn(name, ip, bin string, args ...string) (*proc, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("%s:%d", ip, port)
	return startProc(name, addr, false, bin, append([]string{"--listen", addr}, args...)...)
}

// proxyArgs runs tether like production minus per-session logging: HAProxy
// runs without logs too.
func proxyArgs(gw, ppOut string) []string {
	return []string{"--gateway", "gw=" + gw, "--proxy-protocol-out", ppOut, "--log-level", "warn", "--handshake-timeout", "10s",
		"--client-keepalive", "0"}
}

func setup(o options, echoBuffer string) (*env, error) {
	e := &env{o: o}
	stubArgs := []string{"--id", "gw", "--proxy-protocol", "optional", "--log-level", "warn"}
	if echoBuffer != "" {
		stubArgs = append(stubArgs, "--echo-buffer", echoBuffer)
	}
	var err error
	if e.stub, err = e.start("gateway-stub", "127.0.1.1", filepath.Join(o.bin, "gateway-stub"), stubArgs...); err != nil {
		return e, err
	}
	e.targets = append(e.targets, target{name: "direct", addr: e.stub.addr})
	for _, v := range []struct{ name, pp, extra string }{
		{"tether", "off", ""}, {"tether+v2", "v2", ""}, {"tether-nopark", "off", "--no-park"},
	} {
		args := proxyArgs(e.stub.addr, v.pp)
		if v.extra != "" {
			args = append(args, v.extra)
		}
		p, err := e.start(v.name, "127.0.0.1", filepath.Join(o.bin, "proxy"), args...)
		if err != nil {
			return e, err
		}
		e.targets = append(e.targets, target{name: v.name, addr: p.addr, p: p})
	}
	h, err := startHAProxy(o.tmp, e.stub.addr, 9000)
	if err != nil {
		return e, err
	}
	e.procs = append(e.procs, h)
	e.targets = append(e.targets, target{name: "haproxy", addr: h.addr, p: h})
	n, err := startNginx(o.tmp, e.stub.addr, 9000)
	if err != nil {
		return e, err
	}
	e.procs = append(e.procs, n)
	e.targets = append(e.targets, target{name: "nginx", addr: n.addr, p: n})
	return e, nil
}

// rounds runs f for every target, rounds times, alternating the order
// (A B C D, D C B A, ...), and returns the results per target.
func rounds(ts []target, n int, f func(t target) (float64, error)) (map[string][]float64, error) {
	out := map[string][]float64{}
	for r := range n {
		order := slices.Clone(ts)
		if r%2 == 1 {
			slices.Reverse(order)
		}
		for _, t := range order {
			v, err := f(t)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", t.name, err)
			}
			out[t.name] = append(out[t.name], v)
		}
	}
	return out, nil
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func run(o options) (string, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "# tether benchmarks, %s\n\n", time.Now().UTC().Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(&b, "Command: `%s`\n\n", strings.Join(append([]string{"go run ./bench"}, os.Args[1:]...), " "))
	machine(&b)
	if o.quick {
		fmt.Fprintf(&b, "**Quick mode: a correctness smoke run with tiny sizes. These figures mean nothing.**\n\n")
	}

	e, err := setup(o, "")
	defer e.stop()
	if err != nil {
		return "", err
	}
	names := []string{"direct", "tether", "tether+v2", "tether-nopark", "haproxy", "nginx"}
	fmt.Fprintf(&b, "Targets: `direct` (client → echo gateway), `tether` (PROXY out off), `tether+v2` (PROXY v2 header with the key TLV), `tether-nopark` (`--no-park`: a goroutine and splice pipe per direction, the data path before issue 8), `haproxy` (HAProxy %s, mode tcp, `option splice-request` + `option splice-response`, tcp-smart-accept/connect, no logging), `nginx` (%s, stream module, `proxy_protocol off`, `listen ... reuseport`, `tcp_nodelay on`, a worker per core, no logging). tether runs at `--log-level warn` (no per-session log line) and `--client-keepalive 0`, like HAProxy without logs and without `option clitcpka`. Each metric runs %d rounds, targets in alternating order; the figure is the median. \"First message after idle\": %d sessions sit idle %v (tether parks them after its default --park-after 1s), then each gets one 4-byte round trip in turn — a push to a quiet session. CPU figures are user + system time of the target's processes (nginx: master and workers) from /proc over the runs of that metric.\n\n", haproxyVersion(), nginxVersion(), o.rounds, o.wakeSessions, o.wakeIdle)
	fmt.Fprintf(&b, "| metric | %s | tether / HAProxy | tether / nginx | tether / direct |\n|---|%s---|---|---|\n", strings.Join(names, " | "), strings.Repeat("---|", len(names)))

	row := func(label string, res map[string][]float64, format func(float64) string, higherBetter bool) {
		fmt.Fprintf(&b, "| %s |", label)
		for _, n := range names {
			fmt.Fprintf(&b, " %s |", format(median(res[n])))
		}
		t, h, n, d := median(res["tether"]), median(res["haproxy"]), median(res["nginx"]), median(res["direct"])
		vsDirect := "–" // nothing to compare with (CPU of a direct connection)
		if d > 0 {
			vsDirect = fmt.Sprintf("%.2f", t/d)
		}
		if !higherBetter {
			fmt.Fprintf(&b, " %.2f (lower is better) | %.2f | %s |\n", t/h, t/n, vsDirect)
			return
		}
		fmt.Fprintf(&b, " **%.2f** | %.2f | %s |\n", t/h, t/n, vsDirect)
	}
	mib := func(v float64) string { return fmt.Sprintf("%.0f MiB/s", v/(1<<20)) }

	cpu := map[string]time.Duration{}
	moved := map[string]int64{}
	for _, run := range []struct {
		streams int
		idle    time.Duration
	}{{8, 0}, {64, 0}, {8, o.wakeIdle}} {
		streams := run.streams
		progress("bulk throughput, %d streams, %d MiB each way per run, sessions idle %v first", streams, o.bulkBytes>>20, run.idle)
		res, err := rounds(e.targets, o.rounds, func(t target) (float64, error) {
			var before time.Duration
			if t.p != nil {
				before = treeCPU(t.p.Pid())
			}
			v, err := bulk(t.addr, streams, o.bulkBytes, run.idle)
			if t.p != nil {
				cpu[t.name] += treeCPU(t.p.Pid()) - before
				moved[t.name] += 2 * o.bulkBytes
			}
			return v, err
		})
		if err != nil {
			return "", err
		}
		label := fmt.Sprintf("bulk echo, %d streams (each way)", streams)
		if run.idle > 0 {
			label = fmt.Sprintf("bulk echo, %d streams, sessions idle %v first (each way)", streams, run.idle)
		}
		row(label, res, mib, true)
	}

	progress("new connections per second (hello + reply + reset, 32 workers, %v per run)", o.rateFor)
	connCPU := map[string]time.Duration{}
	conns := map[string]int64{}
	res, err := rounds(e.targets, o.rounds, func(t target) (float64, error) {
		var before time.Duration
		if t.p != nil {
			before = treeCPU(t.p.Pid())
		}
		v, n, err := connRate(t.addr, 32, o.rateFor, 500000)
		if t.p != nil {
			connCPU[t.name] += treeCPU(t.p.Pid()) - before
			conns[t.name] += n
		}
		return v, err
	})
	if err != nil {
		return "", err
	}
	row("new connections / s", res, func(v float64) string { return fmt.Sprintf("%.0f", v) }, true)
	perK := map[string][]float64{}
	for name, c := range connCPU {
		if conns[name] > 0 {
			perK[name] = []float64{c.Seconds() / (float64(conns[name]) / 1000)}
		}
	}
	row("CPU seconds per 1,000 connections", perK, func(v float64) string {
		if v == 0 {
			return "–"
		}
		return fmt.Sprintf("%.3f", v)
	}, false)

	progress("latency: 16 sessions × %d round trips of 64 bytes", o.latMsgs)
	lat := map[string][][]time.Duration{}
	if _, err := rounds(e.targets, o.rounds, func(t target) (float64, error) {
		r, err := latency(t.addr, 16, o.latMsgs)
		lat[t.name] = append(lat[t.name], r)
		return 0, err
	}); err != nil {
		return "", err
	}
	for _, p := range []struct {
		label string
		q     float64
	}{{"p50", 0.50}, {"p99", 0.99}, {"p99.9", 0.999}} {
		res := map[string][]float64{}
		for n, runs := range lat {
			for _, r := range runs {
				res[n] = append(res[n], float64(percentile(r, p.q)))
			}
		}
		row("echo latency "+p.label, res, func(v float64) string { return time.Duration(v).Round(time.Microsecond).String() }, false)
	}
	progress("wake latency: %d sessions idle %v (parked), then one round trip each", o.wakeSessions, o.wakeIdle)
	wake := map[string][]float64{}
	wake99 := map[string][]float64{}
	if _, err := rounds(e.targets, o.rounds, func(t target) (float64, error) {
		r, err := wakeLatency(t.addr, o.wakeSessions, o.wakeIdle)
		if err == nil {
			wake[t.name] = append(wake[t.name], float64(percentile(r, 0.50)))
			wake99[t.name] = append(wake99[t.name], float64(percentile(r, 0.99)))
		}
		return 0, err
	}); err != nil {
		return "", err
	}
	us := func(v float64) string { return time.Duration(v).Round(time.Microsecond).String() }
	row("first message after idle, p50", wake, us, false)
	row("first message after idle, p99", wake99, us, false)
	gib := func(n string) float64 { return cpu[n].Seconds() / (float64(moved[n]) / (1 << 30)) }
	fmt.Fprintf(&b, "| CPU seconds per GiB moved (bulk runs) | – | %.3f | %.3f | %.3f | %.3f | %.3f | %.2f (lower is better) | %.2f | – |\n\n",
		gib("tether"), gib("tether+v2"), gib("tether-nopark"), gib("haproxy"), gib("nginx"), gib("tether")/gib("haproxy"), gib("tether")/gib("nginx"))
	e.stop()

	if !o.skipIdle {
		if err := idleSection(&b, o); err != nil {
			return "", err
		}
	}
	for _, section := range []func(*strings.Builder, options) error{tlsSection, handoffSection, lookupSection} {
		if err := section(&b, o); err != nil {
			return "", err
		}
	}
	return b.String(), nil
}

// idleSection measures what an idle session costs tether and HAProxy: RSS
// and descriptors per session, at several sizes, each on a fresh process.
func idleSection(b *strings.Builder, o options) error {
	fmt.Fprintf(b, "## Idle sessions\n\nEach size runs on a fresh proxy process: N sessions are opened (hello + reply), left idle for 2 s, then sampled for echo. The echo gateway uses a 4 KiB user-space buffer here so it can hold them all. Per-session figures are the growth of the proxy process's RSS and open descriptors divided by N.\n\n")
	fmt.Fprintf(b, "| sessions | tether KiB/session | tether fds/session | HAProxy KiB/session | HAProxy fds/session |\n|---|---|---|---|---|\n")
	e, err := setup(o, "4096")
	defer e.stop()
	if err != nil {
		return err
	}
	settle := 2 * time.Second
	if o.quick {
		settle = 200 * time.Millisecond
	}
	measure := func(kind string, n int, hold time.Duration) (float64, float64, error) {
		var p *proc
		var err error
		if kind == "tether" {
			p, err = startOn("tether-idle", "127.0.0.1", filepath.Join(o.bin, "proxy"), proxyArgs(e.stub.addr, "off")...)
		} else {
			p, err = startHAProxy(o.tmp, e.stub.addr, 9000)
		}
		if err != nil {
			return 0, 0, err
		}
		defer p.stop()
		return idleCost(p.addr, p.Pid(), n, max(settle, hold), hold > 0)
	}
	sizes := slices.Clone(o.idleSizes)
	var tFD float64
	maxN := -1
	for i := 0; i < len(sizes); i++ {
		n := sizes[i]
		var hold time.Duration
		if n == maxN {
			hold = o.idleHold // the largest size: held long, then every session must echo
		}
		progress("idle sessions: %d (hold %v)", n, max(settle, hold))
		tr, tf, err := measure("tether", n, hold)
		if err != nil {
			fmt.Fprintf(b, "| %d | failed: %v | | | |\n", n, err)
			continue
		}
		hr, hf, err := measure("haproxy", n, 0)
		if err != nil {
			return err
		}
		label := fmt.Sprint(n)
		if hold > 0 {
			label = fmt.Sprintf("%d (the most that fit; tether held %v, then every session echoed)", n, hold)
		}
		fmt.Fprintf(b, "| %s | %.1f | %.2f | %.1f | %.2f |\n", label, tr/1024, tf, hr/1024, hf)
		tFD = tf
		if i == len(sizes)-1 && !o.quick {
			// The largest size the open-file limit allows tether, with
			// room for the listener and runtime descriptors.
			most := min(int(float64(o.idleLimit-300)/max(tFD, 1))/100*100, 9000)
			if most > n {
				maxN = most
				sizes = append(sizes, maxN)
			}
		}
	}
	fmt.Fprintf(b, "\n")
	return nil
}

func machine(b *strings.Builder) {
	cpu := "unknown"
	if raw, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(raw), "\n") {
			if strings.HasPrefix(line, "model name") {
				cpu = strings.TrimSpace(strings.SplitN(line, ":", 2)[1])
				break
			}
		}
	}
	kernel, _ := exec.Command("uname", "-r").Output()
	// The congestion control moves bulk figures by a third on loopback
	// (BBR paces every flow; docs/BENCHMARKS.md), so the report names it.
	cc := "unknown"
	if raw, err := os.ReadFile("/proc/sys/net/ipv4/tcp_congestion_control"); err == nil {
		cc = strings.TrimSpace(string(raw))
	}
	fmt.Fprintf(b, "Machine: %d CPUs (%s), Linux %s, TCP congestion control %s, %s, open-file limit %s.\n\n", runtime.NumCPU(), cpu,
		strings.TrimSpace(string(kernel)), cc, runtime.Version(), fileLimit())
}

func fileLimit() string {
	out, err := exec.Command("sh", "-c", "ulimit -n").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}

func haproxyVersion() string {
	out, err := exec.Command("haproxy", "-v").Output()
	if err != nil {
		return "(unknown version)"
	}
	f := strings.Fields(string(out))
	if len(f) > 2 {
		return f[2]
	}
	return strings.TrimSpace(string(out))
}
