package proxy

import (
	"sync"
	"sync/atomic"
	"time"
)

// resourceQuiet is how long a proxy that ran out of local resources must go
// without another such failure before it says it recovered: under a flood
// at the descriptor limit, accepts and dials succeed and fail in turns, and
// one warning per turn would bury the log.
const resourceQuiet = time.Second

// exhaustion tracks whether this process is out of local resources
// (descriptors, local ports), so the state change is logged once each way
// rather than once per connection. Safe for concurrent use; a success
// while the state is off costs one atomic load.
type exhaustion struct {
	on       atomic.Bool
	mu       sync.Mutex
	lastFail time.Time
	failures int // since the state turned on
}

// fail records a failure at now; it reports true when this turns the state
// on (log a warning).
func (e *exhaustion) fail(now time.Time) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.lastFail = now
	e.failures++
	if e.on.Load() {
		return false
	}
	e.on.Store(true)
	e.failures = 1
	return true
}

// ok records a success at now(); it reports true, with the number of
// failures seen meanwhile, when this ends the state (quiet for
// resourceQuiet since the last failure). The clock is read only while the
// state is on: a success costs one atomic load otherwise.
func (e *exhaustion) ok(now func() time.Time) (bool, int) {
	if !e.on.Load() {
		return false, 0
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.on.Load() || now().Sub(e.lastFail) < resourceQuiet {
		return false, 0
	}
	e.on.Store(false)
	return true, e.failures
}
