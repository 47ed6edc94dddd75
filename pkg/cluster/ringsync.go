package cluster

import (
	"context"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/tether-proxy/tether/pkg/ring"
)

// BuildRing merges a static gateway list with the gateways gossip reports
// into one ring. A gossiped gateway replaces a static one with the same ID
// (gossip knows its current state). When several live nodes claim one ID —
// a gateway restarted under a new node name before the old one was declared
// dead — an active claim beats a draining one, then the smaller node name
// wins, so every proxy picks the same. Draining gateways get weight 0.
func BuildRing(static []ring.Member, gws []GatewayInfo) (*ring.Ring, error) {
	byID := make(map[string]ring.Member, len(static)+len(gws))
	for _, m := range static {
		byID[m.ID] = m
	}
	chosen := make(map[string]GatewayInfo, len(gws))
	for _, g := range gws {
		if prev, ok := chosen[g.ID]; ok && !better(g, prev) {
			continue
		}
		chosen[g.ID] = g
	}
	for id, g := range chosen {
		w := g.Weight
		if g.State != StateActive {
			w = 0
		}
		byID[id] = ring.Member{ID: id, Addr: g.Addr, Weight: w}
	}
	members := make([]ring.Member, 0, len(byID))
	for _, m := range byID {
		members = append(members, m)
	}
	return ring.New(members)
}

func better(a, b GatewayInfo) bool {
	if (a.State == StateActive) != (b.State == StateActive) {
		return a.State == StateActive
	}
	return a.Node < b.Node
}

// DefaultSettle is how long Sync waits after a change for more changes
// before rebuilding, so a burst of joins costs one rebuild.
const DefaultSettle = 50 * time.Millisecond

// Sync keeps h current: it builds a ring from static plus m's gateways now
// and after every change, until ctx is done. onUpdate, if set, runs after
// each rebuild (for metrics). m may be nil for a static-only proxy.
func Sync(ctx context.Context, m Membership, static []ring.Member, h *ring.Holder, log *zap.Logger, onUpdate func(*ring.Ring, []GatewayInfo)) {
	if log == nil {
		log = zap.NewNop()
	}
	rebuild := func() {
		var gws []GatewayInfo
		if m != nil {
			gws = m.Gateways()
		}
		r, err := BuildRing(static, gws)
		if err != nil {
			// Only possible with invalid weights or IDs from gossip;
			// keep serving on the previous ring.
			log.Error("cannot build ring; keeping the previous one", zap.Error(err))
			return
		}
		prev := h.Swap(r)
		if !slices.Equal(prev.Members(), r.Members()) {
			log.Info("ring updated", zap.Int("gateways", len(r.Members())), zap.Int("taking_keys", r.Len()))
		}
		if onUpdate != nil {
			onUpdate(r, gws)
		}
	}
	rebuild()
	if m == nil {
		return
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-m.Changes():
		}
		// Let a burst of events settle, then rebuild once.
		t := time.NewTimer(DefaultSettle)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		rebuild()
	}
}
