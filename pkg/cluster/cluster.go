// Package cluster is tether's gossip membership: gateways and proxies find
// each other with hashicorp/memberlist, publish who they are in node meta,
// and proxies turn the live gateway set into ring snapshots.
//
// It is the only package that imports memberlist.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
	"go.uber.org/zap"
)

// Membership is a live view of the gateways in the cluster.
type Membership interface {
	// Gateways returns the gateways currently alive, draining ones
	// included, sorted by ID. Safe for concurrent use; the slice is the
	// caller's.
	Gateways() []GatewayInfo
	// Changes returns a channel that receives a value after membership
	// changes. Changes are coalesced: one receive may cover many.
	Changes() <-chan struct{}
}

// GatewayInfo is one gateway as gossip reports it.
type GatewayInfo struct {
	// Node is the memberlist node name.
	Node string `json:"node"`
	// ID is the gateway ID keys hash to.
	ID string `json:"id"`
	// Addr is the gateway's service address.
	Addr string `json:"addr"`
	// Weight is the published weight (the ring uses 0 while draining).
	Weight float64 `json:"weight"`
	// State is active or draining.
	State State `json:"state"`
}

// Profile names a memberlist timing preset (--gossip-profile).
type Profile string

// Gossip timing profiles.
const (
	// ProfileLAN is memberlist's LAN defaults: probe every 1s, a failed
	// node is declared dead after about 5s in small clusters.
	ProfileLAN Profile = "lan"
	// ProfileLocal is memberlist's local-network preset: faster probes
	// and suspicion (about 3-4s to declare a node dead).
	ProfileLocal Profile = "local"
)

// PushPullInterval is how often a node exchanges its full member list with
// a random peer (memberlist scales it up past 32 nodes). memberlist's
// default is 30s (LAN) or 15s (local); gossip broadcasts are retransmitted
// only a few times, so a node that joined while another was joining can
// miss it until the next push/pull. 5s bounds that window at a cost of one
// small state exchange per node every 5s.
const PushPullInterval = 5 * time.Second

// Config configures a Cluster node.
type Config struct {
	// NodeName is the unique memberlist name; "" means hostname-PORT with
	// the gossip port actually bound.
	NodeName string
	// BindAddr is the gossip HOST:PORT (TCP and UDP); port 0 picks one.
	// Ignored when Transport is set.
	BindAddr string
	// Join lists seed gossip addresses; empty means this is the first node.
	// Joining retries with backoff until one answers.
	Join []string
	// Keys turns on memberlist encryption and authentication: AES keys of
	// 16, 24 or 32 bytes, the primary (used to encrypt) first, then keys
	// still accepted from peers during a rotation (see SetKeys). Nodes
	// with no key in common cannot talk. Empty means unencrypted gossip.
	Keys [][]byte
	// Meta is what this node publishes. An empty ID means the node name.
	Meta Meta
	// Profile is ProfileLAN (default) or ProfileLocal.
	Profile Profile
	// JoinBackoffMax caps the wait between join attempts; 0 means 5s.
	JoinBackoffMax time.Duration
	// Logger receives this package's and memberlist's logs; nil means none.
	Logger *zap.Logger
	// Transport replaces the UDP/TCP transport (unit tests use
	// memberlist.MockNetwork).
	Transport memberlist.Transport
}

// Cluster is a running gossip node.
type Cluster struct {
	cfg     Config
	log     *zap.Logger
	ml      *memberlist.Memberlist
	keyring *memberlist.Keyring // nil: unencrypted
	changes chan struct{}

	mu        sync.Mutex
	meta      Meta
	metaRaw   []byte
	gateways  map[string]GatewayInfo // by node name
	members   map[string]bool        // alive node names
	badMeta   map[string]bool        // nodes already warned about
	nameTaken *memberlist.Node       // a live member already has our node name
	nameSeen  map[string]bool        // name@addr conflicts already logged

	closing  atomic.Bool // Leave or Shutdown began
	shut     atomic.Bool // Shutdown began: Leave must not reach memberlist
	cancel   context.CancelFunc
	joinDone chan struct{}
	joined   chan struct{}
	once     sync.Once
}

var _ Membership = (*Cluster)(nil)

