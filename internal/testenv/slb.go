//go:build unix

package testenv

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tether-proxy/tether/internal/procrun"
)

// Proc is an external program run by a test; its output is kept for
// failure reports.
type Proc struct {
	*procrun.Proc
	mu  sync.Mutex
	out strings.Builder
}

// Start runs bin with args and env (added to the test's environment) and
// stops it (SIGTERM, then SIGKILL) when the test ends.
func Start(t testing.TB, env []string, bin string, args ...string) *Proc {
	t.Helper()
	p := &Proc{}
	pr, err := procrun.Start(bin, args, procrun.Options{Env: env, OnLine: func(l string) {
		p.mu.Lock()
		if p.out.Len() < 1<<20 {
			p.out.WriteString(l + "\n")
		}
		p.mu.Unlock()
	}})
	if err != nil {
		t.Fatal(err)
	}
	p.Proc = pr
	t.Cleanup(func() {
		p.Stop()
		if t.Failed() {
			t.Logf("output of %s:\n%s", filepath.Base(bin), p.Output())
		}
	})
	return p
}

// Output is what the program printed so far.
func (p *Proc) Output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

// Stop ends the program: SIGTERM, then SIGKILL after 5s.
func (p *Proc) Stop() { p.Proc.Stop(5 * time.Second) }

// HAProxy is a running haproxy with a runtime API socket.
type HAProxy struct {
	*Proc
	// Bind is the frontend address clients connect to.
	Bind   string
	socket string
}

// StartHAProxy runs haproxy -db -f cfg with env, where cfg reads
// TETHER_SLB_BIND and TETHER_STATS_SOCKET (set here) plus whatever env
// adds, and waits until it accepts connections on the frontend.
func StartHAProxy(t testing.TB, cfg string, env ...string) *HAProxy {
	t.Helper()
	for range 3 {
		bind := fmt.Sprintf("127.0.0.1:%d", FreePort(t, "127.0.0.1"))
		if h := startHAProxy(t, cfg, bind, nil, env); h != nil {
			return h
		}
	}
	t.Fatal("haproxy did not start three times")
	return nil
}

// StartHAProxyAt is StartHAProxy on a given frontend address, run through
// a command prefix (["ip", "netns", "exec", NS] runs it in a network
// namespace); the runtime API socket is a file, reachable from anywhere.
func StartHAProxyAt(t testing.TB, cfg, bind string, prefix []string, env ...string) *HAProxy {
	t.Helper()
	h := startHAProxy(t, cfg, bind, prefix, env)
	if h == nil {
		t.Fatalf("haproxy did not start on %s", bind)
	}
	return h
}

func startHAProxy(t testing.TB, cfg, bind string, prefix, env []string) *HAProxy {
	t.Helper()
	bin := Need(t, "haproxy")
	sock := filepath.Join(t.TempDir(), "haproxy.sock")
	full := append([]string{"TETHER_SLB_BIND=" + bind, "TETHER_STATS_SOCKET=" + sock}, env...)
	h := &HAProxy{Bind: bind, socket: sock}
	args := []string{"-db", "-f", cfg}
	if len(prefix) > 0 {
		args = append(append(append([]string{}, prefix[1:]...), bin), args...)
		bin = prefix[0]
	}
	h.Proc = Start(t, full, bin, args...)
	if err := waitDial(bind, 10*time.Second, h.Proc); err != nil {
		t.Logf("haproxy on %s: %v\n%s", bind, err, h.Output())
		h.Stop()
		return nil
	}
	return h
}

func waitDial(addr string, timeout time.Duration, p *Proc) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if p.Exited() || time.Now().After(deadline) {
			return fmt.Errorf("%s not accepting: %w", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ServerStatus asks the runtime API for each backend server's status
// ("UP", "DOWN", ...), keyed by server name.
func (h *HAProxy) ServerStatus() (map[string]string, error) {
	c, err := net.DialTimeout("unix", h.socket, time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("show stat\n")); err != nil {
		return nil, err
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	var cols []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Split(line, ",")
		if strings.HasPrefix(line, "# ") {
			cols = strings.Split(strings.TrimPrefix(line, "# "), ",")
			continue
		}
		if len(f) < 2 || f[1] == "FRONTEND" || f[1] == "BACKEND" {
			continue
		}
		for i, c := range cols {
			if c == "status" && i < len(f) {
				out[f[1]] = f[i]
			}
		}
	}
	return out, nil
}

// WaitServers waits until every named backend server has the status.
func (h *HAProxy) WaitServers(t testing.TB, status string, names ...string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, err := h.ServerStatus()
		ok := err == nil
		for _, n := range names {
			ok = ok && st[n] == status
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("haproxy servers %v not %s: %v %v", names, status, st, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// StartNginx renders the template cfg (${VAR} placeholders from vars plus
// TETHER_SLB_BIND and TETHER_NGINX_PID, set here) and runs nginx on it,
// waiting until the frontend accepts. It returns the frontend address.
func StartNginx(t testing.TB, cfg string, vars map[string]string) (*Proc, string) {
	t.Helper()
	bin := Need(t, "nginx")
	if _, err := os.Stat("/usr/lib/nginx/modules/ngx_stream_module.so"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("nginx stream module missing (libnginx-mod-stream)")
		}
		t.Skip("nginx stream module missing (libnginx-mod-stream; make test installs it)")
	}
	tmpl, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var lastOut string
	for range 3 {
		bind := fmt.Sprintf("127.0.0.1:%d", FreePort(t, "127.0.0.1"))
		all := map[string]string{"TETHER_SLB_BIND": bind, "TETHER_NGINX_PID": filepath.Join(dir, "nginx.pid")}
		for k, v := range vars {
			all[k] = v
		}
		rendered := os.Expand(string(tmpl), func(k string) string { return all[k] })
		path := filepath.Join(dir, "nginx.conf")
		if err := os.WriteFile(path, []byte(rendered), 0o644); err != nil {
			t.Fatal(err)
		}
		p := Start(t, nil, bin, "-p", dir, "-e", "stderr", "-c", path, "-g", "daemon off;")
		if waitDial(bind, 10*time.Second, p) == nil {
			return p, bind
		}
		lastOut = p.Output()
		p.Stop()
	}
	t.Fatalf("nginx did not start:\n%s", lastOut)
	return nil, ""
}
