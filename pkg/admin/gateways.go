package admin

import (
	"sort"

	"github.com/tether-proxy/tether/pkg/cluster"
	"github.com/tether-proxy/tether/pkg/ring"
)

// GatewayView assembles /gateways from the parts of a proxy that know each
// fact: the ring (addresses, weights), the Syncer (sources, gossip states,
// operator drains, ID conflicts), the dialer (liveness) and the server
// (open sessions).
type GatewayView struct {
	// Ring is the ring in use; required.
	Ring *ring.Holder
	// Syncer keeps the ring; required.
	Syncer *cluster.Syncer
	// Live reports whether the proxy dials gateway id now (false while it
	// cools down after a failure); nil means always.
	Live func(id string) bool
	// Sessions returns open sessions by gateway ID; nil means none.
	Sessions func() map[string]int
	// Rate is the per-gateway rate limit (--gateway-rate); nil means off.
	Rate RateLimits
}

// RateLimits is what the view shows of a per-gateway rate limit
// (*proxy.GatewayRate).
type RateLimits interface {
	// PerSecond is the limit.
	PerSecond() float64
	// Limited reports whether gateway id refused a session lately.
	Limited(id string) bool
	// Refused counts the sessions gateway id refused.
	Refused(id string) uint64
}

// Rows returns one row per gateway in the ring, sorted by ID; it is what
// Config.Gateways wants.
func (v GatewayView) Rows() []GatewayStatus {
	sources, states := v.Syncer.Sources(), v.Syncer.States()
	var sessions map[string]int
	if v.Sessions != nil {
		sessions = v.Sessions()
	}
	conflicts := map[string][]Claimant{}
	for _, c := range v.Syncer.Conflicts() {
		for i, g := range c.Claimants {
			conflicts[c.ID] = append(conflicts[c.ID], Claimant{Node: g.Node, Addr: g.Addr, State: string(g.State), Routing: i == 0})
		}
	}
	var out []GatewayStatus
	for _, m := range v.Ring.Load().Members() {
		st := GatewayStatus{
			ID: m.ID, Addr: m.Addr, Weight: m.Weight, State: string(cluster.StateActive),
			Live: v.Live == nil || v.Live(m.ID), Source: sources[m.ID], AdminDrained: v.Syncer.Drained(m.ID),
			ActiveSessions: sessions[m.ID], Conflict: conflicts[m.ID],
		}
		if v.Rate != nil {
			st.RateLimit, st.RateLimited, st.RateRefused = v.Rate.PerSecond(), v.Rate.Limited(m.ID), v.Rate.Refused(m.ID)
		}
		if m.Weight == 0 || states[m.ID] == cluster.StateDraining || st.AdminDrained {
			st.State = string(cluster.StateDraining)
		}
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}