// New starts a gossip node and, when cfg.Join is set, keeps trying to join
// in the background until a seed answers (see Joined).
func New(cfg Config) (*Cluster, error) {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if _, err := cfg.Meta.Encode(); err != nil && cfg.Meta.ID != "" {
		return nil, err // fail before binding sockets
	}
	c := &Cluster{
		cfg:      cfg,
		log:      cfg.Logger,
		changes:  make(chan struct{}, 1),
		gateways: map[string]GatewayInfo{},
		members:  map[string]bool{},
		badMeta:  map[string]bool{},
		nameSeen: map[string]bool{},
		joinDone: make(chan struct{}),
		joined:   make(chan struct{}),
	}
	var mc *memberlist.Config
	switch cfg.Profile {
	case "", ProfileLAN:
		mc = memberlist.DefaultLANConfig()
	case ProfileLocal:
		mc = memberlist.DefaultLocalConfig()
	default:
		return nil, fmt.Errorf("cluster: profile %q: want lan or local", cfg.Profile)
	}
	mc.PushPullInterval = PushPullInterval
	mc.Logger = log.New(&zapWriter{log: c.log.Named("memberlist"), closing: &c.closing}, "", 0)
	mc.Delegate = (*delegate)(c)
	mc.Events = (*events)(c)
	mc.Conflict = (*conflicts)(c)
	if len(cfg.Keys) > 0 {
		kr, err := memberlist.NewKeyring(cfg.Keys, cfg.Keys[0])
		if err != nil {
			return nil, fmt.Errorf("cluster: gossip key: %w", err)
		}
		mc.Keyring = kr
		c.keyring = kr
	}
	if cfg.Transport != nil {
		mc.Transport = cfg.Transport
	} else {
		host, portStr, err := net.SplitHostPort(cfg.BindAddr)
		if err != nil {
			return nil, fmt.Errorf("cluster: gossip bind address %q: %w", cfg.BindAddr, err)
		}
		port, err := strconv.Atoi(portStr)
		if err != nil {
			return nil, fmt.Errorf("cluster: gossip bind port %q: %w", portStr, err)
		}
		if host == "" {
			host = "0.0.0.0"
		}
		nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{
			BindAddrs: []string{host},
			BindPort:  port,
			Logger:    mc.Logger,
		})
		if err != nil {
			return nil, fmt.Errorf("cluster: gossip bind %s: %w", cfg.BindAddr, err)
		}
		port = nt.GetAutoBindPort()
		mc.Transport = nt
		mc.BindAddr, mc.BindPort = host, port
		mc.AdvertisePort = port
		if ip := net.ParseIP(host); ip != nil && !ip.IsUnspecified() {
			mc.AdvertiseAddr = host
		}
	}
	if cfg.NodeName == "" {
		hn, err := os.Hostname()
		if err != nil {
			hn = "tether"
		}
		cfg.NodeName = fmt.Sprintf("%s-%d", hn, mc.BindPort)
	}
	mc.Name = cfg.NodeName
	if cfg.Meta.ID == "" {
		cfg.Meta.ID = cfg.NodeName
	}
	c.cfg = cfg
	raw, err := cfg.Meta.Encode()
	if err == nil {
		cfg.Meta.Version = MetaVersion
		c.meta, c.metaRaw = cfg.Meta, raw
		var ml *memberlist.Memberlist
		ml, err = memberlist.Create(mc)
		c.ml = ml
	}
	if err != nil {
		if cfg.Transport == nil {
			_ = mc.Transport.Shutdown()
		}
		return nil, fmt.Errorf("cluster: start gossip: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c.cancel = cancel
	if len(cfg.Join) == 0 {
		close(c.joined)
		close(c.joinDone)
	} else {
		go c.joinLoop(ctx)
	}
	return c, nil
}

// ErrNotEncrypted is returned by SetKeys on a node started without a key:
// memberlist cannot turn encryption on in a running node.
var ErrNotEncrypted = errors.New("cluster: gossip was started unencrypted; restart with a key to encrypt it")

// Encrypted reports whether this node encrypts and authenticates gossip.
func (c *Cluster) Encrypted() bool { return c.keyring != nil }

// SetKeys replaces the keyring of a running node (keys[0] becomes the
// primary, which encrypts; the others are still accepted). Rotating a key
// without a partition takes three steps, each applied on every node before
// the next: add the new key as a secondary, make it the primary, remove
// the old one. Safe for concurrent use.
func (c *Cluster) SetKeys(keys [][]byte) error {
	if !c.Encrypted() {
		return ErrNotEncrypted
	}
	if len(keys) == 0 {
		return errors.New("cluster: empty keyring")
	}
	kr := c.keyring
	for _, k := range keys {
		if err := kr.AddKey(k); err != nil {
			return fmt.Errorf("cluster: gossip key: %w", err)
		}
	}
	if err := kr.UseKey(keys[0]); err != nil {
		return fmt.Errorf("cluster: gossip key: %w", err)
	}
	keep := map[string]bool{}
	for _, k := range keys {
		keep[string(k)] = true
	}
	for _, k := range kr.GetKeys() {
		if !keep[string(k)] {
			if err := kr.RemoveKey(k); err != nil {
				return fmt.Errorf("cluster: gossip key: %w", err)
			}
		}
	}
	return nil
}

// Name is this node's memberlist name.
func (c *Cluster) Name() string { return c.cfg.NodeName }

// Addr is the gossip address this node advertises (HOST:PORT).
func (c *Cluster) Addr() string {
	n := c.ml.LocalNode()
	return net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port)))
}

