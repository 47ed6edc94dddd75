//go:build linux

package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tether-proxy/tether/internal/procrun"
)

// proc is a process the runner started.
type proc struct {
	name string
	*procrun.Proc
	addr string
	out  *lineLog
}

// lineLog keeps a process's last output lines for error reports and finds
// the "listening" address tether binaries announce.
type lineLog struct {
	mu    sync.Mutex
	lines []string
	addr  chan string
	sent  bool
}

func (l *lineLog) add(line string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, line)
	if len(l.lines) > 50 {
		l.lines = l.lines[1:]
	}
	if i := strings.Index(line, `"msg":"listening","addr":"`); i >= 0 && !l.sent {
		rest := line[i+len(`"msg":"listening","addr":"`):]
		l.addr <- rest[:strings.IndexByte(rest, '"')]
		l.sent = true
	}
}

func (l *lineLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

// startProc runs a binary; for tether binaries (announce=true) it waits for
// the "listening" line, otherwise for addr to accept connections.
func startProc(name, addr string, announce bool, bin string, args ...string) (*proc, error) {
	p := &proc{name: name, out: &lineLog{addr: make(chan string, 1)}}
	pr, err := procrun.Start(bin, args, procrun.Options{OnLine: p.out.add})
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p.Proc = pr
	deadline := time.After(20 * time.Second)
	if announce {
		select {
		case p.addr = <-p.out.addr:
			return p, nil
		case <-p.Done():
		case <-deadline:
		}
		p.stop()
		return nil, fmt.Errorf("%s did not start:\n%s", name, p.out)
	}
	p.addr = addr
	for {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return p, nil
		}
		select {
		case <-p.Done():
			return nil, fmt.Errorf("%s exited:\n%s", name, p.out)
		case <-deadline:
			p.stop()
			return nil, fmt.Errorf("%s did not listen on %s:\n%s", name, addr, p.out)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (p *proc) stop() {
	if p == nil || p.Proc == nil {
		return
	}
	p.Stop(5 * time.Second)
}

// procStats reads CPU time, RSS and open descriptors of a process.
type procStats struct {
	cpu time.Duration
	rss int64 // bytes
	fds int
}

func statsOf(pid int) (procStats, error) {
	var st procStats
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return st, err
	}
	// Fields after the command name (which may contain spaces).
	f := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+2:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	st.cpu = time.Duration(utime+stime) * time.Second / 100 // USER_HZ
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return st, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			kb, _ := strconv.ParseInt(strings.Fields(line)[1], 10, 64)
			st.rss = kb * 1024
		}
	}
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return st, err
	}
	st.fds = len(ents)
	return st, nil
}

// freePort finds a free loopback port for programs that cannot announce
// port 0 (haproxy).
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// haproxyConfig is HAProxy at its best for this job: tcp mode, forced
// splice both ways, smart accept/connect, no logging.
func haproxyConfig(bind, server string, maxconn int) string {
	return fmt.Sprintf(`global
    maxconn %d
    maxpipes 512
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    option splice-request
    option splice-response
    option tcp-smart-accept
    option tcp-smart-connect
frontend fe
    bind %s
    default_backend be
backend be
    server s1 %s
`, maxconn, bind, server)
}

// startHAProxy writes the config to dir and runs haproxy in the foreground.
func startHAProxy(dir, server string, maxconn int) (*proc, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	bind := fmt.Sprintf("127.0.0.1:%d", port)
	cfg := filepath.Join(dir, fmt.Sprintf("haproxy-%d.cfg", port))
	if err := os.WriteFile(cfg, []byte(haproxyConfig(bind, server, maxconn)), 0o644); err != nil {
		return nil, err
	}
	return startProc("haproxy", bind, false, haproxyBin(), "-db", "-f", cfg)
}

// haproxyBin is the haproxy executable.
func haproxyBin() string {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		bin = "/usr/sbin/haproxy"
	}
	return bin
}

// nginxConfig is nginx's stream module tuned for this job: a listener per
// worker (reuseport), one worker per core, no PROXY header, TCP_NODELAY,
// no logging; proxy_half_close passes a client's FIN on (the bulk runs
// half-close and read the echo), as tether and HAProxy do.
func nginxConfig(bind, server, pidFile string, maxconn int) string {
	return fmt.Sprintf(`load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
worker_processes auto;
worker_rlimit_nofile %d;
pid %s;
error_log stderr warn;
events {
    worker_connections %d;
    multi_accept on;
}
stream {
    access_log off;
    upstream gw {
        server %s;
    }
    server {
        listen %s reuseport;
        proxy_pass gw;
        proxy_protocol off;
        tcp_nodelay on;
        proxy_half_close on;
        proxy_connect_timeout 5s;
        proxy_timeout 10m;
    }
}
`, 2*maxconn+100, pidFile, maxconn, server, bind)
}

// startNginx writes the config to dir and runs nginx in the foreground.
func startNginx(dir, server string, maxconn int) (*proc, error) {
	if _, err := os.Stat("/usr/lib/nginx/modules/ngx_stream_module.so"); err != nil {
		return nil, fmt.Errorf("nginx stream module missing (make deps installs libnginx-mod-stream): %w", err)
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	bind := fmt.Sprintf("127.0.0.1:%d", port)
	cfg := filepath.Join(dir, fmt.Sprintf("nginx-%d.conf", port))
	conf := nginxConfig(bind, server, filepath.Join(dir, fmt.Sprintf("nginx-%d.pid", port)), maxconn)
	if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	return startProc("nginx", bind, false, nginxBin(), "-e", "stderr", "-p", dir, "-c", cfg)
}

// nginxBin is the nginx executable.
func nginxBin() string {
	bin, err := exec.LookPath("nginx")
	if err != nil {
		bin = "/usr/sbin/nginx"
	}
	return bin
}

// nginxVersion is "nginx/1.x.y".
func nginxVersion() string {
	out, err := exec.Command(nginxBin(), "-v").CombinedOutput()
	if err != nil {
		return "nginx (version unknown)"
	}
	return strings.TrimSpace(strings.TrimPrefix(string(out), "nginx version: "))
}

// treeCPU is the CPU time (user + system) of a process and every
// descendant still running: nginx works in worker processes.
func treeCPU(pid int) time.Duration {
	st, err := statsOf(pid)
	if err != nil {
		return 0
	}
	total := st.cpu
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, task := range tasks {
		raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, task.Name()))
		if err != nil {
			continue
		}
		for _, c := range strings.Fields(string(raw)) {
			if child, err := strconv.Atoi(c); err == nil {
				total += treeCPU(child)
			}
		}
	}
	return total
}
