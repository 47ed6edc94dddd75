package proxy

import (
	"errors"
	"time"
)

// Handing established sessions to another process: a SIGUSR2 upgrade
// (docs/operating.md). The sending server stops each session between two
// moves, passes its two sockets (and, for a direction whose destination
// was full, the pipe holding the bytes in flight) with what the session
// knows, and forgets it; the receiving server adopts it into its parker.
// No byte is lost, duplicated or reordered: bytes are only ever in the
// sockets' buffers or in a pipe that moves along.

// ErrHandoffUnsupported means this server cannot hand sessions over or
// adopt them: that needs the parker (Linux, parking on), whose sessions
// are just their sockets and counters between two moves.
var ErrHandoffUnsupported = errors.New("proxy: sessions can be handed over only with parking on (Linux, no --no-park)")

// ErrAcceptStopped is returned by Serve after StopAccepting: the listener
// was closed here but its socket serves on elsewhere.
var ErrAcceptStopped = errors.New("proxy: stopped accepting for a handoff")

// HandedSession is one established session in transit between two
// processes.
type HandedSession struct {
	// State is what the session knows.
	State SessionState
	// FDs are the client socket, the gateway socket, then the read and
	// write ends of the pipe of each direction with Pending bytes, client
	// → gateway first. In HandOff they belong to the sender and are valid
	// only during send; Adopt takes ownership of them.
	FDs []int
}

// SessionState is what a handed session carries besides its descriptors;
// it is JSON so another version of tether can read it.
type SessionState struct {
	// ID is the connection number in logs; it stays the same.
	ID uint64 `json:"id"`
	// Start is when the client connected.
	Start time.Time `json:"start"`
	// KeyHash is the hash of the session key (raw keys are never kept).
	KeyHash uint64 `json:"key_hash"`
	// Gateway is the gateway ID.
	Gateway string `json:"gateway"`
	// Client is the client's address as the session saw it (from a PROXY
	// header if one came).
	Client string `json:"client"`
	// Hello is how many bytes were forwarded before splicing began.
	Hello int64 `json:"hello"`
	// Dirs are the two directions, client → gateway first.
	Dirs [2]DirState `json:"dirs"`
}

// DirState is one direction of a handed session.
type DirState struct {
	// Bytes is how many bytes it moved so far (after the hello).
	Bytes int64 `json:"bytes"`
	// Done means it ended (EOF passed on as a half-close).
	Done bool `json:"done,omitempty"`
	// Pending is how many bytes wait in its pipe for the destination.
	Pending int64 `json:"pending,omitempty"`
}

// CanHandOff reports whether HandOff and Adopt work on this server.
func (s *Server) CanHandOff() bool { return s.parker != nil }

// StopAccepting closes the listeners Serve is using, as a handoff does once
// another process accepts on the same sockets; open sessions are kept, Serve
// returns ErrAcceptStopped, and Serve may be called again (a failed handoff
// resumes on a duplicate of the socket).
func (s *Server) StopAccepting() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopped.Store(true)
	for _, stop := range s.lns {
		stop()
	}
}

// SetNextConnID makes connection numbers continue after last (the last one
// the previous process used), so they stay unique across an upgrade.
func (s *Server) SetNextConnID(last uint64) {
	for {
		cur := s.nextID.Load()
		if cur >= last || s.nextID.CompareAndSwap(cur, last) {
			return
		}
	}
}

// LastConnID is the last connection number used.
func (s *Server) LastConnID() uint64 { return s.nextID.Load() }