// Joined is closed once a seed answered (immediately for a first node).
func (c *Cluster) Joined() <-chan struct{} { return c.joined }

func (c *Cluster) joinLoop(ctx context.Context) {
	defer close(c.joinDone)
	maxBackoff := c.cfg.JoinBackoffMax
	if maxBackoff <= 0 {
		maxBackoff = 5 * time.Second
	}
	backoff := 100 * time.Millisecond
	for attempt := 1; ; attempt++ {
		n, err := c.ml.Join(c.cfg.Join)
		if n > 0 {
			c.log.Info("joined cluster", zap.Strings("seeds", c.cfg.Join), zap.Int("contacted", n), zap.Int("attempts", attempt))
			close(c.joined)
			return
		}
		lvl := zap.DebugLevel
		if attempt == 1 || attempt%10 == 0 {
			lvl = zap.WarnLevel
		}
		c.log.Check(lvl, "no seed answered; retrying").Write(zap.Strings("seeds", c.cfg.Join),
			zap.Int("attempt", attempt), zap.Duration("backoff", backoff), zap.Error(err))
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// SetState publishes a new state (and weight) for this gateway node and
// waits up to timeout for the update to be broadcast. A timeout error means
// the update was not confirmed yet; it keeps spreading by gossip and
// push/pull regardless.
func (c *Cluster) SetState(state State, weight float64, timeout time.Duration) error {
	c.mu.Lock()
	m := c.meta
	m.State, m.Weight = state, weight
	raw, err := m.Encode()
	if err != nil {
		c.mu.Unlock()
		return err
	}
	c.meta, c.metaRaw = m, raw
	c.mu.Unlock()
	return c.ml.UpdateNode(timeout)
}

// Gateways implements Membership.
func (c *Cluster) Gateways() []GatewayInfo {
	c.mu.Lock()
	out := make([]GatewayInfo, 0, len(c.gateways))
	for _, g := range c.gateways {
		out = append(out, g)
	}
	c.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		if out[i].ID != out[j].ID {
			return out[i].ID < out[j].ID
		}
		return out[i].Node < out[j].Node
	})
	return out
}

// ErrIDConflict means another live member already claims this node's
// gateway ID.
var ErrIDConflict = errors.New("cluster: gateway ID already held by another live member")

// ClaimID checks that no other live member claims this gateway's ID. It
// waits until the node has joined (a first node checks at once) or ctx is
// done; the error wraps ErrIDConflict and names the holder. A node that
// restarts under its old node name is a rejoin, not a conflict. Gateways
// start as draining, call ClaimID, and only then publish active (see
// SetState), so a second gateway started with a used ID never takes keys.
func (c *Cluster) ClaimID(ctx context.Context) error {
	select {
	case <-c.joined:
	case <-ctx.Done():
		return fmt.Errorf("cluster: gossip join not finished: %w", ctx.Err())
	}
	c.mu.Lock()
	if n := c.nameTaken; n != nil {
		c.mu.Unlock()
		return fmt.Errorf("%w: node name %q is held by a live member at %s; give this gateway its own ID (its node name defaults to the ID), "+
			"or, if this is that gateway restarted at a new address, wait until the old one is declared dead", ErrIDConflict, n.Name, n.Address())
	}
	id := c.meta.ID
	var others []GatewayInfo
	for _, g := range c.gateways {
		if g.ID == id && g.Node != c.cfg.NodeName {
			others = append(others, g)
		}
	}
	c.mu.Unlock()
	if len(others) == 0 {
		return nil
	}
	sort.Slice(others, func(i, j int) bool { return others[i].Node < others[j].Node })
	o := others[0]
	return fmt.Errorf("%w: %q is held by node %q at %s (%s); give this gateway its own ID, "+
		"or, if this is that gateway restarted under a new node name, reuse its node name or wait until the old one is declared dead", ErrIDConflict, id, o.Node, o.Addr, o.State)
}

// Changes implements Membership.
func (c *Cluster) Changes() <-chan struct{} { return c.changes }

// Peers returns the gossip addresses of the other alive members: seeds
// through which a successor of this node (an upgrade) rejoins. Do not call
// it from a memberlist event callback.
func (c *Cluster) Peers() []string {
	var out []string
	for _, n := range c.ml.Members() {
		if n.Name != c.cfg.NodeName && n.State == memberlist.StateAlive {
			out = append(out, n.Address())
		}
	}
	sort.Strings(out)
	return out
}

