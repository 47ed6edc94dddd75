// Package sock holds the proxy's lean TCP dial: a gateway connection made
// with raw system calls and registered once in Go's poller, for a fraction
// of what net.Dialer spends per connection (no address lookups of either
// end, no per-dial goroutine handoffs, fewer allocations). It is Linux-only;
// elsewhere Dial is net.Dialer's.
package sock
