package cluster

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tether-proxy/tether/pkg/ring"
)

func gatewayMeta(id string) Meta {
	return Meta{Role: RoleGateway, ID: id, Addr: "127.0.1.1:9000", Weight: 1, State: StateActive}
}

func TestMetaRoundTrip(t *testing.T) {
	for _, m := range []Meta{gatewayMeta("gw-1"), {Role: RoleProxy, ID: "p1", Addr: "127.0.0.1:7000"}, {Role: RoleObserver, ID: "dispatch-1"}} {
		b, err := m.Encode()
		if err != nil {
			t.Fatal(err)
		}
		got, err := DecodeMeta(b)
		m.Version = MetaVersion
		if err != nil || got != m {
			t.Fatalf("round trip %+v → %s → %+v, %v", m, b, got, err)
		}
	}
}

func TestMetaErrors(t *testing.T) {
	huge := gatewayMeta(strings.Repeat("x", 600))
	if _, err := huge.Encode(); !errors.Is(err, ErrMetaTooLarge) {
		t.Fatalf("600-byte id: err = %v", err)
	}
	// Creating a node with such meta is an error, never a memberlist panic.
	var n memberlist.MockNetwork
	if _, err := New(Config{NodeName: "big", Meta: huge, Transport: n.NewTransport("big")}); !errors.Is(err, ErrMetaTooLarge) {
		t.Fatalf("New with oversized meta: err = %v", err)
	}
	bad := []struct {
		name string
		meta Meta
	}{
		{"no role", Meta{ID: "x"}},
		{"no id", Meta{Role: RoleProxy}},
		{"gateway without state", Meta{Role: RoleGateway, ID: "g", Addr: "h:1", Weight: 1}},
		{"gateway without addr", Meta{Role: RoleGateway, ID: "g", Weight: 1, State: StateActive}},
		{"negative weight", Meta{Role: RoleGateway, ID: "g", Addr: "h:1", Weight: -1, State: StateActive}},
	}
	for _, tt := range bad {
		if _, err := tt.meta.Encode(); !errors.Is(err, ErrBadMeta) {
			t.Errorf("%s: err = %v", tt.name, err)
		}
	}
	for in, want := range map[string]error{
		`{"v":2,"r":"proxy","id":"p"}`: ErrMetaVersion,
		`not json`:                     ErrBadMeta,
		``:                             ErrBadMeta,
		`{"v":1,"r":"cook","id":"p"}`:  ErrBadMeta,
	} {
		if _, err := DecodeMeta([]byte(in)); !errors.Is(err, want) {
			t.Errorf("DecodeMeta(%q) = %v, want %v", in, err, want)
		}
	}
}

func TestBuildRing(t *testing.T) {
	static := []ring.Member{{ID: "s1", Addr: "127.0.1.1:1", Weight: 1}, {ID: "dup", Addr: "old:1", Weight: 1}}
	gws := []GatewayInfo{
		{Node: "n-dup", ID: "dup", Addr: "new:1", Weight: 2, State: StateActive},
		{Node: "n-drain", ID: "drain", Addr: "d:1", Weight: 1, State: StateDraining},
		{Node: "b", ID: "twice", Addr: "b:1", Weight: 1, State: StateActive},
		{Node: "a", ID: "twice", Addr: "a:1", Weight: 1, State: StateDraining},
		{Node: "c", ID: "twice", Addr: "c:1", Weight: 1, State: StateActive},
	}
	r, err := BuildRing(static, gws, map[string]bool{"s1": false})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]ring.Member{}
	for _, m := range r.Members() {
		got[m.ID] = m
	}
	want := map[string]ring.Member{
		"s1":    {ID: "s1", Addr: "127.0.1.1:1", Weight: 1},
		"dup":   {ID: "dup", Addr: "new:1", Weight: 2}, // gossip beats static
		"drain": {ID: "drain", Addr: "d:1", Weight: 0}, // draining: no keys
		"twice": {ID: "twice", Addr: "b:1", Weight: 1}, // active beats draining, then smaller node
	}
	if len(got) != len(want) {
		t.Fatalf("members %v", got)
	}
	for id, m := range want {
		if got[id] != m {
			t.Errorf("%s: %+v, want %+v", id, got[id], m)
		}
	}
	if r.Len() != 3 {
		t.Fatalf("%d members take keys, want 3", r.Len())
	}
}

// mockCluster starts nodes on one in-memory network. Transports are made
// up front: MockNetwork is not safe for concurrent registration.
type mockCluster struct {
	net   memberlist.MockNetwork
	trans map[string]*memberlist.MockTransport
}

