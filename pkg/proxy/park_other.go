//go:build !linux

package proxy

import (
	"time"

	"go.uber.org/zap"
)

// parker is Linux-only; elsewhere sessions use one goroutine per direction.
type parker struct{}

// parkedDir is a parked direction; never created here.
type parkedDir struct{}

// parkedSession is the parker's state of a session; never created here.
type parkedSession struct{}

func (*parkedSession) aborted() {}

// evloop is an event loop of the parker; never created here.
type evloop struct{}

func newParker(*zap.Logger, *Metrics, time.Duration, func() time.Time, func(*session, int64, int64), func(*parkedDir, bool), int) (*parker, error) {
	return nil, nil
}
func (p *parker) adopt(*session) *parkedSession { return nil }
func (p *parker) runClient(*parkedSession)      {}
func (p *parker) run(*parkedDir)                {}
func (p *parker) work(*parkedDir)               {}
func (p *parker) close()                        {}
func (p *parker) parkedCount() int              { return 0 }
func (p *parker) start(fronts)                  {}
