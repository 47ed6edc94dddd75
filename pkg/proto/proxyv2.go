package proto

import (
	"fmt"
	"net"

	"github.com/pires/go-proxyproto"
)

// KeyTLV is the PROXY protocol v2 TLV type that carries the session key from
// proxy to gateway (DESIGN §1). 0xE0 is in the range the spec reserves for
// application-specific use.
const KeyTLV proxyproto.PP2Type = 0xE0

// AppendProxyV2 appends a PROXY protocol v2 header to dst that names client as
// the source, local as the destination, and carries key in a KeyTLV. Both
// addresses must be *net.TCPAddr of the same family; otherwise a LOCAL header
// is written (the gateway then uses its TCP peer), which is what the spec
// prescribes for connections whose origin cannot be expressed.
func AppendProxyV2(dst []byte, client, local net.Addr, key []byte) ([]byte, error) {
	h := proxyproto.HeaderProxyFromAddrs(2, client, local) // LOCAL unless both are TCP
	if len(key) > 0 {
		if err := h.SetTLVs([]proxyproto.TLV{{Type: KeyTLV, Value: key}}); err != nil {
			return dst, fmt.Errorf("proxy v2 key tlv: %w", err)
		}
	}
	b, err := h.Format()
	if err != nil {
		return dst, fmt.Errorf("proxy v2 header: %w", err)
	}
	return append(dst, b...), nil
}

// KeyFromHeader returns the session key a proxy put in h's KeyTLV, or nil if
// h is nil or carries none.
func KeyFromHeader(h *proxyproto.Header) []byte {
	if h == nil {
		return nil
	}
	tlvs, err := h.TLVs()
	if err != nil {
		return nil
	}
	for _, t := range tlvs {
		if t.Type == KeyTLV {
			return t.Value
		}
	}
	return nil
}
