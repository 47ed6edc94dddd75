//go:build linux

package upgrade

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/pkg/cluster"
	"github.com/tether-proxy/tether/pkg/proto"
	"github.com/tether-proxy/tether/pkg/proxy"
	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route"
)

// childEnv makes the test binary play the new process (TestMain).
const childEnv = "TETHER_UPGRADE_TEST_CHILD"

func TestMain(m *testing.M) {
	if mode := os.Getenv(childEnv); mode != "" {
		os.Exit(childMain(mode))
	}
	os.Exit(m.Run())
}

// childReport is what the helper child prints.
type childReport struct {
	Listener string   `json:"listener"`
	Gateways []string `json:"gateways"`
	LastConn uint64   `json:"last_conn"`
	Released bool     `json:"released"`
}

type recordingNew struct {
	mu  sync.Mutex
	rep childReport
}

func (r *recordingNew) Serve(last uint64)                 { r.mu.Lock(); r.rep.LastConn = last; r.mu.Unlock() }
func (r *recordingNew) Adopt(h proxy.HandedSession) error { closeAll(h.FDs); return nil }
func (r *recordingNew) SetMembers(Snapshot)               {}

func childMain(mode string) int {
	p, err := Inherit(5 * time.Second)
	if err != nil || p == nil {
		fmt.Fprintln(os.Stderr, "inherit:", err)
		return 2
	}
	switch mode {
	case "refuse":
		p.Refuse(errors.New("no thanks"))
		return 1
	case "die-on-sessions":
		// Ready, serve, then die on the first batch without confirming it.
		if _, err := p.Listener("client", "127.0.0.1:0"); err != nil {
			return 1
		}
		if err := p.Ready(); err != nil {
			return 3
		}
		for {
			m, fds, err := p.c.recv(10 * time.Second)
			closeAll(fds)
			if err != nil || m.Type == typeSessions {
				os.Exit(5)
			}
			if m.Type == typeGo {
				_ = p.c.send(message{Type: typeServing}, nil, time.Second)
			}
		}
	case "moved":
		if _, err := p.Listener("client", "127.0.0.1:9"); err != nil {
			p.Refuse(err)
			return 1
		}
		return 0
	}
	ln, err := p.Listener("client", "127.0.0.1:0")
	if err != nil || ln == nil {
		p.Refuse(fmt.Errorf("listener: %v", err))
		return 1
	}
	n := &recordingNew{}
	n.rep.Listener = ln.Addr().String()
	for _, g := range p.Snapshot().Gateways {
		n.rep.Gateways = append(n.rep.Gateways, g.ID)
	}
	if err := p.Ready(); err != nil {
		return 3
	}
	t, err := p.Take(n)
	if err != nil {
		fmt.Fprintln(os.Stderr, "take:", err)
		return 4
	}
	n.rep.Released = t.Released
	_ = json.NewEncoder(os.Stdout).Encode(n.rep)
	return 0
}

// fakeOld is an old process with a real listener and a proxy server that
// holds no session.
type fakeOld struct {
	t       *testing.T
	ln      *net.TCPListener
	srv     *proxy.Server
	mu      sync.Mutex
	stopped int
	resumed int
	left    int
}

