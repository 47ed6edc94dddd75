package cluster

import (
	"context"
	"errors"
	"fmt"
	"strings"
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
	for _, m := range []Meta{gatewayMeta("gw-1"), {Role: RoleProxy, ID: "p1", Addr: "127.0.0.1:7000"}} {
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
	c, err := New(Config{NodeName: name, Meta: meta, Transport: m.trans[name], Join: join, SecretKey: key,
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
	if err := syncer.SetDrained("gw-3", true); err != nil {
		t.Fatal(err)
	}
	if h.Load().Len() != 2 || !syncer.Drained("gw-3") {
		t.Fatalf("admin drain not applied: %d take keys", h.Load().Len())
	}
	if err := syncer.SetDrained("gw-3", false); err != nil || h.Load().Len() != 3 {
		t.Fatalf("undrain: %v, %d take keys", err, h.Load().Len())
	}
	if err := syncer.SetDrained("nope", true); !errors.Is(err, ErrUnknownGateway) {
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
