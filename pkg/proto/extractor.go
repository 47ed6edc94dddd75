package proto

// Extractor finds the session key in the first bytes a client sent.
//
// Extract is given every byte read so far (always starting at the first byte
// of the connection) and must not modify it. It returns the key, which may
// alias b, or ErrNeedMore when the key is not complete yet, or an error
// wrapping ErrBadHello when the bytes can never yield a key. Implementations
// must be safe for concurrent use; they hold no per-connection state.
type Extractor interface {
	Extract(b []byte) (key []byte, err error)
	// MaxPeek is the most bytes Extract may need to see; a caller that has
	// read that many and still gets ErrNeedMore treats the input as too
	// large.
	MaxPeek() int
}
