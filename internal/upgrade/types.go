// Package upgrade is the SIGUSR2 in-place upgrade of the proxy: the old
// process starts its executable again (the file on disk, so a replaced
// binary is the new version) with the same arguments and environment and
// a Unix socket, and hands the new process, over that socket, its
// listening sockets, its membership, and every established session, with
// SCM_RIGHTS. The new one serves from the first moment; the old one exits
// when it holds nothing. If the new process fails at any step before it
// holds everything, the old one keeps (or takes back) what it has.
//
// The conversation, one JSON message per SOCK_SEQPACKET packet,
// descriptors attached:
//
//	old → new  state      version, listeners (fds), membership snapshot
//	new → old  ready      built and able to serve; or refuse, with a reason
//	old → new  go         the old one stopped accepting; serve now
//	old → new  sessions   a batch of established sessions (fds)
//	new → old  ack        adopted; the old one forgets them
//	old → new  members    the gateways changed meanwhile (old still gossips)
//	old → new  released   the old one left gossip: take over the node name
//
// docs/operating.md has the runbook; docs/design.md the decisions.
package upgrade

import (
	"errors"
	"io"
	"os"
	"time"

	"go.uber.org/zap"

	"github.com/tether-proxy/tether/pkg/cluster"
	"github.com/tether-proxy/tether/pkg/proxy"
)

// EnvFD names the environment variable that tells a new process which
// descriptor is its upgrade socket (3: the first of exec's ExtraFiles).
const EnvFD = "TETHER_UPGRADE_FD"

// Version is the version of the conversation; a new process that does not
// speak the old one's version refuses, and the old one keeps serving.
const Version = 1

// Snapshot is what the new process routes with until it gossips itself:
// the gateways the old one knew, the operator's drains, and the gossip
// addresses of live members, through which the new one rejoins.
type Snapshot struct {
	Gateways []cluster.GatewayInfo `json:"gateways,omitempty"`
	Drained  []string              `json:"drained,omitempty"`
	Peers    []string              `json:"peers,omitempty"`
}

// Outcomes of a failed upgrade (the old process keeps serving); Metrics
// labels them.
var (
	// ErrStart: the executable could not be started at all.
	ErrStart = errors.New("upgrade: cannot start the new process")
	// ErrExited: the new process exited before it was ready.
	ErrExited = errors.New("upgrade: the new process exited before it was ready")
	// ErrNotReady: the new process did not become ready in time; it was
	// killed.
	ErrNotReady = errors.New("upgrade: the new process did not become ready in time")
	// ErrRefused: the new process refused to take over (it says why).
	ErrRefused = errors.New("upgrade: the new process refused to take over")
	// ErrLost: the new process failed after it began serving; it was
	// killed, the old process accepts again and keeps what it still held.
	ErrLost = errors.New("upgrade: the new process failed during the handoff")
)

// ErrAbandoned means the old process gave up on the upgrade before it let
// this one serve (it timed out, or was told to stop); this process must
// exit, the old one serves on.
var ErrAbandoned = errors.New("upgrade: the old process abandoned the upgrade")

// Listener is a listening socket passed to the new process under a name
// ("client", "admin"), with the flag value it was opened for, so a new
// configuration that moves it is refused instead of silently ignored.
type Listener struct {
	Name string
	Flag string   // e.g. the --listen value
	File *os.File // a duplicate; the upgrade closes it
}

// Old is the running process, as an upgrade needs it.
type Old interface {
	// Listeners returns duplicates of the listening sockets.
	Listeners() ([]Listener, error)
	// Snapshot is the membership to route with until the new process
	// gossips.
	Snapshot() Snapshot
	// StopAccepting stops accepting on every listener and returns once
	// no accept is in progress: the new process accepts from now on.
	StopAccepting()
	// ResumeAccepting serves again on duplicates of the listeners after
	// the new process failed.
	ResumeAccepting([]Listener) error
	// Server is the proxy whose sessions are handed over.
	Server() *proxy.Server
	// Changes receives after the membership changed (it is forwarded).
	Changes() <-chan struct{}
	// ReleaseGossip leaves gossip and frees its port, so the new process
	// can take over the node name.
	ReleaseGossip()
}

// Config configures Run.
type Config struct {
	// Exe is the executable to start (the file on disk).
	Exe string
	// Args are the arguments, without the program name.
	Args []string
	// Env is the environment (EnvFD is replaced).
	Env []string
	// Stdout and Stderr are the new process's (it logs where the old one
	// does).
	Stdout, Stderr io.Writer
	// Timeout bounds each phase: becoming ready, and handing everything
	// over (--upgrade-timeout).
	Timeout time.Duration
	// Logger, Metrics: nil means none.
	Logger  *zap.Logger
	Metrics *Metrics
}

// Result is how a successful upgrade ended.
type Result struct {
	// PID is the new process.
	PID int
	// Sessions is how many established sessions were handed over.
	Sessions int
	// Listeners is how many listening sockets were.
	Listeners int
	// Left is how many connections the old process still held at the
	// timeout (handshakes that never finished, sessions it could not
	// stop); the caller drains them as on SIGTERM.
	Left int
	// Took is how long the upgrade took.
	Took time.Duration
}

// New is the new process as Take needs it.
type New interface {
	// Serve starts accepting on the inherited listeners; lastConn is
	// the old process's last connection number.
	Serve(lastConn uint64)
	// Adopt takes over one established session (proxy.Server.Adopt).
	Adopt(proxy.HandedSession) error
	// SetMembers routes with the old process's current membership.
	SetMembers(Snapshot)
}

// Taken is what Take received.
type Taken struct {
	// Sessions were adopted; Failed could not be (they were closed).
	Sessions, Failed int
	// Released says the old process left gossip (otherwise it closed the
	// socket, or died, first).
	Released bool
	// Took is the upgrade's duration so far (from SIGUSR2).
	Took time.Duration
}
