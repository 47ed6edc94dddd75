//go:build linux

package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tether-proxy/tether/internal/pidfile"
)

// handoffSection measures a SIGUSR2 upgrade: how long a proxy holding n
// idle sessions takes to hand them all to its new process, and the pause a
// busy echo session sees meanwhile, against the same session's latency
// just before (same run). HAProxy has no counterpart: its reload leaves
// the connections in the old process.
func handoffSection(b *strings.Builder, o options) error {
	n := 9000
	if o.quick {
		n = 100
	}
	progress("handoff: %d idle sessions and one busy echo session across SIGUSR2", n)
	e := &env{o: o}
	defer e.stop()
	stub, err := e.start("gateway-stub", "127.0.1.1", filepath.Join(o.bin, "gateway-stub"),
		"--id", "gw", "--proxy-protocol", "optional", "--log-level", "warn", "--echo-buffer", "4096")
	if err != nil {
		return err
	}
	pidFile := filepath.Join(o.tmp, "upgrade.pid")
	args := append(proxyArgs(stub.addr, "off"), "--pid-file", pidFile, "--upgrade-timeout", "60s", "--log-level", "info")
	p, err := e.start("tether-upgrade", "127.0.0.1", filepath.Join(o.bin, "proxy"), args...)
	if err != nil {
		return err
	}
	defer stopByPidFile(pidFile, p.Pid())
	conns, err := openMany(p.addr, n)
	defer func() {
		for _, c := range conns {
			reset(c)
		}
	}()
	if err != nil {
		return err
	}

	// The busy session: a 64-byte round trip every millisecond.
	type sample struct {
		at  time.Time
		rtt time.Duration
	}
	var mu sync.Mutex
	var samples []sample
	stop := make(chan struct{})
	echoErr := make(chan error, 1)
	ec, err := open(p.addr, sources[0], "busy")
	if err != nil {
		return err
	}
	defer reset(ec)
	go func() {
		msg, buf := make([]byte, 64), make([]byte, 64)
		for {
			select {
			case <-stop:
				echoErr <- nil
				return
			case <-time.After(time.Millisecond):
			}
			_ = ec.SetDeadline(time.Now().Add(10 * time.Second))
			t0 := time.Now()
			if _, err := ec.Write(msg); err != nil {
				echoErr <- err
				return
			}
			if _, err := io.ReadFull(ec, buf); err != nil {
				echoErr <- err
				return
			}
			mu.Lock()
			samples = append(samples, sample{t0, time.Since(t0)})
			mu.Unlock()
		}
	}()
	time.Sleep(2 * time.Second) // the baseline window, and the idle sessions park

	old := p.Pid()
	sig := time.Now()
	if err := syscall.Kill(old, syscall.SIGUSR2); err != nil {
		return err
	}
	deadline := time.Now().Add(90 * time.Second)
	for {
		pid, _ := pidfile.Read(pidFile)
		if pid != old && pid != 0 && !pidfile.Alive(old) {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("upgrade did not finish within 90s:\n%s", p.out)
		}
		time.Sleep(time.Millisecond)
	}
	gone := time.Since(sig)
	time.Sleep(time.Second)
	close(stop)
	if err := <-echoErr; err != nil {
		return fmt.Errorf("busy session during the upgrade: %w", err)
	}
	for i, c := range conns {
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 4)
		if _, err := c.Write([]byte("ping")); err != nil {
			return fmt.Errorf("idle session %d after the upgrade: %w", i, err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			return fmt.Errorf("idle session %d after the upgrade: %w", i, err)
		}
	}
	took, handed, err := upgradeLine(p.out)
	if err != nil {
		return err
	}

	var before, during []time.Duration
	for _, s := range samples {
		switch {
		case s.at.Before(sig) && sig.Sub(s.at) < time.Second:
			before = append(before, s.rtt)
		case !s.at.Before(sig) && s.at.Sub(sig) <= gone:
			during = append(during, s.rtt)
		}
	}
	sort.Slice(before, func(i, j int) bool { return before[i] < before[j] })
	sort.Slice(during, func(i, j int) bool { return during[i] < during[j] })
	us := func(d time.Duration) string { return d.Round(time.Microsecond).String() }
	p99b, p99d := percentile(before, 0.99), percentile(during, 0.99)
	fmt.Fprintf(b, "## Upgrade in place (SIGUSR2)\n\n")
	fmt.Fprintf(b, "One proxy holds %d idle sessions (parked) and one busy session doing a 64-byte round trip every millisecond; it gets SIGUSR2 and re-executes itself. \"Handed\" is the old process's own count and duration (`upgrade: the new process took over`); \"gone\" is from the signal until the pid file names the new process and the old one has exited. Echo latency is the busy session's, in the second before the signal and from the signal until the old process was gone (%d round trips). Every idle session echoed afterwards. HAProxy has no counterpart (its reload leaves connections in the old process).\n\n", n, len(during))
	fmt.Fprintf(b, "| sessions handed | handoff took | per 1,000 sessions | SIGUSR2 → old process gone | echo p99 before | echo p99 across the upgrade | echo max across | p99 across / before |\n|---|---|---|---|---|---|---|---|\n")
	fmt.Fprintf(b, "| %d | %s | %s | %s | %s | %s | %s | %.1f |\n\n", handed, us(took), us(took*1000/time.Duration(max(handed, 1))),
		us(gone), us(p99b), us(p99d), us(percentile(during, 1)), float64(p99d)/float64(max(p99b, 1)))
	return nil
}

// upgradeLine finds the old process's end-of-upgrade line.
func upgradeLine(out *lineLog) (time.Duration, int, error) {
	out.mu.Lock()
	defer out.mu.Unlock()
	for _, l := range out.lines {
		var e struct {
			Msg    string  `json:"msg"`
			Took   float64 `json:"took"`
			Handed int     `json:"sessions_handed"`
		}
		if json.Unmarshal([]byte(l), &e) == nil && e.Msg == "upgrade: the new process took over; this one exits" {
			return time.Duration(e.Took * float64(time.Second)), e.Handed, nil
		}
	}
	return 0, 0, errors.New("no end-of-upgrade log line")
}

// stopByPidFile stops the process the pid file names when it is not the
// one the runner started (a new process after an upgrade).
func stopByPidFile(path string, started int) {
	if pid, err := pidfile.Read(path); err == nil && pid != started {
		pidfile.Stop(pid, 15*time.Second)
	}
}
