//go:build linux

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tether-proxy/tether/pkg/directory"
	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route/redisbind"
)

// lookupSection measures what a dispatch service pays to find a key's
// gateway: GET /lookup (one key) and POST /lookup (1000 keys) on a proxy's
// admin port, the same lookups in process with pkg/directory, and, as the
// floor both stand on, the Redis reads alone (one GET; 1000 GETs in one
// pipeline) from the same client. Every key has a binding in a real
// redis-server. Sequential requests from one client, keep-alive; the
// three are interleaved round by round.
func lookupSection(b *strings.Builder, o options) error {
	singles, batches, nRounds := 2000, 100, 4
	if o.quick {
		singles, batches, nRounds = 50, 5, 1
	}
	progress("lookup: %d single and %d 1000-key lookups per round, %d rounds, proxy vs pkg/directory vs Redis alone", singles, batches, nRounds)
	e := &env{o: o}
	defer e.stop()
	port, err := freePort()
	if err != nil {
		return err
	}
	redisAddr := fmt.Sprintf("127.0.0.1:%d", port)
	rd, err := startProc("redis-server", redisAddr, false, "redis-server", "--port", fmt.Sprint(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
	if err != nil {
		return err
	}
	e.procs = append(e.procs, rd)
	var gws []ring.Member
	args := []string{"--redis", "redis://" + redisAddr, "--log-level", "warn"}
	for i := 1; i <= 3; i++ {
		id := fmt.Sprintf("gw-%d", i)
		s, err := e.start(id, fmt.Sprintf("127.0.1.%d", i), filepath.Join(o.bin, "gateway-stub"), "--id", id, "--proxy-protocol", "optional", "--log-level", "warn")
		if err != nil {
			return err
		}
		gws = append(gws, ring.Member{ID: id, Addr: s.addr, Weight: 1})
		args = append(args, "--gateway", id+"="+s.addr)
	}
	adminPort, err := freePort()
	if err != nil {
		return err
	}
	admin := fmt.Sprintf("127.0.0.1:%d", adminPort)
	if _, err := e.start("tether", "127.0.0.1", filepath.Join(o.bin, "proxy"), append(args, "--admin", admin)...); err != nil {
		return err
	}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
	if err := waitHealthy(hc, admin); err != nil {
		return err
	}

	rc, err := redisbind.NewClient("redis://"+redisAddr, time.Second)
	if err != nil {
		return err
	}
	defer rc.Close()
	ctx := context.Background()
	const bound = 20000
	keys := make([]string, bound)
	if _, err := rc.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i := range keys {
			keys[i] = fmt.Sprintf("user-%d", i)
			p.Set(ctx, redisbind.KeyPrefix+keys[i], gws[i%3].ID, time.Hour)
		}
		return nil
	}); err != nil {
		return fmt.Errorf("fill bindings: %w", err)
	}
	dir, err := directory.New(directory.Config{Gateways: gws, Redis: rc, Timeout: time.Second})
	if err != nil {
		return err
	}
	defer dir.Close()
	batchOf := func(i int) []string { s := (i * 1000) % (bound - 1000); return keys[s : s+1000] }

	type way struct {
		name          string
		single, batch func(i int) error
	}
	ways := []way{
		{"proxy `/lookup`",
			func(i int) error { return getLookup(hc, admin, keys[i%bound]) },
			func(i int) error { return postLookup(hc, admin, batchOf(i)) }},
		{"`pkg/directory`",
			func(i int) error { a, err := dir.Lookup(ctx, keys[i%bound]); return checkAnswers(err, a) },
			func(i int) error { a, err := dir.LookupMany(ctx, batchOf(i)); return checkAnswers(err, a...) }},
		{"Redis alone",
			func(i int) error { return rc.Get(ctx, redisbind.KeyPrefix+keys[i%bound]).Err() },
			func(i int) error {
				_, err := rc.Pipelined(ctx, func(p redis.Pipeliner) error {
					for _, k := range batchOf(i) {
						p.Get(ctx, redisbind.KeyPrefix+k)
					}
					return nil
				})
				return err
			}},
	}
	single := make(map[string][]time.Duration)
	batch := make(map[string][]time.Duration)
	timeIt := func(n int, f func(int) error) ([]time.Duration, error) {
		out := make([]time.Duration, 0, n)
		for i := range n {
			t0 := time.Now()
			if err := f(i); err != nil {
				return nil, err
			}
			out = append(out, time.Since(t0))
		}
		return out, nil
	}
	for r := range nRounds {
		order := append([]way(nil), ways...)
		if r%2 == 1 {
			for i, j := 0, len(order)-1; i < j; i, j = i+1, j-1 {
				order[i], order[j] = order[j], order[i]
			}
		}
		for _, w := range order {
			s, err := timeIt(singles, w.single)
			if err != nil {
				return fmt.Errorf("%s single: %w", w.name, err)
			}
			bt, err := timeIt(batches, w.batch)
			if err != nil {
				return fmt.Errorf("%s batch: %w", w.name, err)
			}
			single[w.name] = append(single[w.name], s...)
			batch[w.name] = append(batch[w.name], bt...)
		}
	}
	fmt.Fprintf(b, "## Lookups for dispatch services\n\nWhere a key's session is, asked of a proxy's admin API (`GET /lookup?key=`, `POST /lookup` with 1000 keys), of `pkg/directory` in the caller's process, and of Redis alone (a GET; 1000 GETs in one pipeline: the floor under both, since every key has a binding). One client, sequential requests, HTTP keep-alive; %d rounds alternating the order; %d single and %d batch requests per round and way; latency per request.\n\n", nRounds, singles, batches)
	fmt.Fprintf(b, "| way | single p50 | single p99 | 1000-key batch p50 | batch p99 | batch keys/s |\n|---|---|---|---|---|---|\n")
	for _, w := range ways {
		s, bt := sorted(single[w.name]), sorted(batch[w.name])
		fmt.Fprintf(b, "| %s | %s | %s | %s | %s | %.0f |\n", w.name, us(percentile(s, 0.50)), us(percentile(s, 0.99)), us(percentile(bt, 0.50)), us(percentile(bt, 0.99)),
			1000/percentile(bt, 0.50).Seconds())
	}
	p, r := sorted(single[ways[0].name]), sorted(single[ways[2].name])
	pb, rb := sorted(batch[ways[0].name]), sorted(batch[ways[2].name])
	fmt.Fprintf(b, "\nproxy / Redis alone at p50: single %.2f, batch %.2f.\n\n", float64(percentile(p, 0.50))/float64(percentile(r, 0.50)), float64(percentile(pb, 0.50))/float64(percentile(rb, 0.50)))
	return nil
}

