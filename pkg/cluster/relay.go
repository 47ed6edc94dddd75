package cluster

import (
	"slices"
	"sync"
)

// Relay is a Membership that answers from a copy of another process's
// membership until the live gossip node is attached. The new process of
// an upgrade routes with it from its first connection, with the ring the
// old process had, while the old one still holds the node name; once the
// new node has joined, Attach hands over to it.
type Relay struct {
	mu       sync.Mutex
	gateways []GatewayInfo
	live     Membership // nil until Attach
	changes  chan struct{}
}

var _ Membership = (*Relay)(nil)

// NewRelay returns a Relay that answers gws until Attach.
func NewRelay(gws []GatewayInfo) *Relay {
	return &Relay{gateways: slices.Clone(gws), changes: make(chan struct{}, 1)}
}

// Set replaces the copied membership (the old process saw it change);
// ignored once a live node is attached.
func (r *Relay) Set(gws []GatewayInfo) {
	r.mu.Lock()
	if r.live != nil {
		r.mu.Unlock()
		return
	}
	r.gateways = slices.Clone(gws)
	r.mu.Unlock()
	r.notify()
}

// Attach makes m answer from now on, and forwards its changes; call it
// once m has joined, so it knows the cluster.
func (r *Relay) Attach(m Membership) {
	r.mu.Lock()
	if r.live != nil {
		r.mu.Unlock()
		return
	}
	r.live = m
	r.gateways = nil
	r.mu.Unlock()
	r.notify()
	go func() {
		for range m.Changes() {
			r.notify()
		}
	}()
}

// Gateways implements Membership.
func (r *Relay) Gateways() []GatewayInfo {
	r.mu.Lock()
	live, gws := r.live, slices.Clone(r.gateways)
	r.mu.Unlock()
	if live != nil {
		return live.Gateways()
	}
	return gws
}

// Changes implements Membership.
func (r *Relay) Changes() <-chan struct{} { return r.changes }

func (r *Relay) notify() {
	select {
	case r.changes <- struct{}{}:
	default:
	}
}
