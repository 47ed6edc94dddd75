package route

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/tether-proxy/tether/pkg/ring"
)

func TestLookup(t *testing.T) {
	var h ring.Holder
	ms := []ring.Member{{ID: "a", Addr: "10.0.0.1:9000", Weight: 1}, {ID: "b", Addr: "10.0.0.2:9000", Weight: 1}, {ID: "c", Addr: "10.0.0.3:9000", Weight: 1}}
	rg, err := ring.New(ms)
	if err != nil {
		t.Fatal(err)
	}
	h.Store(rg)
	r := &RingResolver{Ring: &h}
	ctx := context.Background()
	keys := []string{"user-1", "user-2", "user-3", "user-4"}
	routes, err := r.LookupRoutes(ctx, keys)
	if err != nil {
		t.Fatal(err)
	}
	owner := func(i int) string { return routes[i].Candidates[0].ID }
	second := func(i int) string { return routes[i].Candidates[1].ID }
	for _, tc := range []struct {
		name    string
		cooling func(string) bool
		want    func(i int) string
		live    bool
	}{
		{"none cooling", nil, owner, true},
		{"owner cooling", func(id string) bool { return id == routes[0].Candidates[0].ID }, nil, true},
		{"all cooling", func(string) bool { return true }, owner, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ans, err := Lookup(ctx, r, keys, tc.cooling)
			if err != nil {
				t.Fatal(err)
			}
			if len(ans) != len(keys) {
				t.Fatalf("%d answers for %d keys", len(ans), len(keys))
			}
			for i, a := range ans {
				want := owner(i)
				if tc.want != nil {
					want = tc.want(i)
				} else if owner(i) == routes[0].Candidates[0].ID {
					want = second(i)
				}
				if a.Key != keys[i] || a.Gateway != want || a.Live != tc.live || a.Source != SourceRing {
					t.Errorf("answer %d = %+v, want gateway %s live %v", i, a, want, tc.live)
				}
				if a.KeyHash != ring.KeyHashHex([]byte(keys[i])) {
					t.Errorf("key hash %q", a.KeyHash)
				}
				if m, _ := rg.Member(a.Gateway); a.Addr != m.Addr {
					t.Errorf("addr %q for %s", a.Addr, a.Gateway)
				}
			}
		})
	}
	if _, err := Lookup(ctx, r, make([]string, MaxLookupKeys+1), nil); !errors.Is(err, ErrTooManyKeys) {
		t.Fatalf("1001 keys: %v", err)
	}
	if ans, err := Lookup(ctx, r, nil, nil); err != nil || len(ans) != 0 {
		t.Fatalf("no keys: %v %v", ans, err)
	}
	if _, err := Lookup(ctx, &RingResolver{Ring: &ring.Holder{}}, []string{"k"}, nil); !errors.Is(err, ErrNoGateway) {
		t.Fatalf("empty ring: %v", err)
	}
}

// TestLookupMatchesResolve: for a ring alone, a lookup names exactly the
// gateway Resolve puts first.
func TestLookupMatchesResolve(t *testing.T) {
	var h ring.Holder
	var ms []ring.Member
	for i := range 7 {
		ms = append(ms, ring.Member{ID: fmt.Sprintf("gw-%d", i), Weight: float64(1 + i%3)})
	}
	rg, _ := ring.New(ms)
	h.Store(rg)
	r := &RingResolver{Ring: &h}
	keys := make([]string, MaxLookupKeys)
	for i := range keys {
		keys[i] = strings.Repeat("k", i%5) + fmt.Sprint(i)
	}
	ans, err := Lookup(context.Background(), r, keys, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i, k := range keys {
		rt, _ := r.Resolve(context.Background(), []byte(k))
		if ans[i].Gateway != rt.Candidates[0].ID {
			t.Fatalf("key %q: lookup %s, resolve %s", k, ans[i].Gateway, rt.Candidates[0].ID)
		}
	}
}
