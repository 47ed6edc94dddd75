package proto

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// HelloVersion is the only hello frame version this package accepts.
const HelloVersion = 1

// HelloHeaderSize is the fixed part of a hello frame: the u32 length prefix,
// the version byte and the key length byte.
const HelloHeaderSize = 4 + 1 + 1

// DefaultMaxHello is the default bound on a hello frame's length field
// (the proxy's --max-hello).
const DefaultMaxHello = 4096

// MaxKeyLen is the longest key a hello frame can carry (keylen is one byte).
const MaxKeyLen = 255

// Routing outcomes of reading a client's first bytes. Every malformed-input
// error wraps ErrBadHello so callers can treat them alike, and Reason maps
// each one to a stable metric label.
var (
	// ErrNeedMore means the bytes seen so far are a valid prefix but the key
	// is not complete yet: read more and ask again.
	ErrNeedMore = errors.New("proto: need more bytes")
	// ErrBadHello is the parent of every malformed-first-packet error.
	ErrBadHello = errors.New("proto: bad hello")
	// ErrBadVersion means the version byte is not HelloVersion.
	ErrBadVersion = fmt.Errorf("%w: unsupported version", ErrBadHello)
	// ErrBadKeyLen means keylen is 0.
	ErrBadKeyLen = fmt.Errorf("%w: key length 0", ErrBadHello)
	// ErrBadLength means the frame length cannot hold version, keylen and key.
	ErrBadLength = fmt.Errorf("%w: frame length shorter than its key", ErrBadHello)
	// ErrTooLarge means the frame is longer than the configured maximum.
	ErrTooLarge = fmt.Errorf("%w: frame too large", ErrBadHello)
)

// Reason returns a short, stable label for a handshake error, used as the
// reason label of tether_handshake_failures_total. Unknown errors map to
// "other".
func Reason(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, ErrBadVersion):
		return "bad_version"
	case errors.Is(err, ErrBadKeyLen):
		return "bad_keylen"
	case errors.Is(err, ErrBadLength):
		return "bad_length"
	case errors.Is(err, ErrTooLarge):
		return "too_large"
	case errors.Is(err, ErrBadHello):
		return "malformed"
	case errors.Is(err, ErrNoKey):
		return "no_key"
	case errors.Is(err, ErrNeedMore):
		return "truncated"
	default:
		return "other"
	}
}

// Hello is a parsed hello frame. Key and Payload alias the parsed buffer.
type Hello struct {
	// Key is the session key (1..255 bytes).
	Key []byte
	// Payload is the application bytes after the key, inside the frame.
	Payload []byte
	// FrameLen is the whole frame's size on the wire, length prefix included.
	FrameLen int
}

// ParseHello parses a hello frame at the start of b. maxLen bounds the frame's
// length field (0 means DefaultMaxHello). It returns ErrNeedMore when b is a
// valid but incomplete prefix, and an error wrapping ErrBadHello as soon as
// the bytes seen cannot start a valid frame. It never reads past the declared
// frame length.
func ParseHello(b []byte, maxLen int) (Hello, error) {
	if maxLen <= 0 {
		maxLen = DefaultMaxHello
	}
	if len(b) < 4 {
		return Hello{}, ErrNeedMore
	}
	length := binary.BigEndian.Uint32(b)
	if uint64(length) > uint64(maxLen) {
		return Hello{}, ErrTooLarge
	}
	if length < 2 {
		return Hello{}, ErrBadLength
	}
	if len(b) < 5 {
		return Hello{}, ErrNeedMore
	}
	if b[4] != HelloVersion {
		return Hello{}, ErrBadVersion
	}
	if len(b) < 6 {
		return Hello{}, ErrNeedMore
	}
	keyLen := int(b[5])
	if keyLen == 0 {
		return Hello{}, ErrBadKeyLen
	}
	if int(length) < 2+keyLen {
		return Hello{}, ErrBadLength
	}
	frameLen := 4 + int(length)
	if len(b) < frameLen {
		return Hello{}, ErrNeedMore
	}
	return Hello{
		Key:      b[HelloHeaderSize : HelloHeaderSize+keyLen],
		Payload:  b[HelloHeaderSize+keyLen : frameLen],
		FrameLen: frameLen,
	}, nil
}

// AppendHello appends a hello frame carrying key and payload to dst. It is
// what clients (and tests) send; it returns an error if the key length is out
// of range.
func AppendHello(dst, key, payload []byte) ([]byte, error) {
	if len(key) == 0 || len(key) > MaxKeyLen {
		return dst, fmt.Errorf("append hello: key length %d: %w", len(key), ErrBadKeyLen)
	}
	dst = binary.BigEndian.AppendUint32(dst, uint32(2+len(key)+len(payload)))
	dst = append(dst, HelloVersion, byte(len(key)))
	dst = append(dst, key...)
	return append(dst, payload...), nil
}

// HelloExtractor is the default Extractor (--key-from hello): the key is the
// hello frame's key field.
type HelloExtractor struct {
	// MaxLen bounds the frame's length field; 0 means DefaultMaxHello.
	MaxLen int
}

var _ Extractor = HelloExtractor{}

// Extract implements Extractor.
func (e HelloExtractor) Extract(b []byte) ([]byte, error) {
	h, err := ParseHello(b, e.MaxLen)
	if err != nil {
		return nil, err
	}
	return h.Key, nil
}

// MaxPeek implements Extractor: a whole frame, length prefix included.
func (e HelloExtractor) MaxPeek() int {
	if e.MaxLen <= 0 {
		return 4 + DefaultMaxHello
	}
	return 4 + e.MaxLen
}
