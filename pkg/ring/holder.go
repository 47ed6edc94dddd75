package ring

import "sync/atomic"

// Holder publishes the current Ring to concurrent readers. Writers build a
// new Ring and Store it; readers Load without locking. The zero value holds
// an empty ring.
type Holder struct {
	p atomic.Pointer[Ring]
}

// Load returns the current ring (nil, which is a valid empty ring, until the
// first Store). Safe for concurrent use.
func (h *Holder) Load() *Ring { return h.p.Load() }

// Store makes r the current ring. Safe for concurrent use.
func (h *Holder) Store(r *Ring) { h.p.Store(r) }

// Swap makes r the current ring and returns the previous one. Safe for
// concurrent use.
func (h *Holder) Swap(r *Ring) *Ring { return h.p.Swap(r) }
