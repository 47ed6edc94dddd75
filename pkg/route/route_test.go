package route

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tether-proxy/tether/pkg/ring"
)

func TestRingResolver(t *testing.T) {
	var h ring.Holder
	r := &RingResolver{Ring: &h}
	if _, err := r.Resolve(context.Background(), []byte("k")); !errors.Is(err, ErrNoGateway) {
		t.Fatalf("empty ring: err = %v", err)
	}
	rg, err := ring.New([]ring.Member{{ID: "a", Weight: 1}, {ID: "b", Weight: 1}, {ID: "c", Weight: 1}, {ID: "d", Weight: 1}})
	if err != nil {
		t.Fatal(err)
	}
	h.Store(rg)
	rt, err := r.Resolve(context.Background(), []byte("k"))
	if err != nil {
		t.Fatal(err)
	}
	if rt.Source != SourceRing || len(rt.Candidates) != DefaultCandidates {
		t.Fatalf("route %+v", rt)
	}
	if owner, _ := rg.Lookup([]byte("k")); rt.Candidates[0].ID != owner.ID {
		t.Fatalf("first candidate %s, ring owner %s", rt.Candidates[0].ID, owner.ID)
	}
	r.Candidates = 10
	if rt, _ := r.Resolve(context.Background(), []byte("k")); len(rt.Candidates) != 4 {
		t.Fatalf("asked 10 of 4 members, got %d", len(rt.Candidates))
	}
}

// listener returns the address of a live loopback listener that accepts and
// holds connections until the test ends.
func listener(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return ln.Addr().String()
}

// deadAddr returns a loopback address nothing listens on (connections are
// refused).
func deadAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func TestDialerFailover(t *testing.T) {
	live, dead := listener(t), deadAddr(t)
	clk := &fakeClock{now: time.Unix(1000, 0)}
	d := &Dialer{Now: clk.Now, Cooldown: 5 * time.Second}
	cands := []Gateway{{ID: "dead", Addr: dead}, {ID: "live", Addr: live}}

	res, err := d.Dial(context.Background(), cands)
	if err != nil {
		t.Fatal(err)
	}
	res.Conn.Close()
	if res.Gateway.ID != "live" || res.Attempts != 2 || len(res.Failed) != 1 || res.Failed[0].ID != "dead" {
		t.Fatalf("got %s after %d attempts, failures %v", res.Gateway.ID, res.Attempts, res.Failed)
	}
	if !d.CoolingDown("dead") {
		t.Fatal("refusing gateway not cooling down")
	}

	// Within the cooldown the dead owner is skipped: one attempt.
	res, err = d.Dial(context.Background(), cands)
	if err != nil {
		t.Fatal(err)
	}
	res.Conn.Close()
	if res.Attempts != 1 || len(res.Failed) != 0 {
		t.Fatalf("cooling gateway was tried: attempts %d failures %v", res.Attempts, res.Failed)
	}

	// After it, the owner is tried again first.
	clk.Add(6 * time.Second)
	if d.CoolingDown("dead") {
		t.Fatal("cooldown did not end")
	}
	res, err = d.Dial(context.Background(), cands)
	if err != nil {
		t.Fatal(err)
	}
	res.Conn.Close()
	if res.Attempts != 2 {
		t.Fatalf("attempts %d, want owner retried", res.Attempts)
	}
}

func TestDialerAllDown(t *testing.T) {
	clk := &fakeClock{now: time.Unix(1000, 0)}
	d := &Dialer{Now: clk.Now, MaxTries: 2}
	cands := []Gateway{{ID: "a", Addr: deadAddr(t)}, {ID: "b", Addr: deadAddr(t)}, {ID: "c", Addr: deadAddr(t)}}
	res, err := d.Dial(context.Background(), cands)
	if !errors.Is(err, ErrUnreachable) || res.Attempts != 2 || len(res.Failed) != 2 {
		t.Fatalf("err = %v, result %+v", err, res)
	}
	// Every candidate cooling down: still tried, bounded by MaxTries.
	live := listener(t)
	cands[0].Addr = live
	res, err = d.Dial(context.Background(), cands)
	if err != nil {
		t.Fatalf("cooling candidates were not tried: %v", err)
	}
	res.Conn.Close()
	if res.Gateway.ID != "a" {
		t.Fatalf("got %s", res.Gateway.ID)
	}
	if _, err := d.Dial(context.Background(), nil); !errors.Is(err, ErrNoGateway) {
		t.Fatalf("no candidates: err = %v", err)
	}
}

