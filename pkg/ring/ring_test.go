package ring

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"testing/quick"
)

var update = flag.Bool("update", false, "rewrite testdata golden files")

func members(n int) []Member {
	ms := make([]Member, n)
	for i := range ms {
		ms[i] = Member{ID: fmt.Sprintf("gw-%03d", i), Addr: fmt.Sprintf("127.0.1.%d:9000", i+1), Weight: 1}
	}
	return ms
}

func mustNew(t testing.TB, ms []Member) *Ring {
	t.Helper()
	r, err := New(ms)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func keys(n int) [][]byte {
	ks := make([][]byte, n)
	for i := range ks {
		ks[i] = fmt.Appendf(nil, "session-%d", i)
	}
	return ks
}

func owner(t testing.TB, r *Ring, k []byte) string {
	t.Helper()
	m, ok := r.Lookup(k)
	if !ok {
		t.Fatalf("no owner for %q", k)
	}
	return m.ID
}

// goldenMembers is the fixed member set of the golden vectors: mixed weights
// and a draining member, so both ranking paths are pinned.
var goldenMembers = []Member{
	{ID: "gw-a", Weight: 1}, {ID: "gw-b", Weight: 1}, {ID: "gw-c", Weight: 2},
	{ID: "gw-d", Weight: 1}, {ID: "gw-e", Weight: 0.5}, {ID: "gw-drain", Weight: 0},
}

// TestGolden pins the hash and the ranking: if it fails, every deployed proxy
// would disagree with this one about where sessions live.
func TestGolden(t *testing.T) {
	uniform := mustNew(t, goldenMembers[:2])
	weighted := mustNew(t, goldenMembers)
	var b strings.Builder
	fmt.Fprintf(&b, "# key keyhash slot uniform-owner weighted-order(5)\n")
	dst := make([]Member, 5)
	for _, k := range append(keys(60), []byte(""), []byte("user-42"), []byte("ünïcode")) {
		n := weighted.LookupN(k, dst)
		ids := make([]string, n)
		for i := range ids {
			ids[i] = dst[i].ID
		}
		fmt.Fprintf(&b, "%q %016x %d %s %s\n", k, KeyHash(k), SlotOf(k), owner(t, uniform, k), strings.Join(ids, ","))
	}
	path := filepath.Join("testdata", "golden.txt")
	if *update {
		if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	got := bufio.NewScanner(strings.NewReader(b.String()))
	exp := bufio.NewScanner(strings.NewReader(string(want)))
	for line := 1; exp.Scan(); line++ {
		if !got.Scan() || got.Text() != exp.Text() {
			t.Fatalf("golden line %d:\n got  %q\n want %q", line, got.Text(), exp.Text())
		}
	}
}

func TestNewErrors(t *testing.T) {
	tests := []struct {
		name string
		ms   []Member
		err  error
	}{
		{"duplicate", []Member{{ID: "a", Weight: 1}, {ID: "a", Weight: 1}}, ErrDuplicateID},
		{"empty id", []Member{{ID: "", Weight: 1}}, ErrEmptyID},
		{"negative", []Member{{ID: "a", Weight: -1}}, ErrBadWeight},
		{"nan", []Member{{ID: "a", Weight: math.NaN()}}, ErrBadWeight},
		{"inf", []Member{{ID: "a", Weight: math.Inf(1)}}, ErrBadWeight},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := New(tt.ms); !errors.Is(err, tt.err) {
				t.Fatalf("err = %v, want %v", err, tt.err)
			}
		})
	}
}

