package proxy

import (
	"bufio"
	"bytes"
	"net"
	"testing"

	"github.com/pires/go-proxyproto"

	"github.com/tether-proxy/tether/pkg/proto"
)

func TestProxyV2RoundTrip(t *testing.T) {
	client := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2), Port: 40000}
	local := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 7000}
	b, err := AppendProxyV2([]byte("pre"), client, local, []byte("user-42"))
	if err != nil {
		t.Fatal(err)
	}
	if string(b[:3]) != "pre" {
		t.Fatal("dst prefix lost")
	}
	h, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(b[3:])))
	if err != nil {
		t.Fatal(err)
	}
	if h.Version != 2 || h.Command != proxyproto.PROXY {
		t.Fatalf("header %+v", h)
	}
	if src := h.SourceAddr.(*net.TCPAddr); !src.IP.Equal(client.IP) || src.Port != client.Port {
		t.Fatalf("source %v, want %v", h.SourceAddr, client)
	}
	if got := keyTLV(h); string(got) != "user-42" {
		t.Fatalf("key TLV %q", got)
	}
}

func TestProxyV2LocalWhenAddressUnknown(t *testing.T) {
	b, err := AppendProxyV2(nil, &net.UnixAddr{Name: "x", Net: "unix"}, &net.TCPAddr{}, []byte("k"))
	if err != nil {
		t.Fatal(err)
	}
	h, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(b)))
	if err != nil {
		t.Fatal(err)
	}
	if h.Command != proxyproto.LOCAL || string(keyTLV(h)) != "k" {
		t.Fatalf("header %+v key %q", h, keyTLV(h))
	}
	if keyTLV(nil) != nil {
		t.Fatal("nil header has a key")
	}
}

// keyTLV returns the key TLV of h, or nil.
func keyTLV(h *proxyproto.Header) []byte {
	if h == nil {
		return nil
	}
	tlvs, _ := h.TLVs()
	for _, t := range tlvs {
		if t.Type == proto.KeyTLV {
			return t.Value
		}
	}
	return nil
}
