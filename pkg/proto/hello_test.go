package proto

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

func mustHello(t testing.TB, key, payload string) []byte {
	t.Helper()
	b, err := AppendHello(nil, []byte(key), []byte(payload))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func frame(length uint32, rest ...byte) []byte {
	return append(binary.BigEndian.AppendUint32(nil, length), rest...)
}

func TestParseHello(t *testing.T) {
	good := mustHello(t, "user-42", "hi")
	tests := []struct {
		name    string
		in      []byte
		max     int
		key     string
		payload string
		err     error
	}{
		{name: "complete", in: good, key: "user-42", payload: "hi"},
		{name: "trailing bytes are not part of the frame", in: append(append([]byte{}, good...), "more"...), key: "user-42", payload: "hi"},
		{name: "no payload", in: mustHello(t, "k", ""), key: "k"},
		{name: "empty", in: nil, err: ErrNeedMore},
		{name: "three length bytes", in: good[:3], err: ErrNeedMore},
		{name: "length only", in: good[:4], err: ErrNeedMore},
		{name: "no keylen yet", in: good[:5], err: ErrNeedMore},
		{name: "key cut", in: good[:8], err: ErrNeedMore},
		{name: "payload cut", in: good[:len(good)-1], err: ErrNeedMore},
		{name: "length 0", in: frame(0, 1, 1, 'k'), err: ErrBadLength},
		{name: "length 1", in: frame(1, 1), err: ErrBadLength},
		{name: "length shorter than key", in: frame(3, 1, 5, 'a', 'b', 'c', 'd', 'e'), err: ErrBadLength},
		{name: "length 0xFFFFFFFF", in: frame(0xFFFFFFFF, 1, 1, 'k'), err: ErrTooLarge},
		{name: "length above max", in: frame(4097, 1, 1, 'k'), err: ErrTooLarge},
		{name: "length at custom max", in: mustHello(t, "abc", "xy"), max: 7, key: "abc", payload: "xy"},
		{name: "length above custom max", in: mustHello(t, "abc", "xyz"), max: 7, err: ErrTooLarge},
		{name: "version 0", in: frame(3, 0, 1, 'k'), err: ErrBadVersion},
		{name: "version 2", in: frame(3, 2, 1, 'k'), err: ErrBadVersion},
		{name: "keylen 0", in: frame(2, 1, 0), err: ErrBadKeyLen},
		{name: "http request", in: []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), err: ErrTooLarge},
		{name: "tls client hello", in: []byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01}, err: ErrTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, err := ParseHello(tt.in, tt.max)
			if !errors.Is(err, tt.err) {
				t.Fatalf("err = %v, want %v", err, tt.err)
			}
			if tt.err != nil {
				if tt.err != ErrNeedMore && !errors.Is(err, ErrBadHello) {
					t.Fatalf("%v does not wrap ErrBadHello", err)
				}
				return
			}
			if string(h.Key) != tt.key || string(h.Payload) != tt.payload {
				t.Fatalf("got key %q payload %q, want %q %q", h.Key, h.Payload, tt.key, tt.payload)
			}
		})
	}
}

func TestReasonLabels(t *testing.T) {
	seen := map[string]bool{}
	for _, err := range []error{ErrBadVersion, ErrBadKeyLen, ErrBadLength, ErrTooLarge, ErrBadHello, ErrNeedMore, ErrNoKey, errors.New("x")} {
		r := Reason(err)
		if r == "" || seen[r] {
			t.Fatalf("reason %q for %v is empty or not unique", r, err)
		}
		seen[r] = true
	}
}

func TestAppendHelloRejectsKeyLength(t *testing.T) {
	for _, n := range []int{0, 256} {
		if _, err := AppendHello(nil, bytes.Repeat([]byte{'k'}, n), nil); !errors.Is(err, ErrBadKeyLen) {
			t.Errorf("key length %d: err = %v", n, err)
		}
	}
}

func TestHelloExtractor(t *testing.T) {
	e := HelloExtractor{MaxLen: 64}
	if e.MaxPeek() != 68 {
		t.Fatalf("MaxPeek = %d", e.MaxPeek())
	}
	key, err := e.Extract(mustHello(t, "abc", "payload"))
	if err != nil || string(key) != "abc" {
		t.Fatalf("Extract = %q, %v", key, err)
	}
}

// FuzzParseHello checks the parser's invariants on arbitrary input: no panic,
// a key is 1..255 bytes inside the declared frame, the frame never extends
// past the input or the limit, and a parsed frame re-encodes to the same bytes.
func FuzzParseHello(f *testing.F) {
	f.Add(mustHello(f, "user-1", "payload"), 4096)
	f.Add(frame(0xFFFFFFFF, 1, 1, 'k'), 4096)
	f.Add(frame(2, 1, 0), 4096)
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"), 4096)
	f.Add(frame(3, 2, 1, 'k'), 16)
	f.Fuzz(func(t *testing.T, b []byte, max int) {
		h, err := ParseHello(b, max)
		if err != nil {
			if h.Key != nil || h.FrameLen != 0 {
				t.Fatalf("error %v with non-zero hello", err)
			}
			if err != ErrNeedMore && !errors.Is(err, ErrBadHello) {
				t.Fatalf("unexpected error type %v", err)
			}
			return
		}
		limit := max
		if limit <= 0 {
			limit = DefaultMaxHello
		}
		if h.FrameLen > len(b) || h.FrameLen-4 > limit {
			t.Fatalf("frame %d past input %d or limit %d", h.FrameLen, len(b), limit)
		}
		if len(h.Key) < 1 || len(h.Key) > MaxKeyLen {
			t.Fatalf("key length %d", len(h.Key))
		}
		again, err := AppendHello(nil, h.Key, h.Payload)
		if err != nil || !bytes.Equal(again, b[:h.FrameLen]) {
			t.Fatalf("re-encode mismatch: %x vs %x (%v)", again, b[:h.FrameLen], err)
		}
	})
}
