package proto

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestPrefixAndLV(t *testing.T) {
	tests := []struct {
		name string
		e    Extractor
		in   string
		key  string
		err  error
	}{
		{"prefix", PrefixExtractor{Off: 2, Len: 3}, "xxKEYyy", "KEY", nil},
		{"prefix short", PrefixExtractor{Off: 2, Len: 3}, "xxKE", "", ErrNeedMore},
		{"lv1", LVExtractor{Off: 0, Size: 1}, "\x03abcrest", "abc", nil},
		{"lv2 offset", LVExtractor{Off: 1, Size: 2}, "z\x00\x02hi", "hi", nil},
		{"lv4", LVExtractor{Off: 0, Size: 4}, "\x00\x00\x00\x05helloworld", "hello", nil},
		{"lv4 partial length", LVExtractor{Off: 0, Size: 4}, "\x00\x00", "", ErrNeedMore},
		{"lv4 partial key", LVExtractor{Off: 0, Size: 4}, "\x00\x00\x00\x05hel", "", ErrNeedMore},
		{"lv zero", LVExtractor{Off: 0, Size: 4}, "\x00\x00\x00\x00", "", ErrBadKeyLen},
		{"lv huge", LVExtractor{Off: 0, Size: 4}, "\xff\xff\xff\xff", "", ErrTooLarge},
		{"lv bad size", LVExtractor{Off: 0, Size: 3}, "\x00\x00\x01k", "", ErrBadHello},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key, err := tt.e.Extract([]byte(tt.in))
			if !errors.Is(err, tt.err) || string(key) != tt.key {
				t.Fatalf("got %q, %v; want %q, %v", key, err, tt.key, tt.err)
			}
		})
	}
}

func TestHTTPExtractor(t *testing.T) {
	req := "GET /ws?sid=q-key&x=1 HTTP/1.1\r\nHost: h\r\nX-Session: h-key\r\nCookie: a=1; sid=c-key; b=2\r\nUpgrade: websocket\r\n\r\n"
	tests := []struct {
		name string
		e    HTTPExtractor
		in   string
		key  string
		err  error
	}{
		{"cookie", HTTPExtractor{From: FromCookie, Name: "sid"}, req, "c-key", nil},
		{"header case-insensitive", HTTPExtractor{From: FromHeader, Name: "x-session"}, req, "h-key", nil},
		{"query", HTTPExtractor{From: FromQuery, Name: "sid"}, req, "q-key", nil},
		{"query needs only the request line", HTTPExtractor{From: FromQuery, Name: "sid"}, "GET /?sid=k HTTP/1.1\r\nHo", "k", nil},
		{"missing cookie", HTTPExtractor{From: FromCookie, Name: "nope"}, req, "", ErrNoKey},
		{"missing query", HTTPExtractor{From: FromQuery, Name: "nope"}, req, "", ErrNoKey},
		{"no CRLF yet", HTTPExtractor{From: FromCookie, Name: "sid"}, "GET / HTTP/1.1", "", ErrNeedMore},
		{"headers split across packets", HTTPExtractor{From: FromCookie, Name: "sid"}, req[:60], "", ErrNeedMore},
		{"method prefix", HTTPExtractor{From: FromCookie, Name: "sid"}, "GE", "", ErrNeedMore},
		{"huge header", HTTPExtractor{From: FromCookie, Name: "sid", MaxLen: 64}, "GET / HTTP/1.1\r\nX: " + strings.Repeat("a", 100), "", ErrTooLarge},
		{"not http", HTTPExtractor{From: FromCookie, Name: "sid"}, "\x00\x00\x00\x05\x01", "", ErrBadHello},
		{"bad request line", HTTPExtractor{From: FromCookie, Name: "sid"}, "GET /\r\n\r\n", "", ErrBadHello},
		{"bad header line", HTTPExtractor{From: FromCookie, Name: "sid"}, "GET / HTTP/1.1\r\nno colon\r\n\r\n", "", ErrBadHello},
		{"pipelined requests: first wins", HTTPExtractor{From: FromCookie, Name: "sid"},
			"GET / HTTP/1.1\r\nCookie: sid=first\r\n\r\nGET / HTTP/1.1\r\nCookie: sid=second\r\n\r\n", "first", nil},
		{"key too long", HTTPExtractor{From: FromHeader, Name: "k"}, "GET / HTTP/1.1\r\nk: " + strings.Repeat("z", 300) + "\r\n\r\n", "", ErrTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key, err := tt.e.Extract([]byte(tt.in))
			if !errors.Is(err, tt.err) || string(key) != tt.key {
				t.Fatalf("got %q, %v; want %q, %v", key, err, tt.key, tt.err)
			}
		})
	}
	if !IsHTTP([]byte(req)) || IsHTTP([]byte{0, 0, 0, 1}) {
		t.Fatal("IsHTTP")
	}
}

