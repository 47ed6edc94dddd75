package proxy

import (
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// Live byte accounting. Every session counts the bytes it moves in two
// atomics of its own (one per direction, written only by whoever moves
// that direction, so the data path pays an uncontended add per write); a
// scrape sums the sessions open now with the totals of those that ended.
// Ending a session and scraping both hold Server.mu, so a session's bytes
// move from one sum to the other atomically and the counters never go
// back.

// Directions, the label values of tether_bytes_total.
const (
	dirUp   = 0 // client → gateway
	dirDown = 1 // gateway → client
)

var directions = [2]string{"client_to_gateway", "gateway_to_client"}

var (
	bytesDesc = prometheus.NewDesc("tether_bytes_total",
		"Bytes this proxy moved, by direction (client_to_gateway includes the hello), counted as they move.", []string{"direction"}, nil)
	gatewayBytesDesc = prometheus.NewDesc("tether_gateway_bytes_total",
		"Bytes this proxy moved to and from each gateway, by direction, counted as they move (every gateway in the ring, at 0 before its first session).",
		[]string{"gateway", "direction"}, nil)
)

// byteTotals are the bytes of sessions that ended, by gateway; guarded by
// Server.mu.
type byteTotals struct {
	all   [2]int64
	perGW map[string]*[2]int64
}

// add moves an ending session's bytes into the totals.
func (t *byteTotals) add(ses *session) {
	up, down := ses.moved[dirUp].Load(), ses.moved[dirDown].Load()
	t.all[dirUp] += up
	t.all[dirDown] += down
	if t.perGW == nil {
		t.perGW = make(map[string]*[2]int64)
	}
	g := t.perGW[ses.gwID]
	if g == nil {
		g = new([2]int64)
		t.perGW[ses.gwID] = g
	}
	g[dirUp] += up
	g[dirDown] += down
}

// traffic is the collector of tether_bytes_total and
// tether_gateway_bytes_total; NewMetrics registers it and New attaches
// the server it reads.
type traffic struct {
	server  atomic.Pointer[Server]
	mu      sync.Mutex
	members []string // the ring's gateway IDs (ObserveRing)
}

func (t *traffic) setMembers(ids []string) {
	t.mu.Lock()
	t.members = ids
	t.mu.Unlock()
}

// Describe implements prometheus.Collector.
func (t *traffic) Describe(ch chan<- *prometheus.Desc) {
	ch <- bytesDesc
	ch <- gatewayBytesDesc
}

// Collect implements prometheus.Collector: the ended sessions' totals plus
// every open session's bytes, added as if it ended now.
func (t *traffic) Collect(ch chan<- prometheus.Metric) {
	tot := byteTotals{perGW: map[string]*[2]int64{}}
	t.mu.Lock()
	for _, id := range t.members {
		tot.perGW[id] = new([2]int64)
	}
	t.mu.Unlock()
	if s := t.server.Load(); s != nil {
		s.mu.Lock()
		tot.all = s.ended.all
		for id, v := range s.ended.perGW {
			c := *v
			tot.perGW[id] = &c
		}
		for ses := range s.sessions {
			tot.add(ses)
		}
		s.mu.Unlock()
	}
	for i, dir := range directions {
		ch <- prometheus.MustNewConstMetric(bytesDesc, prometheus.CounterValue, float64(tot.all[i]), dir)
		for id, v := range tot.perGW {
			ch <- prometheus.MustNewConstMetric(gatewayBytesDesc, prometheus.CounterValue, float64(v[i]), id, dir)
		}
	}
}