// Members is the number of alive nodes this node knows, itself included.
func (c *Cluster) Members() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.members)
}

// Leave tells the cluster this node is going away and waits up to timeout
// for the message to spread. After Shutdown it does nothing (memberlist
// would panic).
func (c *Cluster) Leave(timeout time.Duration) error {
	c.closing.Store(true)
	if c.shut.Load() {
		return nil
	}
	return c.ml.Leave(timeout)
}

// Shutdown stops gossip without telling anyone (peers will detect the
// failure); call Leave first for a graceful exit. Idempotent.
func (c *Cluster) Shutdown() error {
	var err error
	c.closing.Store(true)
	c.once.Do(func() {
		c.shut.Store(true)
		c.cancel()
		<-c.joinDone
		err = c.ml.Shutdown()
	})
	return err
}

func (c *Cluster) notify() {
	select {
	case c.changes <- struct{}{}:
	default:
	}
}

// delegate answers memberlist's questions about this node. Its methods may
// be called concurrently and must not block.
type delegate Cluster

func (d *delegate) NodeMeta(limit int) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.metaRaw) > limit { // cannot happen: Encode caps the size
		return nil
	}
	return append([]byte(nil), d.metaRaw...)
}
func (d *delegate) NotifyMsg([]byte)                    {}
func (d *delegate) GetBroadcasts(int, int) [][]byte     { return nil }
func (d *delegate) LocalState(bool) []byte              { return nil }
func (d *delegate) MergeRemoteState(buf []byte, _ bool) {}

// events applies memberlist's membership events to the gateway map. The
// callbacks run on memberlist's goroutines: they only update the map and
// signal, never call back into memberlist.
type events Cluster

func (e *events) NotifyJoin(n *memberlist.Node)   { e.upsert(n) }
func (e *events) NotifyUpdate(n *memberlist.Node) { e.upsert(n) }
func (e *events) NotifyLeave(n *memberlist.Node) {
	c := (*Cluster)(e)
	c.mu.Lock()
	g, wasGateway := c.gateways[n.Name]
	delete(c.gateways, n.Name)
	delete(c.members, n.Name)
	delete(c.badMeta, n.Name)
	c.mu.Unlock()
	if wasGateway {
		c.log.Info("gateway left", zap.String("node", n.Name), zap.String("id", g.ID))
	}
	c.notify()
}

func (e *events) upsert(n *memberlist.Node) {
	c := (*Cluster)(e)
	m, err := DecodeMeta(n.Meta)
	c.mu.Lock()
	c.members[n.Name] = true
	old, had := c.gateways[n.Name]
	warn := false
	if err != nil {
		delete(c.gateways, n.Name)
		warn = !c.badMeta[n.Name]
		c.badMeta[n.Name] = true
	} else if m.Role == RoleGateway {
		c.gateways[n.Name] = GatewayInfo{Node: n.Name, ID: m.ID, Addr: m.Addr, Weight: m.Weight, State: m.State}
	} else {
		delete(c.gateways, n.Name)
	}
	now, has := c.gateways[n.Name]
	c.mu.Unlock()
	if warn {
		c.log.Warn("ignoring member with unreadable meta", zap.String("node", n.Name), zap.Error(err))
	}
	if has && (!had || old != now) {
		c.log.Info("gateway update", zap.String("node", n.Name), zap.String("id", now.ID),
			zap.String("addr", now.Addr), zap.Float64("weight", now.Weight), zap.String("state", string(now.State)))
	}
	c.notify()
}

// conflicts hears of two live nodes using one node name at different
// addresses (memberlist keeps the one it knew first). Called with
// memberlist's state lock held: it only records and logs.
type conflicts Cluster

func (d *conflicts) NotifyConflict(existing, other *memberlist.Node) {
	c := (*Cluster)(d)
	c.mu.Lock()
	mine := existing.Name == c.cfg.NodeName
	if mine && c.nameTaken == nil {
		n := *other
		c.nameTaken = &n
	}
	k := other.Name + "@" + other.Address()
	first := !c.nameSeen[k]
	c.nameSeen[k] = true
	c.mu.Unlock()
	if !first {
		return
	}
	if mine {
		c.log.Error("another live member uses this node's gossip name", zap.String("node", other.Name), zap.String("other_addr", other.Address()))
		return
	}
	c.log.Error("two live members use one gossip node name: the one known first is kept, the other is ignored",
		zap.String("node", existing.Name), zap.String("kept_addr", existing.Address()), zap.String("ignored_addr", other.Address()))
}

var (
	_ memberlist.Delegate         = (*delegate)(nil)
	_ memberlist.EventDelegate    = (*events)(nil)
	_ memberlist.ConflictDelegate = (*conflicts)(nil)
)
