// Package directory tells a dispatch service which gateway holds a session
// key, without a hop through a proxy.
//
// A push, chat or game backend must find the gateway that holds user X's
// long-lived connection before it can push to X. The proxies answer that on
// their admin port (GET /lookup); a Directory answers the same question in
// process: it joins the gossip cluster as an observer (a member nothing
// routes to), builds the same consistent-hash ring the proxies build from
// the gateways it sees, and, when the fleet uses Redis bindings, reads them
// (never writes) from the same Redis. A lookup costs no network round trip
// without Redis and one GET with it; a batch is one pipelined round trip.
//
// Its answers are the proxies' answers with two exceptions, both about
// state that lives in one proxy only: a gateway one proxy passes over
// because its last connection attempt failed, and a drain an operator set
// on one proxy through its admin API. Gossip carries everything else (a
// gateway joining, draining, going down, dying) to the directory and the
// proxies alike, within the same second or so.
package directory

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/tether-proxy/tether/pkg/cluster"
	"github.com/tether-proxy/tether/pkg/ring"
	"github.com/tether-proxy/tether/pkg/route"
	"github.com/tether-proxy/tether/pkg/route/redisbind"
)

// Answer is where a connect for one key goes now: the gateway's ID and
// address, whether a binding or the ring chose it, and the key's hash as
// tether's logs show it. It is the same type the proxies' /lookup encodes.
type Answer = route.Answer

// Sources of an Answer.
const (
	// SourceBinding: a Redis binding names the gateway.
	SourceBinding = route.SourceBinding
	// SourceRing: the ring chose (no binding, or one to a gateway that
	// is gone or draining, which the next connect moves).
	SourceRing = route.SourceRing
	// SourceFallback: Redis did not answer in time; the ring chose, as
	// the proxies do while Redis is down.
	SourceFallback = route.SourceFallback
)

// Errors a lookup returns; tell them apart with errors.Is.
var (
	// ErrNoGateway means no gateway is known (yet: the directory may
	// still be joining).
	ErrNoGateway = route.ErrNoGateway
	// ErrTooManyKeys means a batch asked for more than MaxKeys keys.
	ErrTooManyKeys = route.ErrTooManyKeys
)

// MaxKeys is the largest batch LookupMany answers, as the proxies' POST
// /lookup.
const MaxKeys = route.MaxLookupKeys

// Config configures a Directory. It mirrors the proxies' flags: use the
// same values as they do, or the answers differ.
type Config struct {
	// GossipBind is the directory's own gossip HOST:PORT (TCP and UDP,
	// port 0 picks one), like a proxy's --gossip-bind; empty means no
	// gossip, Gateways only.
	GossipBind string
	// Join lists gossip seeds (any proxy or gateway), as --join. Joining
	// retries in the background; see Joined.
	Join []string
	// NodeName is the unique gossip name; "" means hostname-PORT.
	NodeName string
	// GossipKeys are the cluster's gossip keys (--gossip-key), primary
	// first; empty means unencrypted gossip.
	GossipKeys [][]byte
	// Profile is the proxies' --gossip-profile (cluster.ProfileLAN by
	// default).
	Profile cluster.Profile
	// Gateways are the static gateways of the proxies' --gateway flags, if
	// they have any.
	Gateways []ring.Member
	// Redis reads the proxies' bindings (their --redis; build the client
	// with redisbind.NewClient); nil means the fleet runs without Redis.
	Redis redis.UniversalClient
	// Candidates is the proxies' --max-tries; 0 means its default, 3.
	Candidates int
	// Timeout bounds the Redis work of one lookup (a batch gets one more
	// per 250 keys); 0 means the proxies' --redis-timeout default, 50ms.
	Timeout time.Duration
	// Logger receives membership and Redis state changes; nil means none.
	Logger *zap.Logger
}

// Directory answers lookups from its own view of the cluster. Its methods
// are safe for concurrent use.
type Directory struct {
	holder ring.Holder
	looker route.Looker
	node   *cluster.Cluster // nil without gossip
	stop   context.CancelFunc
	done   chan struct{}
}

// New starts a Directory: it joins gossip (in the background, see Joined)
// and keeps its ring current until Close.
func New(cfg Config) (*Directory, error) {
	if cfg.GossipBind == "" && len(cfg.Gateways) == 0 {
		return nil, errors.New("directory: no gateways: set GossipBind (and Join) to discover them, or Gateways")
	}
	if cfg.GossipBind == "" && len(cfg.Join) > 0 {
		return nil, errors.New("directory: Join needs GossipBind, the directory's own gossip address")
	}
	log := cfg.Logger
	if log == nil {
		log = zap.NewNop()
	}
	d := &Directory{done: make(chan struct{})}
	var members cluster.Membership
	if cfg.GossipBind != "" {
		node, err := cluster.New(cluster.Config{
			NodeName: cfg.NodeName,
			BindAddr: cfg.GossipBind,
			Join:     cfg.Join,
			Keys:     cfg.GossipKeys,
			Profile:  cfg.Profile,
			Meta:     cluster.Meta{Role: cluster.RoleObserver},
			Logger:   log.Named("gossip"),
		})
		if err != nil {
			return nil, fmt.Errorf("directory: %w", err)
		}
		d.node, members = node, node
	}
	syncer, err := cluster.NewSyncer(members, cfg.Gateways, &d.holder, log.Named("ring"), nil)
	if err != nil {
		d.shutdownNode()
		return nil, fmt.Errorf("directory: gateways: %w", err)
	}
	d.looker = &route.RingResolver{Ring: &d.holder, Candidates: cfg.Candidates}
	if cfg.Redis != nil {
		b, err := redisbind.New(redisbind.Config{Client: cfg.Redis, Ring: &d.holder, Candidates: cfg.Candidates, Timeout: cfg.Timeout, Logger: log.Named("redis")})
		if err != nil {
			d.shutdownNode()
			return nil, fmt.Errorf("directory: %w", err)
		}
		d.looker = b
	}
	ctx, stop := context.WithCancel(context.Background())
	d.stop = stop
	go func() { defer close(d.done); syncer.Run(ctx) }()
	return d, nil
}

// Lookup answers where a connect for key goes now. It never changes a
// binding.
func (d *Directory) Lookup(ctx context.Context, key string) (Answer, error) {
	ans, err := d.LookupMany(ctx, []string{key})
	if err != nil {
		return Answer{}, err
	}
	return ans[0], nil
}

// LookupMany answers up to MaxKeys keys in order, in one Redis round trip.
func (d *Directory) LookupMany(ctx context.Context, keys []string) ([]Answer, error) {
	return route.Lookup(ctx, d.looker, keys, nil)
}

// Gateways returns every gateway the directory knows now, sorted by ID;
// draining ones have Weight 0 and take no new keys.
func (d *Directory) Gateways() []ring.Member { return d.holder.Load().Members() }

// Joined is closed once the directory has joined the cluster (at once
// without Join or gossip). Lookups before that know only Config.Gateways.
func (d *Directory) Joined() <-chan struct{} {
	if d.node == nil {
		c := make(chan struct{})
		close(c)
		return c
	}
	return d.node.Joined()
}

// Close leaves the cluster (telling its members, within a second) and
// stops. It does not close Config.Redis.
func (d *Directory) Close() error {
	d.stop()
	<-d.done
	if d.node == nil {
		return nil
	}
	_ = d.node.Leave(time.Second)
	return d.node.Shutdown()
}

func (d *Directory) shutdownNode() {
	if d.node != nil {
		_ = d.node.Shutdown()
	}
}
