//go:build !linux

package upgrade

import (
	"context"
	"errors"
	"net"
	"os"
	"time"
)

// errUnsupported: handing sockets and sessions over needs Linux.
var errUnsupported = errors.New("upgrade: in-place upgrades need Linux")

// Parent is the old process as the new one sees it; never made here.
type Parent struct{}

// Inherit finds no upgrade outside Linux (and refuses one it was asked
// to join).
func Inherit(time.Duration) (*Parent, error) {
	if _, ok := os.LookupEnv(EnvFD); ok {
		return nil, errUnsupported
	}
	return nil, nil
}

// Started is when the upgrade began.
func (p *Parent) Started() time.Time { return time.Time{} }

// Snapshot is the old process's membership.
func (p *Parent) Snapshot() Snapshot { return Snapshot{} }

// Listener returns a passed listening socket.
func (p *Parent) Listener(string, string) (net.Listener, error) { return nil, errUnsupported }

// Unclaimed names passed sockets not taken.
func (p *Parent) Unclaimed() []string { return nil }

// Ready tells the old process this one can serve.
func (p *Parent) Ready() error { return errUnsupported }

// Refuse tells the old process this one cannot take over.
func (p *Parent) Refuse(error) {}

// Take runs the rest of an upgrade.
func (p *Parent) Take(New) (Taken, error) { return Taken{}, errUnsupported }

// Run upgrades old; not outside Linux.
func Run(context.Context, Old, Config) (Result, error) { return Result{}, errUnsupported }
