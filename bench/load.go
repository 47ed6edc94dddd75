//go:build linux

package main

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/pkg/proto"
)

// sources are the loopback client addresses connections are spread over,
// so ephemeral ports and TIME_WAIT never limit a run.
var sources = []string{"127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8", "127.0.0.9"}

// tlsTargets maps the addresses of targets that terminate TLS to the
// client configuration for them: open speaks TLS to those.
var tlsTargets sync.Map // addr → *tls.Config

// conn is a client connection: TCP, or TLS over it.
type conn interface {
	net.Conn
	CloseWrite() error
}

// open connects from src (over TLS for a TLS target), sends a hello for
// key and reads the reply.
func open(addr, src, key string) (conn, error) {
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	var tc conn = c.(*net.TCPConn)
	if cfg, ok := tlsTargets.Load(addr); ok {
		t := tls.Client(c, cfg.(*tls.Config))
		_ = t.SetDeadline(time.Now().Add(10 * time.Second))
		if err := t.Handshake(); err != nil {
			c.Close()
			return nil, err
		}
		tc = t
	}
	h, _ := proto.AppendHello(nil, []byte(key), nil)
	_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := tc.Write(h); err != nil {
		tc.Close()
		return nil, err
	}
	rep, _, err := stub.ReadReply(tc)
	if err != nil {
		tc.Close()
		return nil, err
	}
	if rep.Key != key {
		tc.Close()
		return nil, fmt.Errorf("reply for key %q, sent %q", rep.Key, key)
	}
	_ = tc.SetDeadline(time.Time{})
	return tc, nil
}

func reset(c conn) {
	if t, ok := c.(*tls.Conn); ok {
		_ = t.NetConn().(*net.TCPConn).SetLinger(0)
		t.NetConn().Close()
		return
	}
	_ = c.(*net.TCPConn).SetLinger(0)
	c.Close()
}

