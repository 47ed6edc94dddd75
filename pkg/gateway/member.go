package gateway

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/tether-proxy/tether/pkg/cluster"
)

// ErrIDConflict means another live member already holds the gateway ID
// (Announce); the gateway must not take keys.
var ErrIDConflict = cluster.ErrIDConflict

// Profile is a gossip timing preset for MemberConfig.Profile.
type Profile = cluster.Profile

// Gossip timing profiles for MemberConfig.Profile.
const (
	// ProfileLAN is memberlist's LAN timing: a dead member is noticed in
	// about 5 s.
	ProfileLAN = cluster.ProfileLAN
	// ProfileLocal is faster (about 3 s) for one host or a quiet network.
	ProfileLocal = cluster.ProfileLocal
)

// MemberConfig configures Join.
type MemberConfig struct {
	// ID is the gateway ID keys hash to; required. Keep it stable across
	// restarts and address changes.
	ID string
	// Addr is the service HOST:PORT proxies connect to; required, with a
	// specific host.
	Addr string
	// Weight is the ring weight; 0 means 1. A gateway of weight 2 gets
	// twice the keys.
	Weight float64
	// NodeName is the unique gossip name; "" means ID. A gateway restarted
	// under its old node name and gossip address rejoins in its place.
	NodeName string
	// BindAddr is the gossip HOST:PORT (TCP and UDP); required.
	BindAddr string
	// Join lists gossip addresses of members already in the cluster;
	// empty for the first node. Joining retries in the background.
	Join []string
	// Keys are the gossip encryption keys (16, 24 or 32 bytes, primary
	// first), the same as the cluster's --gossip-key. Empty means
	// unencrypted gossip, which is only safe on loopback.
	Keys [][]byte
	// Profile is ProfileLAN (default) or ProfileLocal.
	Profile Profile
	// OpenSessions, if set, tells Drain how many sessions are still open
	// (Listener.Open does); nil makes Drain wait for its context.
	OpenSessions func() int
	// Logger receives membership logs; nil means none.
	Logger *zap.Logger
}

// Member is this gateway's membership in the gossip cluster. Its methods
// are safe for concurrent use.
type Member struct {
	cfg  MemberConfig
	node *cluster.Cluster
	log  *zap.Logger

	mu     sync.Mutex
	state  cluster.State
	weight float64
}

// Join starts gossip and joins the cluster in the background, published as
// draining: the gateway is known but takes no keys until Announce.
func Join(cfg MemberConfig) (*Member, error) {
	if cfg.ID == "" {
		return nil, errors.New("gateway: member needs an ID")
	}
	host, _, err := net.SplitHostPort(cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("gateway: service address %q: %w", cfg.Addr, err)
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		return nil, fmt.Errorf("gateway: service address %q has no specific host: proxies need one to connect to", cfg.Addr)
	}
	if cfg.Weight < 0 {
		return nil, fmt.Errorf("gateway: weight %v < 0", cfg.Weight)
	}
	if cfg.Weight == 0 {
		cfg.Weight = 1
	}
	if cfg.NodeName == "" {
		cfg.NodeName = cfg.ID
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	cfg.Join = append([]string(nil), cfg.Join...)
	node, err := cluster.New(cluster.Config{
		NodeName: cfg.NodeName,
		BindAddr: cfg.BindAddr,
		Join:     cfg.Join,
		Keys:     cfg.Keys,
		Profile:  cfg.Profile,
		Meta:     cluster.Meta{Role: cluster.RoleGateway, ID: cfg.ID, Addr: cfg.Addr, Weight: cfg.Weight, State: cluster.StateDraining},
		Logger:   cfg.Logger,
	})
	if err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	return &Member{cfg: cfg, node: node, log: cfg.Logger, state: cluster.StateDraining, weight: cfg.Weight}, nil
}

// GossipAddr is the gossip address this member advertises.
func (m *Member) GossipAddr() string { return m.node.Addr() }

// NodeName is this member's gossip name.
func (m *Member) NodeName() string { return m.node.Name() }

// Encrypted reports whether gossip is encrypted (Keys were given).
func (m *Member) Encrypted() bool { return m.node.Encrypted() }

// Joined is closed once a seed answered (at once for a first node).
func (m *Member) Joined() <-chan struct{} { return m.node.Joined() }

// Announce waits until the member has joined (or ctx is done), checks that
// no other live member holds its ID, and publishes it active: proxies then
// send it keys. The error wraps ErrIDConflict, naming the holder, when the
// ID is taken; the gateway stays out of every ring.
func (m *Member) Announce(ctx context.Context) error {
	if err := m.Claim(ctx); err != nil {
		return err
	}
	return m.publish(ctx, cluster.StateActive, 0)
}

// Claim is Announce without the publishing: it waits for the join and
// checks the ID, leaving the state as it is (a sidecar publishes active
// only once its gateway passes a health check).
func (m *Member) Claim(ctx context.Context) error {
	if err := m.node.ClaimID(ctx); err != nil {
		return fmt.Errorf("gateway: claim %s: %w", m.cfg.ID, err)
	}
	return nil
}

// SetWeight publishes a new ring weight (> 0).
func (m *Member) SetWeight(ctx context.Context, w float64) error {
	if w <= 0 {
		return fmt.Errorf("gateway: weight %v: want > 0 (use Drain or Down to take no keys)", w)
	}
	return m.publish(ctx, "", w)
}

// Down publishes the gateway as down (unhealthy): every proxy takes it out
// of its ring within a gossip round and its keys go to their next choice.
// Open sessions are not touched.
func (m *Member) Down(ctx context.Context) error { return m.publish(ctx, cluster.StateDown, 0) }

// Up publishes the gateway as active again after Down.
func (m *Member) Up(ctx context.Context) error { return m.publish(ctx, cluster.StateActive, 0) }

// State is the state last published: active, draining or down.
func (m *Member) State() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return string(m.state)
}

