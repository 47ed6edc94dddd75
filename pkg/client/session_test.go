package client

import (
	"context"
	"errors"
	"math"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"
)

func TestBackoffBoundsAndSpread(t *testing.T) {
	b := Backoff{Rand: rand.New(rand.NewPCG(1, 2)).Float64}
	for attempt, ceil := range []time.Duration{250 * time.Millisecond, 500 * time.Millisecond, time.Second, 2 * time.Second} {
		var sum float64
		const n = 4000
		lo, hi := time.Duration(math.MaxInt64), time.Duration(0)
		for range n {
			d := b.Delay(attempt)
			if d < 0 || d >= ceil {
				t.Fatalf("attempt %d: delay %v outside [0, %v)", attempt, d, ceil)
			}
			lo, hi = min(lo, d), max(hi, d)
			sum += float64(d)
		}
		// Full jitter: uniform over the range, so the mean is near half
		// the ceiling and the draws reach both ends.
		if mean := sum / n / float64(ceil); mean < 0.45 || mean > 0.55 {
			t.Errorf("attempt %d: mean %.3f of the ceiling, want about 0.5", attempt, mean)
		}
		if lo > ceil/20 || hi < ceil*19/20 {
			t.Errorf("attempt %d: draws span [%v, %v] of [0, %v)", attempt, lo, hi, ceil)
		}
	}
	for _, attempt := range []int{7, 20, 63, 1000} {
		if d := (Backoff{Rand: func() float64 { return 0.999999 }}).Delay(attempt); d >= DefaultBackoffCap || d < DefaultBackoffCap*99/100 {
			t.Errorf("attempt %d: %v, want just under the 30s cap", attempt, d)
		}
	}
}

// server accepts connections and runs handle on each.
func server(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); handle(c) }()
		}
	}()
	return ln.Addr().String()
}

// gateway reads a hello and answers with a reply frame.
func gateway(id string) func(net.Conn) {
	return func(c net.Conn) {
		buf := make([]byte, 512)
		if _, err := c.Read(buf); err != nil {
			return
		}
		rep, _ := AppendReply(nil, Reply{Gateway: id})
		c.Write(rep)
		c.Read(buf) // until the client closes
	}
}

func TestDialRotatesAndRecognisesRefusal(t *testing.T) {
	a, b := server(t, gateway("a")), server(t, gateway("b"))
	refuser := server(t, func(c net.Conn) { c.(*net.TCPConn).SetLinger(0) }) // reset, zero bytes
	d := &Dialer{Proxies: []string{a, b, refuser}, ReadReply: true, Timeout: 2 * time.Second}
	var got []string
	for range 3 {
		c, err := d.Dial(context.Background(), "k", nil)
		if err != nil {
			if !errors.Is(err, ErrNoReply) {
				t.Fatalf("refusal = %v, want ErrNoReply", err)
			}
			got = append(got, "refused")
			continue
		}
		got = append(got, c.Reply.Gateway)
		c.Close()
	}
	if got[0] != "a" || got[1] != "b" || got[2] != "refused" {
		t.Fatalf("rotation %v, want a, b, refused", got)
	}
}

// TestSessionBacksOffAndStops: a session whose proxy refuses keeps backing
// off (no tight loop), reconnects when it answers, and returns when its
// context ends.
func TestSessionBacksOffAndStops(t *testing.T) {
	var mu sync.Mutex
	refusing := true
	addr := server(t, func(c net.Conn) {
		mu.Lock()
		r := refusing
		mu.Unlock()
		if r {
			c.(*net.TCPConn).SetLinger(0)
			return
		}
		gateway("gw")(c)
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var delays []time.Duration
	var errs []error
	connected := make(chan *Conn, 1)
	s := &Session{
		Dialer:  &Dialer{Proxies: []string{addr}, ReadReply: true, Timeout: 2 * time.Second},
		Key:     "k",
		Backoff: Backoff{Rand: func() float64 { return 0.5 }},
		Sleep: func(ctx context.Context, d time.Duration) error {
			delays = append(delays, d)
			if len(delays) == 4 {
				mu.Lock()
				refusing = false
				mu.Unlock()
			}
			return ctx.Err()
		},
		OnDisconnect: func(err error, _ time.Duration) { errs = append(errs, err) },
		OnConnect:    func(c *Conn) { connected <- c },
	}
	done := make(chan error, 1)
	go func() {
		done <- s.Run(ctx, func(ctx context.Context, c *Conn) error {
			<-ctx.Done()
			return ctx.Err()
		})
	}()
	c := <-connected
	if c.Reply.Gateway != "gw" {
		t.Fatalf("reply %+v", c.Reply)
	}
	want := []time.Duration{125 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond, time.Second}
	for i, d := range want {
		if delays[i] != d {
			t.Fatalf("delays %v, want %v (half of each full-jitter ceiling)", delays, want)
		}
		if !errors.Is(errs[i], ErrNoReply) {
			t.Fatalf("failure %d: %v, want ErrNoReply", i, errs[i])
		}
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run = %v, want context.Canceled", err)
	}
}
