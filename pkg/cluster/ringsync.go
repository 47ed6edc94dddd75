package cluster

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/tether-proxy/tether/pkg/ring"
)

// BuildRing merges a static gateway list with the gateways gossip reports
// into one ring. A gossiped gateway replaces a static one with the same ID
// (gossip knows its current state). When several live nodes claim one ID —
// a gateway restarted under a new node name before the old one was declared
// dead — an active claim beats a draining one, then the smaller node name
// wins, so every proxy picks the same. Draining gateways, and those in
// drained (an operator's override), get weight 0.
func BuildRing(static []ring.Member, gws []GatewayInfo, drained map[string]bool) (*ring.Ring, error) {
	byID := make(map[string]ring.Member, len(static)+len(gws))
	for _, m := range static {
		if _, dup := byID[m.ID]; dup {
			return nil, fmt.Errorf("%w: %q in the static list", ring.ErrDuplicateID, m.ID)
		}
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
		if drained[m.ID] {
			m.Weight = 0
		}
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

// DefaultSettle is how long a Syncer waits after a gossip change for more
// changes before rebuilding, so a burst of joins costs one rebuild.
const DefaultSettle = 50 * time.Millisecond

// ErrUnknownGateway is returned by Syncer.SetDrained for an ID no source
// knows.
var ErrUnknownGateway = errors.New("cluster: unknown gateway")

// Syncer keeps a ring.Holder current from three inputs: the static gateway
// list (replaceable on reload), gossip membership (optional), and an
// operator's drain overrides. Its methods are safe for concurrent use.
type Syncer struct {
	m        Membership
	h        *ring.Holder
	log      *zap.Logger
	onUpdate func(*ring.Ring)

	mu      sync.Mutex // serialises rebuilds and guards the inputs
	static  []ring.Member
	drained map[string]bool
}

// NewSyncer builds the first ring at once. m may be nil (static only);
// onUpdate, if set, runs after every rebuild (for metrics).
func NewSyncer(m Membership, static []ring.Member, h *ring.Holder, log *zap.Logger, onUpdate func(*ring.Ring)) (*Syncer, error) {
	if log == nil {
		log = zap.NewNop()
	}
	s := &Syncer{m: m, h: h, log: log, onUpdate: onUpdate, static: slices.Clone(static), drained: map[string]bool{}}
	return s, s.rebuild()
}

// Run rebuilds after every membership change until ctx is done. Without
// gossip it just waits for ctx.
func (s *Syncer) Run(ctx context.Context) {
	if s.m == nil {
		<-ctx.Done()
		return
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.m.Changes():
		}
		t := time.NewTimer(DefaultSettle)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		if err := s.rebuild(); err != nil {
			// Only possible with invalid weights or IDs from gossip;
			// keep serving on the previous ring.
			s.log.Error("cannot build ring; keeping the previous one", zap.Error(err))
		}
	}
}

// SetStatic replaces the static gateway list (SIGHUP reload) and rebuilds
// now. On error the previous list and ring stay.
func (s *Syncer) SetStatic(ms []ring.Member) error {
	s.mu.Lock()
	prev := s.static
	s.static = slices.Clone(ms)
	s.mu.Unlock()
	if err := s.rebuild(); err != nil {
		s.mu.Lock()
		s.static = prev
		s.mu.Unlock()
		return err
	}
	return nil
}

// SetDrained turns an operator's drain of gateway id on or off and rebuilds
// now, so routing changes before it returns.
func (s *Syncer) SetDrained(id string, drained bool) error {
	if !s.known(id) {
		return ErrUnknownGateway
	}
	s.mu.Lock()
	if drained {
		s.drained[id] = true
	} else {
		delete(s.drained, id)
	}
	s.mu.Unlock()
	return s.rebuild()
}

// Drained reports whether an operator drained gateway id.
func (s *Syncer) Drained(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.drained[id]
}

// Sources says where each known gateway ID comes from: "static", "gossip"
// or "static+gossip".
func (s *Syncer) Sources() map[string]string {
	out := map[string]string{}
	s.mu.Lock()
	for _, m := range s.static {
		out[m.ID] = "static"
	}
	s.mu.Unlock()
	if s.m != nil {
		for _, g := range s.m.Gateways() {
			if out[g.ID] == "static" {
				out[g.ID] = "static+gossip"
			} else {
				out[g.ID] = "gossip"
			}
		}
	}
	return out
}

// States returns the gossip state of each gossiped gateway ID.
func (s *Syncer) States() map[string]State {
	out := map[string]State{}
	if s.m != nil {
		for _, g := range s.m.Gateways() {
			if cur, ok := out[g.ID]; !ok || cur != StateActive {
				out[g.ID] = g.State
			}
		}
	}
	return out
}

func (s *Syncer) known(id string) bool {
	_, ok := s.h.Load().Member(id)
	return ok
}

func (s *Syncer) rebuild() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var gws []GatewayInfo
	if s.m != nil {
		gws = s.m.Gateways()
	}
	r, err := BuildRing(s.static, gws, s.drained)
	if err != nil {
		return err
	}
	prev := s.h.Swap(r)
	if !slices.Equal(prev.Members(), r.Members()) {
		ids := make([]string, 0, r.Len())
		for _, m := range r.Members() {
			if m.Weight > 0 {
				ids = append(ids, m.ID)
			}
		}
		sort.Strings(ids)
		s.log.Info("ring updated", zap.Int("gateways", len(r.Members())), zap.Int("taking_keys", r.Len()), zap.Strings("active", ids))
	}
	if s.onUpdate != nil {
		s.onUpdate(r)
	}
	return nil
}
