package cluster

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/tether-proxy/tether/pkg/ring"
)

// BuildRing merges a static gateway list with the gateways gossip reports
// into one ring. A gossiped gateway replaces a static one with the same ID
// (gossip knows its current state). When several live nodes claim one ID,
// Claims picks the one every proxy uses. Draining gateways, and those in
// drained (an operator's override), get weight 0; down ones are left out.
func BuildRing(static []ring.Member, gws []GatewayInfo, drained map[string]bool) (*ring.Ring, error) {
	byID := make(map[string]ring.Member, len(static)+len(gws))
	for _, m := range static {
		if _, dup := byID[m.ID]; dup {
			return nil, fmt.Errorf("%w: %q in the static list", ring.ErrDuplicateID, m.ID)
		}
		byID[m.ID] = m
	}
	chosen, _ := Claims(gws)
	for id, g := range chosen {
		if g.State == StateDown {
			delete(byID, id) // out of the ring, as if dead (a static entry too)
			continue
		}
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

// Conflict is a gateway ID claimed by more than one live gossip member: a
// misconfiguration (two gateways started with one --id) or a gateway
// restarted under a new node name before its old one was declared dead.
type Conflict struct {
	// ID is the contested gateway ID.
	ID string `json:"id"`
	// Claimants are the live members claiming ID, the one routing uses
	// first, then the others in the order of the same rule.
	Claimants []GatewayInfo `json:"claimants"`
}

// Claims decides which live member serves each gateway ID, the same way on
// every proxy: an active claim beats a draining one, which beats a down
// one, then the smaller node name wins. It also returns the IDs with more than one claimant, sorted by
// ID.
func Claims(gws []GatewayInfo) (map[string]GatewayInfo, []Conflict) {
	chosen := make(map[string]GatewayInfo, len(gws))
	var all map[string][]GatewayInfo // only built when an ID repeats
	for _, g := range gws {
		prev, dup := chosen[g.ID]
		if dup {
			if all == nil {
				all = map[string][]GatewayInfo{}
			}
			if len(all[g.ID]) == 0 {
				all[g.ID] = append(all[g.ID], prev)
			}
			all[g.ID] = append(all[g.ID], g)
			if !better(g, prev) {
				continue
			}
		}
		chosen[g.ID] = g
	}
	var conflicts []Conflict
	for id, cl := range all {
		sort.Slice(cl, func(i, j int) bool { return better(cl[i], cl[j]) })
		conflicts = append(conflicts, Conflict{ID: id, Claimants: cl})
	}
	sort.Slice(conflicts, func(i, j int) bool { return conflicts[i].ID < conflicts[j].ID })
	return chosen, conflicts
}

func better(a, b GatewayInfo) bool {
	if ra, rb := stateRank(a.State), stateRank(b.State); ra != rb {
		return ra < rb
	}
	return a.Node < b.Node
}

// stateRank orders claims: active, then draining, then down.
func stateRank(s State) int {
	switch s {
	case StateActive:
		return 0
	case StateDraining:
		return 1
	}
	return 2
}

// DefaultSettle is how long a Syncer waits after a gossip change for more
// changes before rebuilding, so a burst of joins costs one rebuild.
const DefaultSettle = 50 * time.Millisecond

// Errors of Syncer.SetDrained.
var (
	// ErrUnknownGateway means no source knows the ID.
	ErrUnknownGateway = errors.New("cluster: unknown gateway")
	// ErrLastActive means the drain would leave no gateway taking new
	// keys; force it to drain anyway.
	ErrLastActive = errors.New("cluster: the last active gateway")
)

// Syncer keeps a ring.Holder current from three inputs: the static gateway
// list (replaceable on reload), gossip membership (optional), and an
// operator's drain overrides. Its methods are safe for concurrent use.
type Syncer struct {
	m        Membership
	h        *ring.Holder
	log      *zap.Logger
	onUpdate func(*ring.Ring)

	mu        sync.Mutex // serialises rebuilds and guards the inputs
	static    []ring.Member
	drained   map[string]bool
	conflicts atomic.Pointer[[]Conflict] // as of the last rebuild; read without mu
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
// now, so routing changes before it returns. Draining the only gateway
// that takes new keys fails with ErrLastActive unless force is set: new
// keys would have nowhere to go.
func (s *Syncer) SetDrained(id string, drained, force bool) error {
	r := s.h.Load()
	m, ok := r.Member(id)
	if !ok {
		return ErrUnknownGateway
	}
	if drained && !force && m.Weight > 0 && r.Len() == 1 {
		return fmt.Errorf("%w: %s is the only gateway taking new keys", ErrLastActive, id)
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

// DrainedIDs returns the gateways an operator drained, sorted.
func (s *Syncer) DrainedIDs() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := make([]string, 0, len(s.drained))
	for id := range s.drained {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
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
	_, conflicts := Claims(gws)
	s.logConflicts(conflicts)
	s.conflicts.Store(&conflicts)
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

// Conflicts returns the gateway IDs claimed by more than one live member
// as of the last rebuild. The slice is the caller's. It does not wait for
// a rebuild, so the update callback may call it.
func (s *Syncer) Conflicts() []Conflict {
	if p := s.conflicts.Load(); p != nil {
		return slices.Clone(*p)
	}
	return nil
}

// logConflicts logs each conflict once when it appears or its claimants
// change, and once when it is over. Called with s.mu held.
func (s *Syncer) logConflicts(now []Conflict) {
	prev := s.Conflicts()
	before := make(map[string]string, len(prev))
	for _, c := range prev {
		before[c.ID] = claimantKey(c)
	}
	for _, c := range now {
		k := claimantKey(c)
		if before[c.ID] != k {
			fields := []zap.Field{zap.String("id", c.ID),
				zap.String("routing_to_node", c.Claimants[0].Node), zap.String("routing_to_addr", c.Claimants[0].Addr)}
			for i, o := range c.Claimants[1:] {
				fields = append(fields, zap.String(fmt.Sprintf("other_node_%d", i+1), o.Node),
					zap.String(fmt.Sprintf("other_addr_%d", i+1), o.Addr), zap.String(fmt.Sprintf("other_state_%d", i+1), string(o.State)))
			}
			s.log.Error("gateway ID claimed by more than one live member: routing to one of them (active first, then the smaller node name); "+
				"give each gateway its own --id", fields...)
		}
		delete(before, c.ID)
	}
	for id := range before {
		s.log.Info("gateway ID conflict over: one claimant left", zap.String("id", id))
	}
}

func claimantKey(c Conflict) string {
	k := ""
	for _, g := range c.Claimants {
		k += g.Node + "@" + g.Addr + "/" + string(g.State) + ";"
	}
	return k
}