// bulk moves total bytes each way over n concurrent streams (every stream
// writes its share and reads the echo back), after the opened sessions sat
// idle for idle, and returns bytes per second in one direction.
func bulk(addr string, n int, total int64, idle time.Duration) (float64, error) {
	per := total / int64(n)
	conns := make([]conn, n)
	for i := range conns {
		c, err := open(addr, sources[i%len(sources)], fmt.Sprintf("bulk-%d", i))
		if err != nil {
			return 0, err
		}
		defer c.Close()
		conns[i] = c
	}
	time.Sleep(idle) // > --park-after: tether has parked the sessions
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	start := time.Now()
	for _, c := range conns {
		wg.Add(2)
		go func() {
			defer wg.Done()
			buf := bytes.Repeat([]byte{'x'}, 256<<10)
			for left := per; left > 0; {
				m := min(int64(len(buf)), left)
				if _, err := c.Write(buf[:m]); err != nil {
					errs <- err
					return
				}
				left -= m
			}
			_ = c.CloseWrite()
		}()
		go func() {
			defer wg.Done()
			got, err := io.Copy(io.Discard, io.LimitReader(c, per))
			if err == nil && got != per {
				err = fmt.Errorf("echoed %d of %d bytes", got, per)
			}
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	if err := <-errs; err != nil {
		return 0, err
	}
	return float64(per*int64(n)) / elapsed.Seconds(), nil
}

// connRate opens, greets and resets connections with workers in parallel
// for d (or until max connections) and returns connections per second.
func connRate(addr string, workers int, d time.Duration, max int64) (float64, int64, error) {
	rate, n, _, err := connRateLat(addr, workers, d, max)
	return rate, n, err
}

// connRateLat is connRate that also returns each connection's time from
// dial to reset, for --load connrate's percentiles.
func connRateLat(addr string, workers int, d time.Duration, max int64) (float64, int64, []time.Duration, error) {
	var done, failed atomic.Int64
	lats := make([][]time.Duration, workers)
	var firstOnce sync.Once // the first failure's error; read after wg.Wait
	var firstErr error
	stop := time.Now().Add(d)
	start := time.Now()
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Now().Before(stop) && done.Load() < max; i++ {
				t0 := time.Now()
				c, err := open(addr, sources[(w+i)%len(sources)], fmt.Sprintf("cr-%d-%d", w, i%64))
				if err != nil {
					failed.Add(1)
					firstOnce.Do(func() { firstErr = err })
					continue
				}
				reset(c)
				lats[w] = append(lats[w], time.Since(t0))
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if f := failed.Load(); f > done.Load()/1000 {
		return 0, done.Load(), nil, fmt.Errorf("%d of %d connections failed: %v", f, f+done.Load(), firstErr)
	}
	var all []time.Duration
	for _, l := range lats {
		all = append(all, l...)
	}
	slices.Sort(all)
	return float64(done.Load()) / elapsed.Seconds(), done.Load(), all, nil
}

// latency runs sessions concurrent ping-pong loops of 64-byte messages and
// returns the round-trip times.
func latency(addr string, sessions, msgs int) ([]time.Duration, error) {
	var mu sync.Mutex
	var all []time.Duration
	var wg sync.WaitGroup
	errs := make(chan error, sessions)
	for s := range sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := open(addr, sources[s%len(sources)], fmt.Sprintf("lat-%d", s))
			if err != nil {
				errs <- err
				return
			}
			defer reset(c)
			msg := bytes.Repeat([]byte{'p'}, 64)
			buf := make([]byte, 64)
			rtts := make([]time.Duration, 0, msgs)
			for range msgs {
				t0 := time.Now()
				if _, err := c.Write(msg); err != nil {
					errs <- err
					return
				}
				if _, err := io.ReadFull(c, buf); err != nil {
					errs <- err
					return
				}
				rtts = append(rtts, time.Since(t0))
			}
			mu.Lock()
			all = append(all, rtts...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return nil, err
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	return all, nil
}

func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p * float64(len(sorted)-1))
	return sorted[i]
}

// idleCost opens n sessions through addr, lets them sit for settle, and
// returns the growth of the measured process's RSS and descriptors per
// session. Sampled sessions (all of them with checkAll) must still echo
// afterwards.
func idleCost(addr string, pid, n int, settle time.Duration, checkAll bool) (rssPer, fdPer float64, err error) {
	before, err := statsOf(pid)
	if err != nil {
		return 0, 0, err
	}
	conns, err := openMany(addr, n)
	defer func() {
		for _, c := range conns {
			reset(c)
		}
	}()
	if err != nil {
		return 0, 0, err
	}
	time.Sleep(settle) // let the process reach its idle state (goroutines parked, GC run)
	after, err := statsOf(pid)
	if err != nil {
		return 0, 0, err
	}
	for i, c := range conns {
		if i%97 != 0 && !checkAll {
			continue
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			return 0, 0, err
		}
		buf := make([]byte, 4)
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
			return 0, 0, errors.Join(errors.New("idle session stopped echoing"), err)
		}
	}
	return float64(after.rss-before.rss) / float64(n), float64(after.fds-before.fds) / float64(n), nil
}

// openMany opens n sessions through addr from 32 goroutines, the way a
// reconnect wave arrives, and returns those that opened.
func openMany(addr string, n int) ([]conn, error) {
	conns := make([]conn, 0, n)
	var mu sync.Mutex
	var wg sync.WaitGroup
	var openErr error // the first failure's; guarded by mu
	next := make(chan int)
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				c, err := open(addr, sources[i%len(sources)], fmt.Sprintf("idle-%d", i))
				if err != nil {
					mu.Lock()
					if openErr == nil {
						openErr = err
					}
					mu.Unlock()
					continue
				}
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
			}
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	if openErr != nil {
		return conns, fmt.Errorf("opened %d of %d idle sessions: %v", len(conns), n, openErr)
	}
	return conns, nil
}

// wakeLatency opens n sessions, leaves them idle for idle (past tether's
// --park-after, so they are parked), then sends one 4-byte message on
// each in turn and returns the round trips: the latency of a push to a
// quiet session.
func wakeLatency(addr string, n int, idle time.Duration) ([]time.Duration, error) {
	conns, err := openMany(addr, n)
	defer func() {
		for _, c := range conns {
			reset(c)
		}
	}()
	if err != nil {
		return nil, err
	}
	time.Sleep(idle)
	out := make([]time.Duration, 0, n)
	buf := make([]byte, 4)
	for _, c := range conns {
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		t0 := time.Now()
		if _, err := c.Write([]byte("wake")); err != nil {
			return nil, err
		}
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "wake" {
			return nil, errors.Join(errors.New("parked session did not echo"), err)
		}
		out = append(out, time.Since(t0))
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out, nil
}
