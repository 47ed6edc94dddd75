//go:build !linux

package proxy

import (
	"net"
	"syscall"
)

// front is the event-loop handshake, Linux-only; elsewhere every
// connection's handshake runs in a goroutine.
type front struct{}

func newFront(*Server, *parker) (*front, error)             { return nil, nil }
func (*front) serve(syscall.RawConn, <-chan struct{}) error { return nil }
func (*front) unwatchListener(syscall.RawConn)              {}
func listenerConn(net.Listener) syscall.RawConn             { return nil }
