module github.com/tether-proxy/tether

go 1.26.8

require github.com/pires/go-proxyproto v0.15.0