func newMock(names ...string) *mockCluster {
	m := &mockCluster{trans: map[string]*memberlist.MockTransport{}}
	for _, n := range names {
		m.trans[n] = m.net.NewTransport(n)
	}
	return m
}

func (m *mockCluster) start(t *testing.T, name string, meta Meta, key []byte, join ...string) *Cluster {
	t.Helper()
	var keys [][]byte
	if key != nil {
		keys = [][]byte{key}
	}
	c, err := New(Config{NodeName: name, Meta: meta, Transport: m.trans[name], Join: join, Keys: keys,
		Profile: ProfileLocal, JoinBackoffMax: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Shutdown() })
	return c
}

func waitFor(t *testing.T, what string, cond func() bool, state ...func() string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			for _, s := range state {
				t.Log(s())
			}
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestEventsUpdateRing: joins, drains and leaves on an in-memory network
// reach the proxy's ring through Sync.
func TestEventsUpdateRing(t *testing.T) {
	m := newMock("gw-1", "gw-2", "gw-3", "proxy")
	key := []byte("0123456789abcdef")
	gw1 := m.start(t, "gw-1", gatewayMeta("gw-1"), key)
	gw2 := m.start(t, "gw-2", gatewayMeta("gw-2"), key, gw1.Addr())
	m.start(t, "gw-3", gatewayMeta("gw-3"), key, gw1.Addr())
	p := m.start(t, "proxy", Meta{Role: RoleProxy, ID: "proxy", Addr: "127.0.0.1:7000"}, key, gw2.Addr())

	var h ring.Holder
	syncer, err := NewSyncer(p, nil, &h, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); syncer.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	waitFor(t, "3 gateways in the ring", func() bool { return h.Load().Len() == 3 }, func() string {
		return fmt.Sprintf("proxy sees %v, members %d; gw-1 sees %v", p.Gateways(), p.Members(), gw1.Gateways())
	})
	if p.Members() != 4 {
		t.Fatalf("proxy knows %d members, want 4", p.Members())
	}

	// An operator's drain on the proxy side takes effect before SetDrained
	// returns, and undrain restores it.
	if err := syncer.SetDrained("gw-3", true, false); err != nil {
		t.Fatal(err)
	}
	if h.Load().Len() != 2 || !syncer.Drained("gw-3") {
		t.Fatalf("admin drain not applied: %d take keys", h.Load().Len())
	}
	if err := syncer.SetDrained("gw-3", false, false); err != nil || h.Load().Len() != 3 {
		t.Fatalf("undrain: %v, %d take keys", err, h.Load().Len())
	}
	if err := syncer.SetDrained("nope", true, false); !errors.Is(err, ErrUnknownGateway) {
		t.Fatalf("unknown id: %v", err)
	}
	if src := syncer.Sources(); src["gw-1"] != "gossip" {
		t.Fatalf("sources %v", src)
	}

	// The broadcast wait may time out on a loaded machine; the update
	// still spreads, which is what the test checks.
	_ = gw2.SetState(StateDraining, 1, 5*time.Second)
	waitFor(t, "gw-2 draining", func() bool { return h.Load().Len() == 2 && len(h.Load().Members()) == 3 })
	for _, g := range p.Gateways() {
		if g.ID == "gw-2" && g.State != StateDraining {
			t.Fatalf("gw-2 state %s", g.State)
		}
	}
	// No Shutdown here: MockNetwork blocks senders to a transport nobody
	// reads, which would stall the others' probes. Cleanup shuts it down.
	_ = gw2.Leave(5 * time.Second)
	waitFor(t, "gw-2 gone", func() bool { return len(h.Load().Members()) == 2 })
	for _, m := range h.Load().Members() {
		if m.ID == "gw-2" {
			t.Fatal("gw-2 still in ring")
		}
	}
}

// TestWrongKeyNeverJoins: a node with another gossip key never shows up.
func TestWrongKeyNeverJoins(t *testing.T) {
	m := newMock("gw-1", "intruder")
	gw1 := m.start(t, "gw-1", gatewayMeta("gw-1"), []byte("0123456789abcdef"))
	in := m.start(t, "intruder", gatewayMeta("evil"), []byte("fedcba9876543210"), gw1.Addr())
	select {
	case <-in.Joined():
		t.Fatal("node with the wrong key joined")
	case <-time.After(time.Second):
	}
	for _, g := range gw1.Gateways() {
		if g.ID == "evil" {
			t.Fatal("intruder visible")
		}
	}
}

// TestJoinRetriesUntilSeedAppears runs on real loopback sockets: the seed
// starts after the joiner, which keeps retrying and then joins.
func TestJoinRetriesUntilSeedAppears(t *testing.T) {
	// 127.0.0.9 is used by no other test, so the port freed here stays free.
	probe, err := New(Config{NodeName: "probe", BindAddr: "127.0.0.9:0", Meta: gatewayMeta("probe")})
	if err != nil {
		t.Fatal(err)
	}
	seedAddr := probe.Addr()
	_ = probe.Shutdown()

	core, logs := observer.New(zap.DebugLevel)
	joiner, err := New(Config{NodeName: "joiner", BindAddr: "127.0.0.9:0", Meta: gatewayMeta("gw-j"),
		Join: []string{seedAddr}, JoinBackoffMax: 100 * time.Millisecond, Logger: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	defer joiner.Shutdown()
	waitFor(t, "a failed join attempt", func() bool { return logs.FilterMessage("no seed answered; retrying").Len() > 0 })

	seed, err := New(Config{NodeName: "seed", BindAddr: seedAddr, Meta: gatewayMeta("gw-s")})
	if err != nil {
		t.Fatalf("restarting the seed on %s: %v", seedAddr, err)
	}
	defer seed.Shutdown()
	select {
	case <-joiner.Joined():
	case <-time.After(10 * time.Second):
		t.Fatal("joiner never joined after the seed appeared")
	}
	waitFor(t, "both gateways visible", func() bool { return len(seed.Gateways()) == 2 && len(joiner.Gateways()) == 2 })
}

func TestZapWriterLevels(t *testing.T) {
	core, logs := observer.New(zap.DebugLevel)
	w := &zapWriter{log: zap.New(core)}
	for _, line := range []string{"[DEBUG] memberlist: d", "[INFO] memberlist: i", "[WARN] memberlist: w", "[ERR] memberlist: e", "plain"} {
		fmt.Fprintln(w, line)
	}
	want := []struct {
		msg string
		lvl string
	}{{"d", "debug"}, {"i", "info"}, {"w", "warn"}, {"e", "error"}, {"plain", "info"}}
	all := logs.All()
	if len(all) != len(want) {
		t.Fatalf("%d entries", len(all))
	}
	for i, e := range all {
		if e.Message != want[i].msg || e.Level.String() != want[i].lvl {
			t.Errorf("entry %d: %s %q, want %s %q", i, e.Level, e.Message, want[i].lvl, want[i].msg)
		}
	}
}

func TestSyncerStaticReload(t *testing.T) {
	var h ring.Holder
	s, err := NewSyncer(nil, []ring.Member{{ID: "a", Addr: "h:1", Weight: 1}}, &h, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetStatic([]ring.Member{{ID: "a", Addr: "h:1", Weight: 1}, {ID: "b", Addr: "h:2", Weight: 1}}); err != nil {
		t.Fatal(err)
	}
	if h.Load().Len() != 2 {
		t.Fatal("reload not applied")
	}
	if err := s.SetStatic([]ring.Member{{ID: "a", Weight: 1}, {ID: "a", Weight: 1}}); err == nil {
		t.Fatal("duplicate ids accepted")
	}
	if h.Load().Len() != 2 || s.Sources()["b"] != "static" {
		t.Fatal("failed reload changed the ring")
	}
}

func TestClaims(t *testing.T) {
	gws := []GatewayInfo{
		{Node: "b", ID: "twice", Addr: "b:1", Weight: 1, State: StateActive},
		{Node: "a", ID: "twice", Addr: "a:1", Weight: 1, State: StateDraining},
		{Node: "c", ID: "twice", Addr: "c:1", Weight: 1, State: StateActive},
		{Node: "solo", ID: "solo", Addr: "s:1", Weight: 1, State: StateActive},
		{Node: "y", ID: "pair", Addr: "y:1", Weight: 1, State: StateActive},
		{Node: "x", ID: "pair", Addr: "x:1", Weight: 1, State: StateActive},
	}
	// Every order of the same members gives the same answer.
	for rot := range gws {
		in := append(append([]GatewayInfo{}, gws[rot:]...), gws[:rot]...)
		chosen, conflicts := Claims(in)
		if chosen["twice"].Node != "b" || chosen["pair"].Node != "x" || chosen["solo"].Node != "solo" {
			t.Fatalf("rotation %d: chosen %v", rot, chosen)
		}
		if len(conflicts) != 2 || conflicts[0].ID != "pair" || conflicts[1].ID != "twice" {
			t.Fatalf("rotation %d: conflicts %+v", rot, conflicts)
		}
		var order []string
		for _, g := range conflicts[1].Claimants {
			order = append(order, g.Node)
		}
		if strings.Join(order, ",") != "b,c,a" {
			t.Fatalf("rotation %d: claimants of twice in order %v, want b,c,a", rot, order)
		}
	}
}

// TestSyncerReportsConflicts: two live members claiming one ID are logged
// once (both named), listed by Conflicts, and cleared when one leaves.
func TestSyncerReportsConflicts(t *testing.T) {
	mem := &fakeMembership{changes: make(chan struct{}, 1)}
	mem.set(GatewayInfo{Node: "gw-1", ID: "gw-1", Addr: "127.0.1.1:1", Weight: 1, State: StateActive})
	core, logs := observer.New(zap.InfoLevel)
	var h ring.Holder
	s, err := NewSyncer(mem, nil, &h, zap.New(core), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Conflicts()) != 0 {
		t.Fatal("conflict without a second claimant")
	}
	rogue := GatewayInfo{Node: "aaa-rogue", ID: "gw-1", Addr: "127.0.1.66:1", Weight: 1000, State: StateActive}
	mem.set(mem.gws[0], rogue)
	for range 3 { // rebuilds without a change log nothing new
		if err := s.rebuild(); err != nil {
			t.Fatal(err)
		}
	}
	c := s.Conflicts()
	if len(c) != 1 || c[0].ID != "gw-1" || len(c[0].Claimants) != 2 {
		t.Fatalf("conflicts %+v", c)
	}
	errs := logs.FilterLevelExact(zap.ErrorLevel).All()
	if len(errs) != 1 {
		t.Fatalf("%d error lines, want 1: %v", len(errs), logs.All())
	}
	f := errs[0].ContextMap()
	if f["id"] != "gw-1" || f["routing_to_node"] != c[0].Claimants[0].Node || f["other_node_1"] != c[0].Claimants[1].Node ||
		f["routing_to_addr"] == f["other_addr_1"] {
		t.Fatalf("log fields %v", f)
	}
	if m, _ := h.Load().Member("gw-1"); m.Addr != c[0].Claimants[0].Addr {
		t.Fatalf("ring routes gw-1 to %s, conflict says %s", m.Addr, c[0].Claimants[0].Addr)
	}
	mem.set(mem.gws[0])
	if err := s.rebuild(); err != nil {
		t.Fatal(err)
	}
	if len(s.Conflicts()) != 0 || logs.FilterMessageSnippet("conflict over").Len() != 1 {
		t.Fatalf("conflict not cleared: %+v", s.Conflicts())
	}
}

// TestDrainLastActive: draining the only gateway taking new keys needs
// force; draining one of several does not.
func TestDrainLastActive(t *testing.T) {
	var h ring.Holder
	s, err := NewSyncer(nil, []ring.Member{{ID: "a", Addr: "h:1", Weight: 1}, {ID: "b", Addr: "h:2", Weight: 1}}, &h, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetDrained("a", true, false); err != nil {
		t.Fatal(err)
	}
	if err := s.SetDrained("b", true, false); !errors.Is(err, ErrLastActive) {
		t.Fatalf("draining the last active gateway: %v", err)
	}
	if h.Load().Len() != 1 {
		t.Fatal("refused drain changed the ring")
	}
	if err := s.SetDrained("b", true, true); err != nil || h.Load().Len() != 0 {
		t.Fatalf("forced drain: %v, %d take keys", err, h.Load().Len())
	}
	if err := s.SetDrained("a", false, false); err != nil || h.Load().Len() != 1 {
		t.Fatalf("undrain: %v", err)
	}
}

// TestClaimIDRefusesHeldID: a gateway whose ID another live member holds
// gets ErrIDConflict naming the holder; a free ID passes.
func TestClaimIDRefusesHeldID(t *testing.T) {
	m := newMock("gw-1", "gw-1-again", "gw-2", "same-name")
	first := m.start(t, "gw-1", gatewayMeta("gw-1"), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := first.ClaimID(ctx); err != nil {
		t.Fatalf("first node: %v", err)
	}
	dup := gatewayMeta("gw-1")
	dup.State = StateDraining
	second := m.start(t, "gw-1-again", dup, nil, first.Addr())
	err := second.ClaimID(ctx)
	if !errors.Is(err, ErrIDConflict) || !strings.Contains(err.Error(), `"gw-1"`) {
		t.Fatalf("duplicate ID: %v", err)
	}
	other := m.start(t, "gw-2", gatewayMeta("gw-2"), nil, first.Addr())
	if err := other.ClaimID(ctx); err != nil {
		t.Fatalf("free ID: %v", err)
	}
	// The same node name at another address (the gateway default: the
	// node name is the ID) is refused too.
	same, err := New(Config{NodeName: "gw-1", Meta: dup, Transport: m.trans["same-name"], Join: []string{first.Addr()},
		Profile: ProfileLocal, JoinBackoffMax: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = same.Shutdown() })
	if err := same.ClaimID(ctx); !errors.Is(err, ErrIDConflict) || !strings.Contains(err.Error(), "node name") {
		t.Fatalf("same node name: %v", err)
	}
}

// TestKeyRotation: a running cluster moves from key A to key B in the three
// documented steps without a node ever losing the others.
func TestKeyRotation(t *testing.T) {
	a, b := []byte("0123456789abcdef"), []byte("fedcba9876543210")
	m := newMock("gw-1", "proxy")
	gw := m.start(t, "gw-1", gatewayMeta("gw-1"), a)
	p := m.start(t, "proxy", Meta{Role: RoleProxy, ID: "proxy", Addr: "127.0.0.1:7000"}, a, gw.Addr())
	waitFor(t, "the proxy sees gw-1", func() bool { return len(p.Gateways()) == 1 })
	steps := [][][]byte{{a, b}, {b, a}, {b}}
	for i, keys := range steps {
		for _, n := range []*Cluster{gw, p} {
			if err := n.SetKeys(keys); err != nil {
				t.Fatalf("step %d: %v", i, err)
			}
		}
		// A state change must still cross with the new keyring.
		state := StateDraining
		if i%2 == 1 {
			state = StateActive
		}
		_ = gw.SetState(state, 1, 5*time.Second)
		waitFor(t, fmt.Sprintf("step %d: gw-1 %s on the proxy", i, state), func() bool {
			g := p.Gateways()
			return len(g) == 1 && g[0].State == state
		})
	}
	if err := gw.SetKeys(nil); err == nil {
		t.Fatal("empty keyring accepted")
	}
	plain := newMock("plain")
	n := plain.start(t, "plain", gatewayMeta("gw-9"), nil)
	if err := n.SetKeys([][]byte{a}); !errors.Is(err, ErrNotEncrypted) {
		t.Fatalf("SetKeys on an unencrypted node: %v", err)
	}
}

// fakeMembership is a Membership whose gateways tests set by hand.
type fakeMembership struct {
	mu      sync.Mutex
	gws     []GatewayInfo
	changes chan struct{}
}

func (f *fakeMembership) set(g ...GatewayInfo) {
	f.mu.Lock()
	f.gws = g
	f.mu.Unlock()
}

func (f *fakeMembership) Gateways() []GatewayInfo {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]GatewayInfo(nil), f.gws...)
}

func (f *fakeMembership) Changes() <-chan struct{} { return f.changes }

// TestDownLeavesTheRing: a down gateway is not in the ring at all (not even
// at weight 0), also over a static entry of its ID; its meta round-trips.
func TestDownLeavesTheRing(t *testing.T) {
	m := gatewayMeta("gw-d")
	m.State = StateDown
	b, err := m.Encode()
	if err != nil {
		t.Fatal(err)
	}
	if got, err := DecodeMeta(b); err != nil || got.State != StateDown {
		t.Fatalf("down meta: %+v %v", got, err)
	}
	r, err := BuildRing([]ring.Member{{ID: "gw-d", Addr: "static:1", Weight: 1}, {ID: "s", Addr: "s:1", Weight: 1}},
		[]GatewayInfo{{Node: "gw-d", ID: "gw-d", Addr: "d:1", Weight: 1, State: StateDown}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := r.Member("gw-d"); ok || len(r.Members()) != 1 {
		t.Fatalf("ring %v", r.Members())
	}
	// Among claimants, active beats draining beats down.
	chosen, _ := Claims([]GatewayInfo{{Node: "a", ID: "x", State: StateDown}, {Node: "b", ID: "x", State: StateDraining}})
	if chosen["x"].Node != "b" {
		t.Fatalf("draining should beat down: %v", chosen)
	}
}