func sorted(d []time.Duration) []time.Duration {
	out := append([]time.Duration(nil), d...)
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

func us(d time.Duration) string { return fmt.Sprintf("%.0f µs", float64(d)/float64(time.Microsecond)) }

// waitHealthy waits for a proxy's admin server to answer /healthz.
func waitHealthy(hc *http.Client, admin string) error {
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := hc.Get("http://" + admin + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("admin %s not healthy: %v", admin, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func getLookup(hc *http.Client, admin, key string) error {
	resp, err := hc.Get("http://" + admin + "/lookup?key=" + key)
	if err != nil {
		return err
	}
	return checkLookup(resp, 1)
}

func postLookup(hc *http.Client, admin string, keys []string) error {
	body, _ := json.Marshal(map[string][]string{"keys": keys})
	resp, err := hc.Post("http://"+admin+"/lookup", "application/json", bytes.NewReader(body))
	if err != nil {
		return err
	}
	return checkLookup(resp, len(keys))
}

// checkAnswers checks that every answer came from a binding.
func checkAnswers(err error, ans ...directory.Answer) error {
	if err != nil {
		return err
	}
	for _, a := range ans {
		if a.Source != directory.SourceBinding {
			return fmt.Errorf("directory: %s answered by %s, want binding", a.Key, a.Source)
		}
	}
	return nil
}

// checkLookup reads a lookup answer and checks it holds n binding results.
func checkLookup(resp *http.Response, n int) error {
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != 200 {
		return fmt.Errorf("lookup: %d %s", resp.StatusCode, raw)
	}
	if got := bytes.Count(raw, []byte(`"source":"binding"`)); got != n {
		return fmt.Errorf("lookup: %d binding answers, want %d: %.200s", got, n, raw)
	}
	return nil
}
