package client

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/tether-proxy/tether/pkg/proto"
)

// MaxReply bounds the reply frame ReadReply accepts.
const MaxReply = 64 << 10

// ErrReplyTooLarge means a reply frame announced more than MaxReply bytes.
var ErrReplyTooLarge = errors.New("client: reply frame too large")

// Reply is the JSON the reference gateway (gateway-stub, and any gateway
// that follows docs/gateway.md) sends in one frame after a hello: which
// gateway serves the session and what it learned.
type Reply struct {
	// Gateway is the gateway's ID.
	Gateway string `json:"gateway"`
	// Key is the session key the gateway received.
	Key string `json:"key"`
	// Conns counts connections the gateway has seen for Key, this one
	// included.
	Conns int `json:"conns"`
	// Client is the client address the gateway learned (from the PROXY
	// header when present, else its TCP peer).
	Client string `json:"client"`
}

// Hello returns the hello frame for key followed by payload (which the
// gateway receives inside the frame). Keys are 1..255 bytes.
func Hello(key string, payload []byte) ([]byte, error) {
	return proto.AppendHello(nil, []byte(key), payload)
}

// ReadReply reads one reply frame ([u32 big-endian length][JSON]) from r.
// It also returns the raw bytes read, so tests can check that nothing the
// client received names a gateway address.
func ReadReply(r io.Reader) (Reply, []byte, error) {
	var head [4]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		return Reply{}, head[:0], fmt.Errorf("read reply length: %w", err)
	}
	n := binary.BigEndian.Uint32(head[:])
	if n > MaxReply {
		return Reply{}, head[:], fmt.Errorf("%w: %d bytes", ErrReplyTooLarge, n)
	}
	raw := make([]byte, 4+n)
	copy(raw, head[:])
	if _, err := io.ReadFull(r, raw[4:]); err != nil {
		return Reply{}, raw, fmt.Errorf("read reply body: %w", err)
	}
	var rep Reply
	if err := json.Unmarshal(raw[4:], &rep); err != nil {
		return Reply{}, raw, fmt.Errorf("decode reply: %w", err)
	}
	return rep, raw, nil
}

// AppendReply appends the reply frame for rep to dst: what a gateway
// sends after the hello.
func AppendReply(dst []byte, rep Reply) ([]byte, error) {
	body, err := json.Marshal(rep)
	if err != nil {
		return dst, err
	}
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(body)))
	return append(dst, body...), nil
}
