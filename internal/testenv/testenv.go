//go:build unix

// Package testenv starts the real external programs tests need (redis-server,
// haproxy, nginx) on loopback ports of their own. When one is missing the
// test is skipped with a hint, except under CI=true, where it fails: CI must
// never count a skipped dependency as a pass.
package testenv

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tether-proxy/tether/internal/procrun"
)

// Need returns the path of program, or skips (fails under CI=true) when it
// is not installed.
func Need(t testing.TB, program string) string {
	t.Helper()
	path, err := exec.LookPath(program)
	if err == nil {
		return path
	}
	for _, dir := range []string{"/usr/sbin", "/usr/local/sbin", "/sbin"} {
		if p := dir + "/" + program; isExec(p) {
			return p
		}
	}
	msg := fmt.Sprintf("%s is not installed (make test installs it: scripts/deps.sh)", program)
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

func isExec(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode()&0o111 != 0
}

// FreePort returns a TCP port on ip that was free a moment ago. Programs
// that cannot listen on port 0 and report it (redis, haproxy, nginx) get
// one of these; callers retry on the rare collision.
func FreePort(t testing.TB, ip string) int {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// StalledAddr returns the address of a loopback listener whose accept
// queue is full, so the kernel drops new SYNs and a connect to it stays in
// progress until it times out: a gateway that hangs. Everything is closed
// when the test ends.
func StalledAddr(t testing.TB) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := (&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: sa.(*syscall.SockaddrInet4).Port}).String()
	// Fill the queue (backlog 0 holds one) until a connect stalls.
	for range 8 {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			return addr // this one stalled: the queue is full
		}
		t.Cleanup(func() { c.Close() })
	}
	t.Fatal("connects to a full accept queue did not stall")
	return ""
}

// Redis is a redis-server run by a test.
type Redis struct {
	// Addr is HOST:PORT.
	Addr  string
	bin   string
	dir   string // its working directory: a replica's full sync writes an RDB file there
	extra []string
	proc  *procrun.Proc
}

// StartRedis runs a throwaway redis-server (no persistence) on a loopback
// port and waits until it answers PING. It stops when the test ends. extra
// are more redis-server options ("--maxmemory", "1mb", or "--replicaof",
// host, port).
func StartRedis(t testing.TB, extra ...string) *Redis {
	t.Helper()
	bin := Need(t, "redis-server")
	var lastErr error
	dir := t.TempDir()
	for range 3 {
		port := FreePort(t, "127.0.0.1")
		r := &Redis{Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), bin: bin, dir: dir, extra: extra}
		if err := r.start(port); err != nil {
			t.Fatal(err)
		}
		if lastErr = r.waitPing(10 * time.Second); lastErr == nil {
			t.Cleanup(r.Kill)
			return r
		}
		r.Kill()
	}
	t.Fatalf("redis-server did not start: %v", lastErr)
	return nil
}

func (r *Redis) start(port int) error {
	p, err := procrun.Start(r.bin, r.args(port), procrun.Options{})
	r.proc = p
	return err
}

func (r *Redis) args(port int) []string {
	return append([]string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--dir", r.dir, "--save", "",
		"--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"}, r.extra...)
}

func (r *Redis) waitPing(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if err := r.Ping(); err == nil {
			return nil
		} else if time.Now().After(deadline) {
			return err
		}
		select {
		case <-r.proc.Done():
			return fmt.Errorf("redis-server exited")
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Ping sends PING over a fresh connection (RESP inline command).
func (r *Redis) Ping() error {
	c, err := net.DialTimeout("tcp", r.Addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "+PONG") {
		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}

// Pause stops the server process (SIGSTOP): connections hang, as with a
// Redis stuck on a slow command or a network partition.
func (r *Redis) Pause() { _ = r.proc.Signal(syscall.SIGSTOP) }

// Resume continues a paused server.
func (r *Redis) Resume() { _ = r.proc.Signal(syscall.SIGCONT) }

// Kill stops the server for good (kill -9).
func (r *Redis) Kill() { r.proc.Kill() }

// Restart starts a new server on the same address after Kill.
func (r *Redis) Restart(t testing.TB) {
	t.Helper()
	_, portStr, _ := net.SplitHostPort(r.Addr)
	port, _ := strconv.Atoi(portStr)
	if err := r.start(port); err != nil {
		t.Fatal(err)
	}
	if err := r.waitPing(10 * time.Second); err != nil {
		t.Fatalf("redis-server restart: %v", err)
	}
}