// Drain publishes draining (no new keys; open sessions go on), waits until
// OpenSessions reports none or ctx is done, then leaves the cluster. It
// returns ctx.Err() if sessions were still open when ctx ended.
func (m *Member) Drain(ctx context.Context) error {
	if err := m.publish(ctx, cluster.StateDraining, 0); err != nil {
		return err
	}
	var err error
	if m.cfg.OpenSessions == nil {
		<-ctx.Done()
	} else {
		t := time.NewTicker(50 * time.Millisecond)
		for m.cfg.OpenSessions() > 0 && err == nil {
			select {
			case <-ctx.Done():
				err = ctx.Err()
			case <-t.C:
			}
		}
		t.Stop()
	}
	if lerr := m.Leave(5 * time.Second); lerr != nil {
		m.log.Warn("gossip leave not confirmed", zap.Error(lerr))
	}
	return err
}

// Leave tells the cluster this member is going and waits up to timeout for
// it to spread, then stops gossip. Idempotent.
func (m *Member) Leave(timeout time.Duration) error {
	err := m.node.Leave(timeout)
	_ = m.node.Shutdown()
	return err
}

// SetKeys replaces the gossip keyring (rotation; see docs/operating.md).
func (m *Member) SetKeys(keys [][]byte) error { return m.node.SetKeys(keys) }

// publish sets state (unchanged if "") and weight (unchanged if 0) and
// broadcasts them, waiting up to 2 s (or ctx's deadline) for a peer to
// confirm; unconfirmed updates keep spreading by gossip, so that is not an
// error.
func (m *Member) publish(ctx context.Context, state cluster.State, w float64) error {
	m.mu.Lock()
	if state != "" {
		m.state = state
	}
	if w > 0 {
		m.weight = w
	}
	st, weight := m.state, m.weight
	m.mu.Unlock()
	wait := 2 * time.Second
	if d, ok := ctx.Deadline(); ok {
		wait = min(wait, max(time.Until(d), time.Millisecond))
	}
	if err := m.node.SetState(st, weight, wait); err != nil {
		if errors.Is(err, cluster.ErrBadMeta) || errors.Is(err, cluster.ErrMetaTooLarge) {
			return fmt.Errorf("gateway: %w", err)
		}
		m.log.Debug("state update not confirmed yet; it keeps spreading", zap.String("state", string(st)), zap.Error(err))
	}
	return nil
}
