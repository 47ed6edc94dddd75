package proxy

import (
	"fmt"
	"net"

	"github.com/pires/go-proxyproto"

	"github.com/tether-proxy/tether/pkg/proto"
)

// AppendProxyV2 appends a PROXY protocol v2 header to dst that names client as
// the source, local as the destination, and carries key in a TLV of type proto.KeyTLV. Both
// addresses must be *net.TCPAddr of the same family; otherwise a LOCAL header
// is written (the gateway then uses its TCP peer), which is what the spec
// prescribes for connections whose origin cannot be expressed.
func AppendProxyV2(dst []byte, client, local net.Addr, key []byte) ([]byte, error) {
	h := proxyproto.HeaderProxyFromAddrs(2, client, local) // LOCAL unless both are TCP
	if len(key) > 0 {
		if err := h.SetTLVs([]proxyproto.TLV{{Type: proxyproto.PP2Type(proto.KeyTLV), Value: key}}); err != nil {
			return dst, fmt.Errorf("proxy v2 key tlv: %w", err)
		}
	}
	b, err := h.Format()
	if err != nil {
		return dst, fmt.Errorf("proxy v2 header: %w", err)
	}
	return append(dst, b...), nil
}
