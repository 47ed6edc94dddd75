//go:build !linux

package proxy

import "context"

// HandOff needs the parker, which is Linux-only.
func (s *Server) HandOff(context.Context, int, func([]HandedSession) error) (int, error) {
	return 0, ErrHandoffUnsupported
}

// Adopt needs the parker, which is Linux-only.
func (s *Server) Adopt(HandedSession) error { return ErrHandoffUnsupported }
