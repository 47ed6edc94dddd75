package proxy

import (
	"testing"
	"time"
)

// TestExhaustionLogsOncePerChange: failures and successes in turns (a flood
// at the descriptor limit) turn the state on once and off once, only after
// a quiet second.
func TestExhaustionLogsOncePerChange(t *testing.T) {
	var e exhaustion
	t0 := time.Unix(1000, 0)
	steps := []struct {
		name      string
		at        time.Duration
		fail      bool
		changed   bool
		failures  int
		wantState bool
	}{
		{"success while fine", 0, false, false, 0, false},
		{"first failure turns it on", 10 * time.Millisecond, true, true, 0, true},
		{"second failure is quiet", 20 * time.Millisecond, true, false, 0, true},
		{"success right after is not recovery", 30 * time.Millisecond, false, false, 0, true},
		{"failure again is quiet", 500 * time.Millisecond, true, false, 0, true},
		{"success within a second of it is not recovery", 1400 * time.Millisecond, false, false, 0, true},
		{"success after a quiet second recovers", 1600 * time.Millisecond, false, true, 3, false},
		{"success after recovery is quiet", 1700 * time.Millisecond, false, false, 0, false},
		{"a new failure turns it on again", 2 * time.Second, true, true, 0, true},
	}
	for _, st := range steps {
		now := t0.Add(st.at)
		var changed bool
		var failures int
		if st.fail {
			changed = e.fail(now)
		} else {
			changed, failures = e.ok(func() time.Time { return now })
		}
		if changed != st.changed || failures != st.failures || e.on.Load() != st.wantState {
			t.Fatalf("%s: changed=%v failures=%d on=%v, want %v %d %v", st.name, changed, failures, e.on.Load(), st.changed, st.failures, st.wantState)
		}
	}
}