func TestChainAndParse(t *testing.T) {
	e, err := ParseKeyFrom("cookie:sid,query:sid", 4096)
	if err != nil {
		t.Fatal(err)
	}
	key, err := e.Extract([]byte("GET /?sid=fromquery HTTP/1.1\r\nHost: x\r\n\r\n"))
	if err != nil || string(key) != "fromquery" {
		t.Fatalf("fallback: %q %v", key, err)
	}
	if _, err := e.Extract([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")); !errors.Is(err, ErrNoKey) {
		t.Fatalf("no key anywhere: %v", err)
	}
	mixed, _ := ParseKeyFrom("hello,cookie:sid", 4096)
	h, _ := AppendHello(nil, []byte("hk"), nil)
	if key, err := mixed.Extract(h); err != nil || string(key) != "hk" {
		t.Fatalf("hello in a chain: %q %v", key, err)
	}
	if key, err := mixed.Extract([]byte("GET / HTTP/1.1\r\nCookie: sid=ck\r\n\r\n")); err != nil || string(key) != "ck" {
		t.Fatalf("http after hello: %q %v", key, err)
	}
	for _, bad := range []string{"", "nope", "prefix:1", "prefix:a:b", "prefix:0:0", "lv:0:3", "cookie:", "hello:x"} {
		if _, err := ParseKeyFrom(bad, 4096); err == nil {
			t.Errorf("ParseKeyFrom(%q) accepted", bad)
		}
	}
	if e, _ := ParseKeyFrom("lv:0:4", 4096); e.MaxPeek() != 4+MaxKeyLen {
		t.Fatalf("MaxPeek %d", e.MaxPeek())
	}
}

// fuzzExtractor checks the invariants every extractor shares: no panic, a
// key is non-empty, inside the input and within the extractor's peek bound,
// and more input never turns a found key into a different one.
// literal says the key appears verbatim in the input (query values are
// URL-decoded, so for them only the bound is checked).
func fuzzExtractor(f *testing.F, e Extractor, literal bool, seeds ...[]byte) {
	for _, s := range seeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		key, err := e.Extract(b)
		if err != nil {
			if key != nil {
				t.Fatalf("key %q with error %v", key, err)
			}
			return
		}
		if len(key) == 0 || len(key) > MaxKeyLen || (literal && !bytes.Contains(b[:min(len(b), e.MaxPeek())], key)) {
			t.Fatalf("key %q not inside the first %d bytes of %q", key, e.MaxPeek(), b)
		}
		again, err := e.Extract(append(append([]byte{}, b...), "trailing"...))
		if err != nil || !bytes.Equal(again, key) {
			t.Fatalf("more bytes changed the key: %q → %q (%v)", key, again, err)
		}
	})
}

func FuzzPrefix(f *testing.F) {
	fuzzExtractor(f, PrefixExtractor{Off: 3, Len: 8}, true, []byte("abcdefghijklmnop"), nil)
}

func FuzzLV(f *testing.F) {
	fuzzExtractor(f, LVExtractor{Off: 0, Size: 4}, true, []byte("\x00\x00\x00\x03abc"), []byte("\xff\xff\xff\xff"), nil)
}

func FuzzHTTPCookie(f *testing.F) {
	fuzzExtractor(f, HTTPExtractor{From: FromCookie, Name: "sid", MaxLen: 512}, true,
		[]byte("GET / HTTP/1.1\r\nCookie: sid=k\r\n\r\n"), []byte("GET / HTTP/1.1\r\n\r\n"), []byte("POST /x HTTP/1.0\r\nCookie: a=b;sid=\"q\"\r\n\r\n"))
}

func FuzzHTTPHeader(f *testing.F) {
	fuzzExtractor(f, HTTPExtractor{From: FromHeader, Name: "X-Key", MaxLen: 512}, true,
		[]byte("GET / HTTP/1.1\r\nX-Key: k\r\n\r\n"), []byte("GET / HTTP/1.1\r\nx-key:\r\n\r\n"))
}

func FuzzHTTPQuery(f *testing.F) {
	fuzzExtractor(f, HTTPExtractor{From: FromQuery, Name: "sid", MaxLen: 512}, false,
		[]byte("GET /?sid=k HTTP/1.1\r\n\r\n"), []byte("GET /?sid=%41 HTTP/1.1\r\n"), []byte("GET http://h/?sid=a&sid=b HTTP/1.1\r\n"))
}