func TestEmptyAndDraining(t *testing.T) {
	var nilRing *Ring
	for _, r := range []*Ring{nilRing, mustNew(t, nil), mustNew(t, []Member{{ID: "d", Weight: 0}})} {
		if _, ok := r.Lookup([]byte("k")); ok {
			t.Fatal("empty ring returned an owner")
		}
		if n := r.LookupN([]byte("k"), make([]Member, 3)); n != 0 {
			t.Fatalf("LookupN = %d", n)
		}
	}
	r := mustNew(t, []Member{{ID: "d", Weight: 0}, {ID: "a", Weight: 1}})
	if len(r.Members()) != 2 || r.Len() != 1 {
		t.Fatalf("Members %v Len %d", r.Members(), r.Len())
	}
	if m, ok := r.Member("d"); !ok || m.Weight != 0 {
		t.Fatalf("Member(d) = %+v %v", m, ok)
	}
	if _, ok := r.Member("zz"); ok {
		t.Fatal("Member found an unknown id")
	}
	for _, k := range keys(100) {
		if owner(t, r, k) != "a" {
			t.Fatal("draining member owns a key")
		}
	}
}

func TestNewDoesNotModifyInput(t *testing.T) {
	ms := []Member{{ID: "z", Weight: 1}, {ID: "a", Weight: 1}}
	mustNew(t, ms)
	if ms[0].ID != "z" {
		t.Fatal("New reordered the caller's slice")
	}
}

// TestOrderIndependence: any permutation of the same members routes every
// key identically.
func TestOrderIndependence(t *testing.T) {
	f := func(seed uint64) bool {
		ms := members(12)
		ms[3].Weight, ms[7].Weight = 2, 0.5
		shuffled := append([]Member(nil), ms...)
		rand.New(rand.NewPCG(seed, 1)).Shuffle(len(shuffled), func(i, j int) {
			shuffled[i], shuffled[j] = shuffled[j], shuffled[i]
		})
		a, b := mustNew(t, ms), mustNew(t, shuffled)
		da, db := make([]Member, 6), make([]Member, 6)
		for _, k := range keys(500) {
			a.LookupN(k, da)
			b.LookupN(k, db)
			for i := range da {
				if da[i].ID != db[i].ID {
					return false
				}
			}
		}
		return true
	}
	if err := quick.Check(f, &quick.Config{MaxCount: 20}); err != nil {
		t.Fatal(err)
	}
}

// TestRemovalMovesOnlyRemovedKeys: keys of a removed gateway go to their
// former second choice; no other key moves.
func TestRemovalMovesOnlyRemovedKeys(t *testing.T) {
	for _, n := range []int{2, 3, 10, 50} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			ms := members(n)
			before := mustNew(t, ms)
			removed := ms[n/2].ID
			after := mustNew(t, append(append([]Member(nil), ms[:n/2]...), ms[n/2+1:]...))
			dst := make([]Member, 2)
			moved := 0
			for _, k := range keys(20000) {
				before.LookupN(k, dst)
				got := owner(t, after, k)
				if dst[0].ID == removed {
					moved++
					if got != dst[1].ID {
						t.Fatalf("%q: went to %s, want second choice %s", k, got, dst[1].ID)
					}
				} else if got != dst[0].ID {
					t.Fatalf("%q moved from %s to %s though its owner stayed", k, dst[0].ID, got)
				}
			}
			if moved == 0 {
				t.Fatal("removed gateway owned nothing")
			}
		})
	}
}

// TestAdditionMovesAboutOneNth: adding a gateway moves keys only to it, and
// about 1/(N+1) of them.
func TestAdditionMovesAboutOneNth(t *testing.T) {
	for _, n := range []int{3, 10, 100} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			ms := members(n + 1)
			before, after := mustNew(t, ms[:n]), mustNew(t, ms)
			added := ms[n].ID
			ks := keys(50000)
			moved := 0
			for _, k := range ks {
				a, b := owner(t, before, k), owner(t, after, k)
				if a != b {
					if b != added {
						t.Fatalf("%q moved %s -> %s, not to the new gateway", k, a, b)
					}
					moved++
				}
			}
			want := float64(len(ks)) / float64(n+1)
			if f := float64(moved); f < 0.8*want || f > 1.2*want {
				t.Fatalf("moved %d keys, want about %.0f", moved, want)
			}
		})
	}
}

