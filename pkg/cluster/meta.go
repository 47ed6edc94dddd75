package cluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"

	"github.com/hashicorp/memberlist"
)

// MetaVersion is the node meta format this package writes. Nodes ignore meta
// of a version they do not know, so a mixed-version fleet degrades to
// "unknown member" rather than misrouting.
const MetaVersion = 1

// MetaMaxSize is memberlist's hard limit on node meta; memberlist panics
// beyond it, so Encode refuses to produce more.
const MetaMaxSize = memberlist.MetaMaxSize

// Role says what a cluster member does.
type Role string

// Roles.
const (
	RoleGateway Role = "gateway"
	RoleProxy   Role = "proxy"
	// RoleObserver members only watch: a dispatch service's
	// pkg/directory. Nothing routes to them. Proxies older than this role
	// log "ignoring member with unreadable meta" once and go on.
	RoleObserver Role = "observer"
)

// State is a gateway's lifecycle state.
type State string

// States.
const (
	// StateActive gateways take new keys in proportion to their weight.
	StateActive State = "active"
	// StateDraining gateways take no new keys; sessions already on them
	// keep going until the drain ends.
	StateDraining State = "draining"
	// StateDown gateways failed their health check (tether-agent): they
	// leave every ring at once, as if dead, and their keys go to their
	// next choice until the gateway is active again. Proxies older than
	// this state find the meta invalid, log "ignoring member with
	// unreadable meta" once and leave the gateway out of their ring too,
	// which is what down means.
	StateDown State = "down"
)

// Meta errors.
var (
	// ErrMetaTooLarge means the encoded meta exceeds MetaMaxSize.
	ErrMetaTooLarge = errors.New("cluster: node meta too large")
	// ErrBadMeta means meta bytes do not decode or fail validation.
	ErrBadMeta = errors.New("cluster: bad node meta")
	// ErrMetaVersion means the meta was written by an unknown format
	// version.
	ErrMetaVersion = errors.New("cluster: unknown node meta version")
)

// Meta is what every node publishes about itself over gossip.
type Meta struct {
	// Version is the format version; Encode sets MetaVersion.
	Version int `json:"v"`
	// Role is gateway, proxy or observer.
	Role Role `json:"r"`
	// ID is the gateway ID (what keys hash to) or the proxy's name.
	ID string `json:"id"`
	// Addr is the service address clients' traffic goes to (HOST:PORT).
	Addr string `json:"a"`
	// Weight is the gateway's ring weight (> 0 when active).
	Weight float64 `json:"w,omitempty"`
	// State is active, draining or down (gateways only).
	State State `json:"s,omitempty"`
}

// Validate checks the fields a peer relies on.
func (m Meta) Validate() error {
	switch m.Role {
	case RoleGateway:
		if m.State != StateActive && m.State != StateDraining && m.State != StateDown {
			return fmt.Errorf("%w: state %q", ErrBadMeta, m.State)
		}
		if m.Weight < 0 || math.IsNaN(m.Weight) || math.IsInf(m.Weight, 0) {
			return fmt.Errorf("%w: weight %v", ErrBadMeta, m.Weight)
		}
		if m.Addr == "" {
			return fmt.Errorf("%w: gateway without address", ErrBadMeta)
		}
	case RoleProxy, RoleObserver:
	default:
		return fmt.Errorf("%w: role %q", ErrBadMeta, m.Role)
	}
	if m.ID == "" {
		return fmt.Errorf("%w: empty id", ErrBadMeta)
	}
	return nil
}

// Encode validates m and returns its wire form, at most MetaMaxSize bytes.
func (m Meta) Encode() ([]byte, error) {
	m.Version = MetaVersion
	if err := m.Validate(); err != nil {
		return nil, err
	}
	b, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadMeta, err)
	}
	if len(b) > MetaMaxSize {
		return nil, fmt.Errorf("%w: %d bytes > %d", ErrMetaTooLarge, len(b), MetaMaxSize)
	}
	return b, nil
}

// DecodeMeta parses and validates meta bytes from a peer.
func DecodeMeta(b []byte) (Meta, error) {
	if len(b) > MetaMaxSize {
		return Meta{}, ErrMetaTooLarge
	}
	var m Meta
	if err := json.Unmarshal(b, &m); err != nil {
		return Meta{}, fmt.Errorf("%w: %w", ErrBadMeta, err)
	}
	if m.Version != MetaVersion {
		return Meta{}, fmt.Errorf("%w: %d", ErrMetaVersion, m.Version)
	}
	return m, m.Validate()
}
