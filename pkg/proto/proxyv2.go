package proto

// KeyTLV is the PROXY protocol v2 TLV type in which a proxy sends the
// session key to the gateway. 0xE0 is in the range the PROXY spec leaves to
// applications.
const KeyTLV = 0xE0