// TestWeights: a χ² goodness-of-fit test of key shares against weights.
func TestWeights(t *testing.T) {
	ms := members(8)
	ms[0].Weight, ms[1].Weight, ms[2].Weight = 2, 2, 0.5
	r := mustNew(t, ms)
	const nkeys = 200000
	counts := map[string]int{}
	for _, k := range keys(nkeys) {
		counts[owner(t, r, k)]++
	}
	total := 0.0
	for _, m := range ms {
		total += m.Weight
	}
	chi2 := 0.0
	for _, m := range ms {
		exp := nkeys * m.Weight / total
		d := float64(counts[m.ID]) - exp
		chi2 += d * d / exp
	}
	// 7 degrees of freedom: p = 0.001 critical value is 24.32. Keys map to
	// 65,536 slots, which adds a little variance of its own; allow for it.
	if chi2 > 40 {
		t.Fatalf("χ² = %.1f for counts %v", chi2, counts)
	}
	if c0, c3 := counts[ms[0].ID], counts[ms[3].ID]; float64(c0) < 1.8*float64(c3) || float64(c0) > 2.2*float64(c3) {
		t.Fatalf("weight 2 got %d keys, weight 1 got %d", c0, c3)
	}
}

// TestLookupNMatchesFullRanking checks the table and the on-the-fly path
// against a brute-force sort of every member by score.
func TestLookupNMatchesFullRanking(t *testing.T) {
	ms := members(9)
	ms[1].Weight, ms[4].Weight = 3, 0.25
	r := mustNew(t, ms)
	dst := make([]Member, len(ms)+2)
	for _, k := range keys(300) {
		n := r.LookupN(k, dst)
		if n != len(ms) {
			t.Fatalf("LookupN = %d", n)
		}
		sh := slotHash(SlotOf(k))
		all := make([]cand, len(ms))
		for i := range all {
			all[i] = r.rank(sh, i)
		}
		sort.Slice(all, func(a, b int) bool { return all[a].before(all[b]) })
		seen := map[string]bool{}
		for i := range n {
			if want := r.members[all[i].i].ID; dst[i].ID != want {
				t.Fatalf("%q position %d: %s, want %s", k, i, dst[i].ID, want)
			}
			if seen[dst[i].ID] {
				t.Fatalf("%q: %s twice", k, dst[i].ID)
			}
			seen[dst[i].ID] = true
		}
		if m, _ := r.Lookup(k); m.ID != dst[0].ID {
			t.Fatalf("Lookup %s != LookupN[0] %s", m.ID, dst[0].ID)
		}
	}
}

func TestZeroAllocs(t *testing.T) {
	r := mustNew(t, members(100))
	k := []byte("session-1")
	dst := make([]Member, 3)
	long := make([]Member, 8)
	var h Holder
	h.Store(r)
	for name, f := range map[string]func(){
		"Lookup":       func() { r.Lookup(k) },
		"LookupN":      func() { r.LookupN(k, dst) },
		"LookupN-deep": func() { r.LookupN(k, long) },
		"Holder.Load":  func() { h.Load().Lookup(k) },
		"KeyHash":      func() { KeyHash(k) },
	} {
		if a := testing.AllocsPerRun(100, f); a != 0 {
			t.Errorf("%s: %v allocs", name, a)
		}
	}
}

func TestHolder(t *testing.T) {
	var h Holder
	if h.Load().Len() != 0 {
		t.Fatal("zero Holder not empty")
	}
	r := mustNew(t, members(3))
	h.Store(r)
	if h.Load() != r {
		t.Fatal("Load did not return the stored ring")
	}
}

func BenchmarkLookup(b *testing.B) {
	for _, n := range []int{10, 100, 1000} {
		r := mustNew(b, members(n))
		ks := keys(1024)
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				r.Lookup(ks[i&1023])
			}
		})
		dst := make([]Member, 3)
		b.Run(fmt.Sprintf("LookupN3/N=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				r.LookupN(ks[i&1023], dst)
			}
		})
	}
}

func BenchmarkNew(b *testing.B) {
	for _, n := range []int{10, 100, 1000} {
		ms := members(n)
		ms[0].Weight = 2
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) {
			for b.Loop() {
				mustNew(b, ms)
			}
		})
	}
}
