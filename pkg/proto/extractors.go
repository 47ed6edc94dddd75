package proto

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
)

// ErrNoKey means the first bytes are well-formed but carry no key (an HTTP
// request without the configured cookie, say). The proxy then applies
// --no-key.
var ErrNoKey = errors.New("proto: no key in the first bytes")

// PrefixExtractor takes the key from fixed bytes: Len bytes at offset Off
// (--key-from prefix:OFF:LEN).
type PrefixExtractor struct {
	Off, Len int
}

var _ Extractor = PrefixExtractor{}

// Extract implements Extractor.
func (e PrefixExtractor) Extract(b []byte) ([]byte, error) {
	if len(b) < e.Off+e.Len {
		return nil, ErrNeedMore
	}
	return b[e.Off : e.Off+e.Len], nil
}

// MaxPeek implements Extractor.
func (e PrefixExtractor) MaxPeek() int { return e.Off + e.Len }

// LVExtractor takes the key from a length-prefixed field, like HAProxy's
// req.payload_lv: a Size-byte big-endian length at offset Off, then that
// many key bytes (--key-from lv:OFF:SIZE, SIZE 1, 2 or 4).
type LVExtractor struct {
	Off, Size int
	// MaxKey bounds the key length; 0 means MaxKeyLen.
	MaxKey int
}

var _ Extractor = LVExtractor{}

func (e LVExtractor) maxKey() int {
	if e.MaxKey <= 0 {
		return MaxKeyLen
	}
	return e.MaxKey
}

// Extract implements Extractor.
func (e LVExtractor) Extract(b []byte) ([]byte, error) {
	if len(b) < e.Off+e.Size {
		return nil, ErrNeedMore
	}
	f := b[e.Off : e.Off+e.Size]
	var n uint64
	switch e.Size {
	case 1:
		n = uint64(f[0])
	case 2:
		n = uint64(binary.BigEndian.Uint16(f))
	case 4:
		n = uint64(binary.BigEndian.Uint32(f))
	default:
		return nil, fmt.Errorf("%w: lv size %d", ErrBadHello, e.Size)
	}
	switch {
	case n == 0:
		return nil, ErrBadKeyLen
	case n > uint64(e.maxKey()):
		return nil, ErrTooLarge
	}
	end := e.Off + e.Size + int(n)
	if len(b) < end {
		return nil, ErrNeedMore
	}
	return b[e.Off+e.Size : end], nil
}

// MaxPeek implements Extractor.
func (e LVExtractor) MaxPeek() int { return e.Off + e.Size + e.maxKey() }

// HTTP key sources.
const (
	FromHeader = "header"
	FromCookie = "cookie"
	FromQuery  = "query"
)

// HTTPExtractor takes the key from an HTTP/1.x request (a WebSocket upgrade,
// typically): a header, a cookie or a query parameter. It parses the request
// line and headers in place; every byte is still forwarded unchanged.
type HTTPExtractor struct {
	// From is FromHeader, FromCookie or FromQuery.
	From string
	// Name is the header, cookie or parameter name.
	Name string
	// MaxLen bounds request line plus headers; 0 means DefaultMaxHello.
	MaxLen int
}

var _ Extractor = HTTPExtractor{}

// IsHTTP reports whether b starts like an HTTP/1.x request line, so a
// request without a key can be answered with a 400 instead of silence.
func IsHTTP(b []byte) bool {
	for _, m := range []string{"GET ", "POST ", "PUT ", "HEAD ", "DELETE ", "OPTIONS ", "PATCH ", "CONNECT "} {
		if bytes.HasPrefix(b, []byte(m)) {
			return true
		}
	}
	return false
}

// Extract implements Extractor.
func (e HTTPExtractor) Extract(b []byte) ([]byte, error) {
	if len(b) > 0 && !IsHTTP(b) && !isMethodPrefix(b) {
		return nil, fmt.Errorf("%w: not an HTTP request", ErrBadHello)
	}
	eol := bytes.Index(b, []byte("\r\n"))
	if eol < 0 {
		return nil, e.needMore(b)
	}
	method, rest, ok1 := strings.Cut(string(b[:eol]), " ")
	target, proto, ok2 := strings.Cut(rest, " ")
	if !ok1 || !ok2 || method == "" || target == "" || !strings.HasPrefix(proto, "HTTP/1.") {
		return nil, fmt.Errorf("%w: bad request line", ErrBadHello)
	}
	if e.From == FromQuery {
		u, err := url.ParseRequestURI(target)
		if err != nil {
			return nil, fmt.Errorf("%w: bad request target", ErrBadHello)
		}
		v := u.Query().Get(e.Name)
		if v == "" {
			return nil, ErrNoKey
		}
		return keyBytes(v)
	}
	end := bytes.Index(b, []byte("\r\n\r\n"))
	if end < 0 {
		return nil, e.needMore(b)
	}
	headers := ""
	if end > eol { // end == eol: no header lines at all
		headers = string(b[eol+2 : end])
	}
	for _, line := range strings.Split(headers, "\r\n") {
		if line == "" {
			continue
		}
		name, value, ok := strings.Cut(line, ":")
		if !ok || strings.ContainsAny(name, " \t") {
			return nil, fmt.Errorf("%w: bad header line", ErrBadHello)
		}
		value = strings.TrimSpace(value)
		switch {
		case e.From == FromHeader && strings.EqualFold(name, e.Name) && value != "":
			return keyBytes(value)
		case e.From == FromCookie && strings.EqualFold(name, "Cookie"):
			for _, kv := range strings.Split(value, ";") {
				k, v, _ := strings.Cut(strings.TrimSpace(kv), "=")
				if k == e.Name && v != "" {
					return keyBytes(strings.Trim(v, `"`))
				}
			}
		}
	}
	return nil, ErrNoKey
}

