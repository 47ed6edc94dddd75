package proxy

import (
	"crypto/tls"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tether-proxy/tether/internal/stub"
	"github.com/tether-proxy/tether/pkg/ring"
)

// TestBytesCountedWhileSessionsRun: on every data path (parked, a
// goroutine per direction, TLS) tether_bytes_total and
// tether_gateway_bytes_total include a session's bytes while it is still
// open, and do not change when it ends (each byte is counted once).
func TestBytesCountedWhileSessionsRun(t *testing.T) {
	const size = 3 << 20
	plain := func(t *testing.T, park bool) (*harness, func() net.Conn) {
		gw := gateway(t, "gw-1", stub.ProxyRequire)
		cfg := DefaultConfig()
		cfg.Park = park
		h := start(t, cfg, ring.Member{ID: "gw-1", Addr: gw, Weight: 1})
		return h, func() net.Conn { return dial(t, h.addr) }
	}
	for _, tc := range []struct {
		name  string
		slack float64 // bytes that may be counted only at the end
		setup func(t *testing.T) (*harness, func() net.Conn)
	}{
		{"parked", 0, func(t *testing.T) (*harness, func() net.Conn) { return plain(t, true) }},
		// Counted per liveChunk: the reply's bytes end a partial chunk.
		{"no-park", liveChunk, func(t *testing.T) (*harness, func() net.Conn) { return plain(t, false) }},
		{"tls", 0, func(t *testing.T) (*harness, func() net.Conn) {
			h, ccfg := tlsProxy(t)
			return h, func() net.Conn {
				c, err := tls.Dial("tcp", h.addr, ccfg)
				if err != nil {
					t.Fatal(err)
				}
				return c
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, connect := tc.setup(t)
			h.m.ObserveRing(h.ring.Load())
			c := connect()
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(20 * time.Second))
			hl := hello(t, "bulk", "")
			if _, err := c.Write(hl); err != nil {
				t.Fatal(err)
			}
			if _, _, err := stub.ReadReply(c); err != nil {
				t.Fatal(err)
			}
			go func() { _, _ = c.Write([]byte(strings.Repeat("x", size))) }()
			if _, err := io.ReadFull(c, make([]byte, size)); err != nil {
				t.Fatal(err)
			}
			// The echo is back and the session still open: the bytes
			// are counted (a moment after they moved: the mover adds
			// them once its write returns).
			var up, down map[string]float64
			deadline := time.Now().Add(10 * time.Second)
			for {
				up, down = gatherTraffic(t, h.m)
				if up["all"] >= size+float64(len(hl)) && down["all"] >= size {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("open session after %d bytes each way: counted up %v down %v", size, up["all"], down["all"])
				}
				time.Sleep(time.Millisecond)
			}
			if h.srv.Active() != 1 {
				t.Fatalf("%d sessions active, want the one still open", h.srv.Active())
			}
			if up["gw-1"] != up["all"] || down["gw-1"] != down["all"] {
				t.Fatalf("per gateway up %v down %v, total %v %v", up["gw-1"], down["gw-1"], up["all"], down["all"])
			}
			c.Close()
			waitFor(t, func() bool { return h.srv.Active() == 0 })
			up2, down2 := gatherTraffic(t, h.m)
			if up2["all"] < up["all"] || down2["all"] < down["all"] || up2["all"] > up["all"]+tc.slack || down2["all"] > down["all"]+tc.slack {
				t.Fatalf("after the end: up %v→%v, down %v→%v; want the same bytes, counted once", up["all"], up2["all"], down["all"], down2["all"])
			}
		})
	}
}

// gatherTraffic gathers the byte counters by gateway ("all" for the total), up
// (client → gateway) and down.
func gatherTraffic(t *testing.T, m *Metrics) (up, down map[string]float64) {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(m.traffic)
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	up, down = map[string]float64{}, map[string]float64{}
	for _, f := range families {
		for _, mt := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range mt.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			gw := "all"
			if f.GetName() == "tether_gateway_bytes_total" {
				gw = labels["gateway"]
			}
			if labels["direction"] == "client_to_gateway" {
				up[gw] = mt.GetCounter().GetValue()
			} else {
				down[gw] = mt.GetCounter().GetValue()
			}
		}
	}
	return up, down
}
