//go:build !linux

package proxy

import (
	"net"
	"syscall"
)

// front is the event-loop handshake, Linux-only; elsewhere every
// connection's handshake runs in a goroutine.
type front struct{}

// fronts are a Server's fronts; always nil here.
type fronts []*front

func newFronts(*Server, *parker) (fronts, error)            { return nil, nil }
func (fronts) serve(syscall.RawConn, <-chan struct{}) error { return nil }
func (fronts) unwatchListener(syscall.RawConn)              {}
func listenerConn(net.Listener) syscall.RawConn             { return nil }
