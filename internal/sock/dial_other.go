//go:build !linux

package sock

import (
	"context"
	"net"
)

// Dial is net.Dialer{KeepAlive: -1}.DialContext where the lean dial is not
// built (it is Linux-only).
func Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	return fallback.DialContext(ctx, network, addr)
}

var fallback = &net.Dialer{KeepAlive: -1}

// Conn is never made where the lean dial is not built; the type exists so
// that code which checks for it compiles everywhere.
type Conn struct{ *net.TCPConn }
