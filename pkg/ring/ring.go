// Package ring maps session keys to gateways with weighted rendezvous
// (highest-random-weight) hashing.
//
// Keys hash into a fixed number of slots (Slots); each slot ranks the
// gateways by weighted rendezvous over their stable IDs. Two proxies that
// know the same members therefore agree on every key's owner and failover
// order, whatever order they learned the members in. Removing a gateway moves
// only the slots it owned; adding one moves only slots to it (about 1/N).
//
// A Ring is an immutable snapshot: build a new one on every membership change
// and publish it through a Holder. Lookups take no locks and allocate
// nothing. The package does no I/O and reads no clock.
package ring

import (
	"errors"
	"fmt"
	"math"
	"sort"
)

// Slots is the number of hash slots keys map into. It is part of the hash
// contract: every proxy version must use the same value (golden vectors in
// testdata pin it).
const Slots = 1 << 16

// TableDepth is how many ranked candidates each slot keeps precomputed.
// LookupN beyond it still works but ranks members on the fly.
const TableDepth = 4

// MaxMembers is the most members a ring can hold (slot tables index members
// with uint16).
const MaxMembers = math.MaxUint16

// Errors returned by New.
var (
	// ErrDuplicateID means two members share an ID.
	ErrDuplicateID = errors.New("ring: duplicate member id")
	// ErrEmptyID means a member has no ID.
	ErrEmptyID = errors.New("ring: empty member id")
	// ErrBadWeight means a weight is negative, NaN or infinite.
	ErrBadWeight = errors.New("ring: weight must be a finite number >= 0")
	// ErrTooManyMembers means more than MaxMembers members were given.
	ErrTooManyMembers = errors.New("ring: too many members")
)

// Member is one gateway as the ring sees it.
type Member struct {
	// ID is the gateway's stable identity; keys are hashed against it, so
	// it must not change when the gateway moves to another address.
	ID string
	// Addr is the gateway's service address (HOST:PORT); the ring only
	// carries it.
	Addr string
	// Weight scales the share of keys the member owns; 0 means draining:
	// the member is kept but owns no slots.
	Weight float64
}

// Ring is an immutable weighted rendezvous snapshot. The zero value and nil
// are empty rings.
type Ring struct {
	all     []Member // every member, sorted by ID
	members []Member // members with weight > 0, sorted by ID
	idHash  []uint64 // idHash[i] is the hash of members[i].ID
	classes []class  // members grouped by equal weight
	depth   int      // candidates per slot in table
	table   []uint16 // Slots*depth member indices, best first
}

// class is a set of members sharing one weight. Within a class the
// rendezvous score is monotone in the raw slot hash, so ranking a class needs
// no logarithm; only the few best of each class are compared across classes.
type class struct {
	weight  float64
	members []int // indices into Ring.members, ascending
}

// cand is one member's rank for one slot. Candidates are ordered by score
// ascending, then raw hash descending, then index ascending: a total order
// every proxy computes identically.
type cand struct {
	score float64
	u53   uint64
	i     int
}

func (a cand) before(b cand) bool {
	if a.score != b.score {
		return a.score < b.score
	}
	if a.u53 != b.u53 {
		return a.u53 > b.u53
	}
	return a.i < b.i
}

// New builds a ring from members. The input slice is not modified or
// retained. Building costs O(Slots × N) hash mixes; do it off the
// connection path.
func New(members []Member) (*Ring, error) {
	if len(members) > MaxMembers {
		return nil, fmt.Errorf("%w: %d > %d", ErrTooManyMembers, len(members), MaxMembers)
	}
	all := append([]Member(nil), members...)
	sort.Slice(all, func(i, j int) bool { return all[i].ID < all[j].ID })
	r := &Ring{all: all}
	for i, m := range all {
		if m.ID == "" {
			return nil, ErrEmptyID
		}
		if i > 0 && all[i-1].ID == m.ID {
			return nil, fmt.Errorf("%w: %q", ErrDuplicateID, m.ID)
		}
		if m.Weight < 0 || math.IsNaN(m.Weight) || math.IsInf(m.Weight, 0) {
			return nil, fmt.Errorf("%w: %q has %v", ErrBadWeight, m.ID, m.Weight)
		}
		if m.Weight == 0 {
			continue
		}
		idx := len(r.members)
		r.members = append(r.members, m)
		r.idHash = append(r.idHash, KeyHash([]byte(m.ID)))
		c := sort.Search(len(r.classes), func(k int) bool { return r.classes[k].weight >= m.Weight })
		if c == len(r.classes) || r.classes[c].weight != m.Weight {
			r.classes = append(r.classes, class{})
			copy(r.classes[c+1:], r.classes[c:])
			r.classes[c] = class{weight: m.Weight}
		}
		r.classes[c].members = append(r.classes[c].members, idx)
	}
	r.depth = min(TableDepth, len(r.members))
	if r.depth > 0 {
		r.build()
	}
	return r, nil
}

