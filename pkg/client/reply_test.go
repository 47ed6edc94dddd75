package client

import (
	"bytes"
	"errors"
	"testing"
)

func TestReadReplyErrors(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
		want error
	}{
		{"short length", []byte{0, 0}, nil},
		{"huge reply", []byte{0xff, 0, 0, 0}, ErrReplyTooLarge},
		{"truncated body", []byte{0, 0, 0, 9, '{'}, nil},
		{"bad JSON", []byte{0, 0, 0, 2, '{', 'x'}, nil},
	}
	for _, tt := range tests {
		_, _, err := ReadReply(bytes.NewReader(tt.in))
		if err == nil || (tt.want != nil && !errors.Is(err, tt.want)) {
			t.Errorf("%s: err = %v", tt.name, err)
		}
	}
}

func TestHelloKeyLength(t *testing.T) {
	if _, err := Hello("", nil); err == nil {
		t.Fatal("empty key accepted")
	}
	if _, err := Hello(string(make([]byte, 256)), nil); err == nil {
		t.Fatal("256-byte key accepted")
	}
}
