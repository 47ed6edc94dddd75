// Package proto parses the first bytes a client sends and finds its session
// key, and builds the PROXY protocol v2 header the proxy sends to a gateway.
//
// It works on byte slices only (no sockets): the proxy reads into a bounded
// buffer and asks an Extractor whether the key is complete. Extractors peek;
// they never consume, because every byte the client sent is forwarded to the
// gateway unchanged.
package proto