// build fills the per-slot candidate table: the best depth members of each
// weight class by raw hash, then a merge of those by full score.
func (r *Ring) build() {
	r.table = make([]uint16, Slots*r.depth)
	var top, merged [TableDepth]cand
	for s := range uint32(Slots) {
		sh := slotHash(s)
		nm := 0
		for _, c := range r.classes {
			nt := 0
			for _, i := range c.members {
				x := cand{u53: u53(r.idHash[i], sh), i: i}
				nt = insert(top[:], nt, r.depth, x, func(a, b cand) bool {
					return a.u53 > b.u53 || (a.u53 == b.u53 && a.i < b.i)
				})
			}
			for k := range nt {
				x := top[k]
				x.score = weightedScore(x.u53, c.weight)
				nm = insert(merged[:], nm, r.depth, x, cand.before)
			}
		}
		row := r.table[int(s)*r.depth:]
		for k := range r.depth {
			row[k] = uint16(merged[k].i)
		}
	}
}

// insert puts x into the sorted prefix best[:n] (capacity limit) and returns
// the new length; x is dropped if it ranks after the whole full prefix.
func insert(best []cand, n, limit int, x cand, less func(a, b cand) bool) int {
	pos := n
	for pos > 0 && less(x, best[pos-1]) {
		pos--
	}
	if pos >= limit {
		return n
	}
	if n < limit {
		n++
	}
	copy(best[pos+1:n], best[pos:n-1])
	best[pos] = x
	return n
}

// slotHash is the per-slot salt mixed into every member's hash.
func slotHash(s uint32) uint64 { return fmix64(uint64(s) + slotSalt) }

// u53 is a member's raw rendezvous draw for a slot: 53 uniform bits.
func u53(idHash, slotHash uint64) uint64 { return fmix64(idHash^slotHash) >> 11 }

// weightedScore is the weighted rendezvous score -ln(u)/w with u in (0,1):
// lower is better, and a member of weight w wins a share of slots
// proportional to w.
func weightedScore(u53 uint64, w float64) float64 {
	u := (float64(u53) + 0.5) / (1 << 53)
	return -math.Log(u) / w
}

// rank is member i's full rank for a slot.
func (r *Ring) rank(sh uint64, i int) cand {
	u := u53(r.idHash[i], sh)
	return cand{score: weightedScore(u, r.members[i].Weight), u53: u, i: i}
}

// slotSalt separates slot hashes from ID hashes (the 64-bit golden ratio).
const slotSalt = 0x9e3779b97f4a7c15

// Len is the number of members that can own keys (weight > 0).
func (r *Ring) Len() int {
	if r == nil {
		return 0
	}
	return len(r.members)
}

// Members returns a copy of every member, draining ones included, sorted by
// ID.
func (r *Ring) Members() []Member {
	if r == nil {
		return nil
	}
	return append([]Member(nil), r.all...)
}

// Lookup returns the member that owns key, or false if the ring has no
// member with weight > 0.
func (r *Ring) Lookup(key []byte) (Member, bool) {
	if r.Len() == 0 {
		return Member{}, false
	}
	return r.members[r.table[int(SlotOf(key))*r.depth]], true
}

// LookupN fills dst with up to len(dst) distinct members in failover order
// (owner first) and returns how many it wrote. It allocates nothing.
func (r *Ring) LookupN(key []byte, dst []Member) int {
	n := min(len(dst), r.Len())
	if n == 0 {
		return 0
	}
	s := SlotOf(key)
	row := r.table[int(s)*r.depth : int(s+1)*r.depth]
	k := 0
	for ; k < n && k < r.depth; k++ {
		dst[k] = r.members[row[k]]
	}
	if k == n {
		return n
	}
	// Beyond the table: repeatedly pick the best member ranked strictly
	// after the previous pick, in the same order build uses.
	sh := slotHash(s)
	prev := r.rank(sh, int(row[k-1]))
	for ; k < n; k++ {
		next := cand{i: -1}
		for i := range r.members {
			x := r.rank(sh, i)
			if prev.before(x) && (next.i < 0 || x.before(next)) {
				next = x
			}
		}
		dst[k] = r.members[next.i]
		prev = next
	}
	return n
}

// Member returns the member with the given ID, draining ones included, or
// false. It allocates nothing.
func (r *Ring) Member(id string) (Member, bool) {
	if r == nil {
		return Member{}, false
	}
	i := sort.Search(len(r.all), func(i int) bool { return r.all[i].ID >= id })
	if i < len(r.all) && r.all[i].ID == id {
		return r.all[i], true
	}
	return Member{}, false
}