func newFakeOld(t *testing.T) *fakeOld {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	r, err := ring.New([]ring.Member{{ID: "gw-1", Addr: "127.0.1.1:1", Weight: 1}})
	if err != nil {
		t.Fatal(err)
	}
	var h ring.Holder
	h.Store(r)
	srv, err := proxy.New(proxy.Config{Resolver: &route.RingResolver{Ring: &h}, Park: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return &fakeOld{t: t, ln: ln.(*net.TCPListener), srv: srv}
}

func (o *fakeOld) Listeners() ([]Listener, error) {
	f, err := o.ln.File()
	if err != nil {
		return nil, err
	}
	return []Listener{{Name: "client", Flag: "127.0.0.1:0", File: f}}, nil
}
func (o *fakeOld) Snapshot() Snapshot {
	return Snapshot{Gateways: []cluster.GatewayInfo{{Node: "gw-1", ID: "gw-1", Addr: "127.0.1.1:1", Weight: 1, State: cluster.StateActive}}}
}
func (o *fakeOld) StopAccepting() { o.mu.Lock(); o.stopped++; o.mu.Unlock() }
func (o *fakeOld) ResumeAccepting([]Listener) error {
	o.mu.Lock()
	o.resumed++
	o.mu.Unlock()
	return nil
}
func (o *fakeOld) Server() *proxy.Server    { return o.srv }
func (o *fakeOld) Changes() <-chan struct{} { return nil }
func (o *fakeOld) ReleaseGossip()           { o.mu.Lock(); o.left++; o.mu.Unlock() }

// helper runs the test binary as the new process in mode.
func helper(mode string, out *lockedBuffer) Config {
	return Config{Exe: os.Args[0], Args: []string{"-test.run=^$"}, Env: append(os.Environ(), childEnv+"="+mode),
		Stdout: out, Stderr: os.Stderr, Timeout: 10 * time.Second, Metrics: NewMetrics(nil)}
}

func TestRunHandsOverToANewProcess(t *testing.T) {
	old := newFakeOld(t)
	var out lockedBuffer
	res, err := Run(context.Background(), old, helper("ready", &out))
	if err != nil {
		t.Fatal(err)
	}
	if res.Listeners != 1 || res.Sessions != 0 || res.Left != 0 || res.PID == 0 {
		t.Fatalf("result %+v", res)
	}
	if old.stopped != 1 || old.left != 1 || old.resumed != 0 {
		t.Fatalf("stopped %d, released gossip %d, resumed %d; want 1, 1, 0", old.stopped, old.left, old.resumed)
	}
	// The child's report arrives once it exited.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(out.String(), "\n") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	var rep childReport
	if err := json.Unmarshal([]byte(out.String()), &rep); err != nil {
		t.Fatalf("child report %q: %v", out.String(), err)
	}
	if rep.Listener != old.ln.Addr().String() || !rep.Released || len(rep.Gateways) != 1 || rep.Gateways[0] != "gw-1" {
		t.Fatalf("child saw %+v; want listener %s, gw-1, released", rep, old.ln.Addr())
	}
}

func TestRunFailures(t *testing.T) {
	tests := []struct {
		name   string
		cfg    func(*lockedBuffer) Config
		want   error
		text   string
		metric string
	}{
		{"start", func(*lockedBuffer) Config {
			return Config{Exe: "/nonexistent/proxy", Timeout: time.Second}
		}, ErrStart, "no such file", "start"},
		{"exits", func(*lockedBuffer) Config {
			return Config{Exe: "/bin/sh", Args: []string{"-c", "exit 3"}, Timeout: 5 * time.Second}
		}, ErrExited, "exit status 3", "exited"},
		{"hangs", func(*lockedBuffer) Config {
			return Config{Exe: "/bin/sleep", Args: []string{"30"}, Timeout: 300 * time.Millisecond}
		}, ErrNotReady, "300ms", "not_ready"},
		{"refuses", func(b *lockedBuffer) Config { return helper("refuse", b) }, ErrRefused, "no thanks", "refused"},
		{"moved socket", func(b *lockedBuffer) Config { return helper("moved", b) }, ErrRefused, "moves the client socket", "refused"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			old := newFakeOld(t)
			var out lockedBuffer
			cfg := tt.cfg(&out)
			m := NewMetrics(nil)
			cfg.Metrics = m
			start := time.Now()
			_, err := Run(context.Background(), old, cfg)
			if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.text) {
				t.Fatalf("Run = %v, want %v mentioning %q", err, tt.want, tt.text)
			}
			if old.stopped != 0 || old.left != 0 {
				t.Fatalf("the old process stopped accepting (%d) or left gossip (%d) for a failed upgrade", old.stopped, old.left)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Fatalf("failure took %v", d)
			}
			if got := testCounter(m, tt.metric); got != 1 {
				t.Fatalf("failures{%s} = %v, want 1", tt.metric, got)
			}
		})
	}
}