func TestDialerTimeoutAndCancel(t *testing.T) {
	block := func(ctx context.Context, _, _ string) (net.Conn, error) {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	d := &Dialer{DialContext: block, DialTimeout: 10 * time.Millisecond, MaxTries: 2, Cooldown: -1}
	_, err := d.Dial(context.Background(), []Gateway{{ID: "a"}, {ID: "b"}})
	if !errors.Is(err, ErrUnreachable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v", err)
	}
	if d.CoolingDown("a") {
		t.Fatal("negative cooldown still marked the gateway down")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = d.Dial(ctx, []Gateway{{ID: "a"}, {ID: "b"}})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: err = %v", err)
	}
}

// TestDialerLocalResources: this host running out of descriptors or ports
// is not the gateway's fault: no cooldown, no gateway listed as failed, no
// further candidates tried.
func TestDialerLocalResources(t *testing.T) {
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.EADDRNOTAVAIL} {
		t.Run(errno.Error(), func(t *testing.T) {
			attempts := 0
			d := &Dialer{DialContext: func(context.Context, string, string) (net.Conn, error) {
				attempts++
				return nil, &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("socket", errno)}
			}}
			res, err := d.Dial(context.Background(), []Gateway{{ID: "a", Addr: "127.0.1.1:1"}, {ID: "b", Addr: "127.0.1.2:1"}})
			if !errors.Is(err, ErrLocalResources) || errors.Is(err, ErrUnreachable) {
				t.Fatalf("err = %v, want ErrLocalResources", err)
			}
			if attempts != 1 || len(res.Failed) != 0 || d.CoolingDown("a") || d.CoolingDown("b") {
				t.Fatalf("attempts %d, failed %v, cooling a=%v b=%v", attempts, res.Failed, d.CoolingDown("a"), d.CoolingDown("b"))
			}
		})
	}
}

// TestDialerLogsReachabilityChanges: one warning when a gateway stops
// answering, none for the attempts that follow, one when it answers again.
func TestDialerLogsReachabilityChanges(t *testing.T) {
	core, logs := observer.New(zap.InfoLevel)
	up := false
	live := listener(t)
	d := &Dialer{Cooldown: -1, Logger: zap.New(core), DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		if !up {
			return nil, syscall.ECONNREFUSED
		}
		return (&net.Dialer{}).DialContext(ctx, network, live)
	}}
	cands := []Gateway{{ID: "gw-1", Addr: "127.0.1.1:1"}}
	for range 5 {
		if _, err := d.Dial(context.Background(), cands); !errors.Is(err, ErrUnreachable) {
			t.Fatal(err)
		}
	}
	up = true
	for range 3 {
		res, err := d.Dial(context.Background(), cands)
		if err != nil {
			t.Fatal(err)
		}
		res.Conn.Close()
	}
	down, back := logs.FilterMessage("gateway unreachable: its keys go to their next choice"), logs.FilterMessage("gateway reachable again")
	if down.Len() != 1 || back.Len() != 1 || down.All()[0].ContextMap()["gateway"] != "gw-1" {
		t.Fatalf("logs: %v", logs.All())
	}
}

// TestDialerAdmit: Admit is asked before each attempt, for the gateway
// being tried (a failover's second choice too); its refusal ends the Dial
// without trying the next candidate.
func TestDialerAdmit(t *testing.T) {
	live, dead := listener(t), deadAddr(t)
	refuse := errors.New("no token")
	var asked []string
	d := &Dialer{Cooldown: -1, Admit: func(_ context.Context, gw Gateway) error {
		asked = append(asked, gw.ID)
		if gw.ID == "busy" {
			return refuse
		}
		return nil
	}}
	res, err := d.Dial(context.Background(), []Gateway{{ID: "dead", Addr: dead}, {ID: "live", Addr: live}})
	if err != nil {
		t.Fatal(err)
	}
	res.Conn.Close()
	if strings.Join(asked, ",") != "dead,live" {
		t.Fatalf("admission asked for %v, want dead,live", asked)
	}
	asked = nil
	_, err = d.Dial(context.Background(), []Gateway{{ID: "busy", Addr: live}, {ID: "live", Addr: live}})
	if !errors.Is(err, refuse) || strings.Join(asked, ",") != "busy" {
		t.Fatalf("Dial = %v after asking %v; want the refusal, and no other candidate tried", err, asked)
	}
}

// TestDialerUnreachable: a gateway whose last attempt failed stays
// unreachable after its cooldown, until an attempt to it succeeds.
func TestDialerUnreachable(t *testing.T) {
	live := listener(t)
	var refuse atomic.Bool
	refuse.Store(true)
	clk := &fakeClock{now: time.Unix(1000, 0)}
	d := &Dialer{Now: clk.Now, Cooldown: time.Second, MaxTries: 1,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			if refuse.Load() {
				return nil, syscall.ECONNREFUSED
			}
			return (&net.Dialer{}).DialContext(ctx, network, live)
		}}
	gw := []Gateway{{ID: "gw", Addr: "gateway:9000"}}
	if d.Unreachable("gw") {
		t.Fatal("unreachable before any attempt")
	}
	if _, err := d.Dial(context.Background(), gw); err == nil {
		t.Fatal("refused dial succeeded")
	}
	clk.Add(2 * time.Second)
	if d.CoolingDown("gw") || !d.Unreachable("gw") {
		t.Fatalf("after the cooldown: cooling %v, unreachable %v; want false, true", d.CoolingDown("gw"), d.Unreachable("gw"))
	}
	refuse.Store(false)
	res, err := d.Dial(context.Background(), gw)
	if err != nil {
		t.Fatal(err)
	}
	res.Conn.Close()
	if d.Unreachable("gw") {
		t.Fatal("still unreachable after a successful attempt")
	}
}

