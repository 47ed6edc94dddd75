package route

import (
	"context"
	"errors"
	"fmt"

	"github.com/tether-proxy/tether/pkg/ring"
)

// MaxLookupKeys bounds one batch lookup: a dispatch service asks for at most
// this many keys per request.
const MaxLookupKeys = 1000

// ErrTooManyKeys means a batch lookup asked for more than MaxLookupKeys.
var ErrTooManyKeys = errors.New("route: too many keys in one lookup")

// Looker is implemented by resolvers that can also answer without side
// effects: LookupRoutes resolves keys as Resolve would for a connect made
// now, but never creates, moves or refreshes a binding, so a dispatch
// service may look up any number of keys without changing where they go.
type Looker interface {
	// LookupRoutes returns one Route per key, in order. It returns
	// ErrNoGateway (possibly wrapped) when no gateway is known.
	LookupRoutes(ctx context.Context, keys []string) ([]Route, error)
}

// Answer is where a connect for one key goes now: the owner of its route,
// passed over if connection attempts to it are failing, as a Dialer fails
// over from it. It is the JSON body of the proxy's /lookup.
type Answer struct {
	// Key is the key asked about.
	Key string `json:"key"`
	// KeyHash is the key's hash as tether's logs show it.
	KeyHash string `json:"key_hash"`
	// Gateway is the ID of the gateway a connect goes to.
	Gateway string `json:"gateway"`
	// Addr is that gateway's address (for dispatch services; never shown
	// to clients).
	Addr string `json:"addr"`
	// Source is binding when a stored binding chose the gateway, ring
	// when the ring did (no binding, or one to a gateway that is gone or
	// draining), fallback when the binding store did not answer in time.
	Source Source `json:"source"`
	// Live is false when connection attempts to every candidate are
	// failing: a connect would try Gateway anyway, but it is probably not
	// up.
	Live bool `json:"live"`
}

// Lookup answers keys in order with l, passing over the gateways down
// reports (for a proxy, Dialer.Unreachable; nil passes over none).
// It never changes a binding. It fails with ErrTooManyKeys beyond
// MaxLookupKeys and ErrNoGateway when no gateway is known.
func Lookup(ctx context.Context, l Looker, keys []string, down func(id string) bool) ([]Answer, error) {
	if len(keys) > MaxLookupKeys {
		return nil, fmt.Errorf("%w: %d > %d", ErrTooManyKeys, len(keys), MaxLookupKeys)
	}
	routes, err := l.LookupRoutes(ctx, keys)
	if err != nil {
		return nil, err
	}
	if len(routes) != len(keys) {
		return nil, fmt.Errorf("route: lookup answered %d routes for %d keys", len(routes), len(keys))
	}
	out := make([]Answer, len(keys))
	for i, rt := range routes {
		if len(rt.Candidates) == 0 {
			return nil, ErrNoGateway
		}
		gw, live := rt.Candidates[0], false
		for _, c := range rt.Candidates {
			if down == nil || !down(c.ID) {
				gw, live = c, true
				break
			}
		}
		out[i] = Answer{Key: keys[i], KeyHash: ring.KeyHashHex([]byte(keys[i])), Gateway: gw.ID, Addr: gw.Addr, Source: rt.Source, Live: live}
	}
	return out, nil
}

var _ Looker = (*RingResolver)(nil)

// LookupRoutes implements Looker: the ring has no side effects to avoid.
func (r *RingResolver) LookupRoutes(ctx context.Context, keys []string) ([]Route, error) {
	out := make([]Route, len(keys))
	for i, k := range keys {
		rt, err := r.Resolve(ctx, []byte(k))
		if err != nil {
			return nil, err
		}
		out[i] = rt
	}
	return out, nil
}