// TestRunLostNewProcessResumes: a new process that dies on the first
// batch costs the old one nothing: it accepts again and its sessions, never
// confirmed, carry on.
func TestRunLostNewProcessResumes(t *testing.T) {
	old := newFakeOld(t)
	gw, err := stub.New(stub.Config{ID: "gw-1", ProxyProtocol: stub.ProxyRequire, KeepOlder: true})
	if err != nil {
		t.Fatal(err)
	}
	gln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = gw.Serve(gln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = gw.Shutdown(ctx)
	})
	old.srv = newServer(t, gln.Addr().String())
	go func() { _ = old.srv.Serve(old.ln) }()
	var conns []net.Conn
	for i := range 10 {
		c, err := net.Dial("tcp", old.ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(20 * time.Second))
		h, _ := proto.AppendHello(nil, []byte(fmt.Sprintf("k%d", i)), nil)
		c.Write(h)
		if _, _, err := stub.ReadReply(c); err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	var out lockedBuffer
	_, err = Run(context.Background(), old, helper("die-on-sessions", &out))
	if !errors.Is(err, ErrLost) {
		t.Fatalf("Run = %v, want ErrLost", err)
	}
	if old.stopped != 1 || old.resumed != 1 || old.left != 0 {
		t.Fatalf("stopped %d, resumed %d, left gossip %d; want 1, 1, 0", old.stopped, old.resumed, old.left)
	}
	for i, c := range conns {
		c.Write([]byte("still"))
		got := make([]byte, 5)
		if _, err := io.ReadFull(c, got); err != nil || string(got) != "still" {
			t.Fatalf("session %d after the lost upgrade: %q %v", i, got, err)
		}
	}
	if old.srv.Active() != 10 {
		t.Fatalf("old process holds %d sessions, want 10", old.srv.Active())
	}
}

// newServer is a parking proxy over one gateway.
func newServer(t *testing.T, gw string) *proxy.Server {
	t.Helper()
	r, err := ring.New([]ring.Member{{ID: "gw-1", Addr: gw, Weight: 1}})
	if err != nil {
		t.Fatal(err)
	}
	var h ring.Holder
	h.Store(r)
	cfg := proxy.DefaultConfig()
	cfg.Resolver = &route.RingResolver{Ring: &h}
	srv, err := proxy.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv
}

func TestRunCancelled(t *testing.T) {
	old := newFakeOld(t)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	_, err := Run(ctx, old, Config{Exe: "/bin/sleep", Args: []string{"30"}, Timeout: 20 * time.Second})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Run = %v, want context.Canceled", err)
	}
}

// TestConnCarriesDescriptors: a message and its descriptors arrive whole;
// a closed peer reads as errEOF.
func TestConnCarriesDescriptors(t *testing.T) {
	a, f, err := socketPair()
	if err != nil {
		t.Fatal(err)
	}
	defer a.close()
	b, err := fileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer closeAll(p[:])
	if err := a.send(message{Type: typeAck, N: 7}, p[:], time.Second); err != nil {
		t.Fatal(err)
	}
	m, fds, err := b.recv(time.Second)
	if err != nil || m.Type != typeAck || m.N != 7 || len(fds) != 2 {
		t.Fatalf("recv %+v, %d fds, %v", m, len(fds), err)
	}
	// The received write end writes into the sent pipe.
	if _, err := unix.Write(fds[1], []byte("x")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1)
	if n, err := unix.Read(p[0], buf); n != 1 || err != nil {
		t.Fatalf("read %d, %v", n, err)
	}
	closeAll(fds)
	if err := a.send(message{Type: typeAck}, make([]int, MaxFDs+1), time.Second); err == nil {
		t.Fatal("sent more descriptors than a packet may carry")
	}
	a.close()
	if _, _, err := b.recv(time.Second); !errors.Is(err, errEOF) {
		t.Fatalf("recv after close = %v, want errEOF", err)
	}
	b.close()
}

func TestWithoutFD(t *testing.T) {
	got := withoutFD([]string{"A=1", EnvFD + "=3", "B=2"})
	if strings.Join(got, " ") != "A=1 B=2" {
		t.Fatalf("withoutFD = %v", got)
	}
}

func testCounter(m *Metrics, reason string) float64 {
	return testutil.ToFloat64(m.Failures.WithLabelValues(reason))
}

// lockedBuffer is the helper child's stdout, written by exec's copier.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}
func (l *lockedBuffer) String() string { l.mu.Lock(); defer l.mu.Unlock(); return l.b.String() }