// TestDialerPickDialAfter checks that an event loop's split dial (Pick, its
// own attempt, then Connected or DialAfter) makes exactly the attempts Dial
// makes and leaves the same cooldowns behind.
func TestDialerPickDialAfter(t *testing.T) {
	errRefused := fmt.Errorf("connect: %w", syscall.ECONNREFUSED)
	ids := []string{"a", "b", "c", "d"}
	tests := []struct {
		name     string
		cooling  string // IDs cooling down before the dial
		failing  string // IDs whose connect fails
		maxTries int
	}{
		{"owner up", "", "", 0},
		{"owner down", "", "a", 0},
		{"owner cooling", "a", "", 0},
		{"owner cooling and next failing", "a", "b", 0},
		{"all cooling", "abcd", "", 0},
		{"all cooling first failing", "abcd", "a", 0},
		{"all failing", "", "abcd", 0},
		{"all failing more tries", "", "abcd", 6},
		{"some cooling all failing", "bd", "abcd", 8},
		{"one try", "", "a", 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Each dialer gets the same state; trace records the attempts.
			setup := func(trace *[]string) *Dialer {
				clk := &fakeClock{now: time.Unix(1000, 0)}
				d := &Dialer{Now: clk.Now, MaxTries: tt.maxTries}
				d.DialContext = func(_ context.Context, _, addr string) (net.Conn, error) {
					*trace = append(*trace, addr)
					if strings.Contains(tt.failing, addr) {
						return nil, errRefused
					}
					c1, c2 := net.Pipe()
					c2.Close()
					return c1, nil
				}
				for _, id := range tt.cooling {
					d.markDown(string(id), errRefused)
				}
				return d
			}
			var cands []Gateway
			for _, id := range ids {
				cands = append(cands, Gateway{ID: id, Addr: id})
			}

			var want, got []string
			d1 := setup(&want)
			wantRes, wantErr := d1.Dial(context.Background(), cands)

			d2 := setup(&got)
			a, ok := d2.Pick(cands)
			if !ok {
				t.Fatal("Pick declined")
			}
			got = append(got, a.Gateway.Addr) // the caller's own attempt
			var gotRes Result
			var gotErr error
			if strings.Contains(tt.failing, a.Gateway.Addr) {
				gotRes, gotErr = d2.DialAfter(context.Background(), cands, a, errRefused)
			} else {
				d2.Connected(a)
				gotRes = Result{Gateway: a.Gateway, Attempts: 1}
			}
			if strings.Join(got, ",") != strings.Join(want, ",") {
				t.Fatalf("attempts %v, Dial made %v", got, want)
			}
			if (gotErr == nil) != (wantErr == nil) || gotRes.Attempts != wantRes.Attempts ||
				gotRes.Gateway.ID != wantRes.Gateway.ID || len(gotRes.Failed) != len(wantRes.Failed) {
				t.Fatalf("got %+v, %v; Dial gave %+v, %v", gotRes, gotErr, wantRes, wantErr)
			}
			for _, id := range ids {
				if d1.CoolingDown(id) != d2.CoolingDown(id) {
					t.Fatalf("%s cooling %v, after Dial %v", id, d2.CoolingDown(id), d1.CoolingDown(id))
				}
			}
			if wantRes.Conn != nil {
				wantRes.Conn.Close()
			}
			if gotRes.Conn != nil {
				gotRes.Conn.Close()
			}
		})
	}

	t.Run("declines", func(t *testing.T) {
		if _, ok := (&Dialer{}).Pick(nil); ok {
			t.Fatal("Pick accepted no candidates")
		}
		d := &Dialer{Admit: func(context.Context, Gateway) error { return nil }}
		if _, ok := d.Pick([]Gateway{{ID: "a"}}); ok {
			t.Fatal("Pick accepted with an Admit hook")
		}
	})
	t.Run("local resources", func(t *testing.T) {
		d := &Dialer{}
		cands := []Gateway{{ID: "a", Addr: "a"}, {ID: "b", Addr: "b"}}
		a, _ := d.Pick(cands)
		_, err := d.DialAfter(context.Background(), cands, a, fmt.Errorf("socket: %w", syscall.EMFILE))
		if !errors.Is(err, ErrLocalResources) || d.CoolingDown("a") {
			t.Fatalf("err = %v, cooling %v: a local shortage blamed the gateway", err, d.CoolingDown("a"))
		}
	})
}
