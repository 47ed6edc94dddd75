// Package route decides which gateways may serve a session key and dials
// them in order.
//
// A Resolver turns a key into an ordered list of candidate gateways (owner
// first, then failovers). A Dialer tries those candidates within a bounded
// number of attempts and remembers gateways that refused, for a short
// cooldown, so the next connection goes straight to the failover.
package route

import (
	"context"
	"errors"

	"github.com/tether-proxy/tether/pkg/ring"
)

// Gateway is one candidate: a stable ID and a service address.
type Gateway = ring.Member

// Source says where a route came from; it labels metrics and /route answers.
type Source string

// Route sources.
const (
	// SourceRing means the candidates come from the consistent-hash ring.
	SourceRing Source = "ring"
	// SourceBinding means a stored key→gateway binding chose the owner.
	SourceBinding Source = "binding"
	// SourceFallback means the binding store did not answer in time (or
	// refused to store a new binding) and the ring chose.
	SourceFallback Source = "fallback"
)

// Routing outcomes. Callers tell them apart with errors.Is.
var (
	// ErrNoGateway means no live gateway can take the key.
	ErrNoGateway = errors.New("route: no live gateway")
	// ErrUnreachable means every candidate tried failed to connect.
	ErrUnreachable = errors.New("route: every candidate gateway failed")
)

// Route is the answer for one key.
type Route struct {
	// Source is where the owner came from.
	Source Source
	// Candidates are the gateways to try, in order; never empty when
	// Resolve returns no error.
	Candidates []Gateway
}

// Resolver turns a session key into candidate gateways. Resolve must be safe
// for concurrent use, must not retain key, and returns ErrNoGateway (possibly
// wrapped) when no gateway is known.
type Resolver interface {
	Resolve(ctx context.Context, key []byte) (Route, error)
}

// Immediate is implemented by resolvers that answer from memory, without
// I/O or waiting, so a caller may resolve on an event loop's thread (the
// proxy's accept loop does) instead of a goroutine of its own.
type Immediate interface {
	Resolver
	// ResolvesImmediately reports whether Resolve never waits.
	ResolvesImmediately() bool
}

// DefaultCandidates is how many candidates RingResolver returns by default:
// one owner and two failovers, matching the default --max-tries.
const DefaultCandidates = 3

// RingResolver resolves keys on the current ring snapshot alone.
type RingResolver struct {
	// Ring holds the current snapshot; required.
	Ring *ring.Holder
	// Candidates is how many gateways to return; 0 means
	// DefaultCandidates.
	Candidates int
}

var _ Resolver = (*RingResolver)(nil)

// ResolvesImmediately is true: the ring is an in-memory snapshot.
func (r *RingResolver) ResolvesImmediately() bool { return true }

// Resolve implements Resolver. It never blocks and ignores ctx.
func (r *RingResolver) Resolve(_ context.Context, key []byte) (Route, error) {
	n := r.Candidates
	if n <= 0 {
		n = DefaultCandidates
	}
	rg := r.Ring.Load()
	cands := make([]Gateway, min(n, rg.Len()))
	if rg.LookupN(key, cands) == 0 {
		return Route{}, ErrNoGateway
	}
	return Route{Source: SourceRing, Candidates: cands}, nil
}
