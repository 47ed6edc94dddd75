package ring

import "strconv"

// KeyHash is the 64-bit hash every tether version uses for keys and member
// IDs: FNV-1a over the bytes, then the murmur3 fmix64 finalizer so that
// every input bit affects every output bit. It is part of the wire contract:
// changing it reroutes every session (golden vectors in testdata pin it).
func KeyHash(b []byte) uint64 {
	h := uint64(14695981039346656037)
	for _, c := range b {
		h ^= uint64(c)
		h *= 1099511628211
	}
	return fmix64(h)
}

// SlotOf is the slot a key hashes into: the top 16 bits of KeyHash.
func SlotOf(key []byte) uint32 {
	return uint32(KeyHash(key) >> 48)
}

// fmix64 is murmur3's 64-bit finalizer, a bijective avalanche mix.
func fmix64(h uint64) uint64 {
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}

// KeyHashHex is KeyHash in lowercase hex, the form tether's logs and admin
// answers show in place of a key (they never show the key itself), so one
// session can be followed across proxies, gateways and lookups.
func KeyHashHex(b []byte) string { return strconv.FormatUint(KeyHash(b), 16) }