func keyBytes(v string) ([]byte, error) {
	if len(v) > MaxKeyLen {
		return nil, ErrTooLarge
	}
	return []byte(v), nil
}

// isMethodPrefix accepts a start that may still become a request line
// ("GE" before "GET ").
func isMethodPrefix(b []byte) bool {
	for _, m := range []string{"GET ", "POST ", "PUT ", "HEAD ", "DELETE ", "OPTIONS ", "PATCH ", "CONNECT "} {
		if len(b) < len(m) && strings.HasPrefix(m, string(b)) {
			return true
		}
	}
	return false
}

func (e HTTPExtractor) needMore(b []byte) error {
	if len(b) >= e.MaxPeek() {
		return ErrTooLarge
	}
	return ErrNeedMore
}

// MaxPeek implements Extractor.
func (e HTTPExtractor) MaxPeek() int {
	if e.MaxLen <= 0 {
		return DefaultMaxHello
	}
	return e.MaxLen
}

// Chain tries extractors in order (--key-from cookie:sid,query:sid): the
// first key found wins. An extractor that needs more bytes stops the chain
// until they arrive (it has priority); one whose format does not match, or
// that finds no key, passes to the next.
type Chain []Extractor

var _ Extractor = Chain(nil)

// Extract implements Extractor.
func (c Chain) Extract(b []byte) ([]byte, error) {
	var last error = ErrNoKey
	sawNoKey := false
	for _, e := range c {
		key, err := e.Extract(b)
		switch {
		case err == nil:
			return key, nil
		case errors.Is(err, ErrNeedMore):
			return nil, err
		case errors.Is(err, ErrNoKey):
			sawNoKey = true
		}
		last = err
	}
	if sawNoKey {
		return nil, ErrNoKey
	}
	return nil, last
}

// MaxPeek implements Extractor: the largest of the chain.
func (c Chain) MaxPeek() int {
	m := 0
	for _, e := range c {
		m = max(m, e.MaxPeek())
	}
	return m
}

// ParseKeyFrom parses --key-from: a comma-separated fallback list of hello,
// prefix:OFF:LEN, lv:OFF:SIZE, header:NAME, cookie:NAME, query:NAME.
// maxHello bounds the hello frame and the HTTP header block.
func ParseKeyFrom(spec string, maxHello int) (Extractor, error) {
	var chain Chain
	for _, part := range strings.Split(spec, ",") {
		part = strings.TrimSpace(part)
		kind, arg, _ := strings.Cut(part, ":")
		switch kind {
		case "hello":
			if arg != "" {
				return nil, fmt.Errorf("--key-from %q: hello takes no argument", part)
			}
			chain = append(chain, HelloExtractor{MaxLen: maxHello})
		case "prefix", "lv":
			a, b, ok := strings.Cut(arg, ":")
			off, err1 := strconv.Atoi(a)
			n, err2 := strconv.Atoi(b)
			if !ok || err1 != nil || err2 != nil || off < 0 || off > 1<<16 {
				return nil, fmt.Errorf("--key-from %q: want %s:OFF:%s with numbers", part, kind, map[string]string{"prefix": "LEN", "lv": "SIZE"}[kind])
			}
			if kind == "prefix" {
				if n < 1 || n > MaxKeyLen {
					return nil, fmt.Errorf("--key-from %q: LEN must be 1..%d", part, MaxKeyLen)
				}
				chain = append(chain, PrefixExtractor{Off: off, Len: n})
				continue
			}
			if n != 1 && n != 2 && n != 4 {
				return nil, fmt.Errorf("--key-from %q: SIZE must be 1, 2 or 4", part)
			}
			chain = append(chain, LVExtractor{Off: off, Size: n})
		case FromHeader, FromCookie, FromQuery:
			if arg == "" {
				return nil, fmt.Errorf("--key-from %q: want %s:NAME", part, kind)
			}
			chain = append(chain, HTTPExtractor{From: kind, Name: arg, MaxLen: maxHello})
		default:
			return nil, fmt.Errorf("--key-from %q: want hello, prefix:OFF:LEN, lv:OFF:SIZE, header:NAME, cookie:NAME or query:NAME", part)
		}
	}
	if len(chain) == 1 {
		return chain[0], nil
	}
	return chain, nil
}
