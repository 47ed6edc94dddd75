// Package gateway is the gateway side of tether: what a long-lived-connection
// server (push, chat, game, IoT) needs to sit behind tether proxies.
//
// A tether proxy connects to a gateway and sends, before the client's own
// bytes, a PROXY protocol v2 header naming the real client address and
// carrying the session key in TLV 0xE0, then the client's hello frame
// unchanged (docs/gateway.md has the byte layout). NewListener wraps a
// net.Listener so that Accept returns a *Conn whose handshake is already
// done: Key, ClientAddr and Payload tell the session, and Read returns the
// bytes that follow the hello. PROXY headers are believed only from
// Config.TrustedProxies; everything else is closed during the handshake,
// which runs in its own goroutine under a deadline so one slow peer never
// stalls Accept.
//
// Newest session wins: when a connection for key K is accepted while an
// older one for K is still open on the same Listener, the older one is
// reset. A phone that changed networks sends no FIN and no RST; without
// this its stale session lingers until keepalive notices, taking pushes no
// one receives. Config.OnReplaced lets the application move state from the
// old session to the new one.
//
// Join and Member put the gateway into tether's gossip cluster, publishing
// the same node meta the proxies read: its ID (what keys hash to), service
// address, weight and state. A new member joins as draining, checks that no
// other live member holds its ID (Announce), and only then takes keys.
// Drain publishes draining, waits for open sessions to end or a context, and
// leaves.
//
// Gateways written in other languages can join the same way through the
// tether-agent sidecar; see docs/gateway.md.
package gateway
