// Package client is the client side of tether's wire protocol: the hello
// frame a client sends first (the session key, then its own bytes) and the
// one reply frame the reference gateway answers with. Reconnect loops and
// proxy lists build on it.
package client
