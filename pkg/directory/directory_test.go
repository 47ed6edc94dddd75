package directory

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/tether-proxy/tether/internal/testenv"
	"github.com/tether-proxy/tether/pkg/cluster"
	"github.com/tether-proxy/tether/pkg/gateway"
	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route/redisbind"
)

// joinGateway starts a gateway's gossip membership on loopback and
// announces it active.
func joinGateway(t *testing.T, id string, join ...string) *gateway.Member {
	t.Helper()
	m, err := gateway.Join(gateway.MemberConfig{ID: id, Addr: "127.0.1.1:9" + id[len(id)-1:] + "00", BindAddr: "127.0.0.1:0", Join: join, Profile: gateway.ProfileLocal})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Leave(time.Second) })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m.Announce(ctx); err != nil {
		t.Fatal(err)
	}
	return m
}

// waitGateways waits until the directory's ring has exactly ids taking keys.
func waitGateways(t *testing.T, d *Directory, ids ...string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		var got []string
		for _, g := range d.Gateways() {
			if g.Weight > 0 {
				got = append(got, g.ID)
			}
		}
		if fmt.Sprint(got) == fmt.Sprint(ids) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("directory sees %v, want %v", got, ids)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestDirectoryGossipAndBindings: a directory joined to real gossip and
// reading a real Redis answers like a proxy: ring owners for new keys,
// bindings for bound ones, and never writes to Redis; when a gateway leaves
// its keys move to their next choice.
func TestDirectoryGossipAndBindings(t *testing.T) {
	rd := testenv.StartRedis(t)
	gw1 := joinGateway(t, "gw-1")
	gw2 := joinGateway(t, "gw-2", gw1.GossipAddr())
	rc, err := redisbind.NewClient("redis://"+rd.Addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	d, err := New(Config{GossipBind: "127.0.0.1:0", Join: []string{gw1.GossipAddr()}, Profile: cluster.ProfileLocal, Redis: rc, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	<-d.Joined()
	waitGateways(t, d, "gw-1", "gw-2")

	ctx := context.Background()
	rc.Set(ctx, redisbind.KeyPrefix+"bound", "gw-2", time.Minute)
	want, _ := ring.New([]ring.Member{{ID: "gw-1", Weight: 1}, {ID: "gw-2", Weight: 1}})
	keys := []string{"bound"}
	for i := range 99 {
		keys = append(keys, fmt.Sprintf("user-%d", i))
	}
	before := rc.DBSize(ctx).Val()
	ans, err := d.LookupMany(ctx, keys)
	if err != nil {
		t.Fatal(err)
	}
	if ans[0].Gateway != "gw-2" || ans[0].Source != SourceBinding || ans[0].Addr != "127.0.1.1:9200" || !ans[0].Live {
		t.Fatalf("bound key: %+v", ans[0])
	}
	for i, a := range ans[1:] {
		owner, _ := want.Lookup([]byte(keys[i+1]))
		if a.Key != keys[i+1] || a.Gateway != owner.ID || a.Source != SourceRing {
			t.Fatalf("%s: %+v, want %s by ring", keys[i+1], a, owner.ID)
		}
	}
	if after := rc.DBSize(ctx).Val(); after != before {
		t.Fatalf("lookups changed Redis: %d keys, %d before", after, before)
	}

	// gw-2 leaves: its bound key is answered with where the next connect
	// moves it, and the binding itself is left for that connect to move.
	if err := gw2.Leave(time.Second); err != nil {
		t.Fatal(err)
	}
	waitGateways(t, d, "gw-1")
	a, err := d.Lookup(ctx, "bound")
	if err != nil || a.Gateway != "gw-1" || a.Source != SourceRing {
		t.Fatalf("bound to a gateway that left: %+v, %v", a, err)
	}
	if v := rc.Get(ctx, redisbind.KeyPrefix+"bound").Val(); v != "gw-2" {
		t.Fatalf("a lookup moved the binding to %q", v)
	}
}

// TestDirectoryErrors: configuration mistakes and an empty fleet answer
// with errors callers can tell apart.
func TestDirectoryErrors(t *testing.T) {
	if _, err := New(Config{}); err == nil {
		t.Fatal("no gateways and no gossip accepted")
	}
	if _, err := New(Config{Join: []string{"127.0.0.1:7946"}, Gateways: []ring.Member{{ID: "a", Weight: 1}}}); err == nil {
		t.Fatal("Join without GossipBind accepted")
	}
	d, err := New(Config{Gateways: []ring.Member{{ID: "a", Addr: "h:1", Weight: 0}}})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := d.Lookup(context.Background(), "k"); !errors.Is(err, ErrNoGateway) {
		t.Fatalf("only a draining gateway: %v", err)
	}
	if _, err := d.LookupMany(context.Background(), make([]string, MaxKeys+1)); !errors.Is(err, ErrTooManyKeys) {
		t.Fatalf("too many keys: %v", err)
	}
}
