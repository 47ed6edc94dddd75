# tether in a container: static binaries on a distroless base, running as
# a non-root user. No container engine runs where tether is developed, so
# this file is not built there; `make test` builds the same static binaries
# (CGO_ENABLED=0, checked to need no dynamic loader) and checks that the
# Kubernetes manifests call the paths copied here.
#
#   docker build --build-arg VERSION=$(git describe --tags) --build-arg REVISION=$(git rev-parse --short=12 HEAD) -t tether .
#   docker run --rm tether --version
#
# The proxy is the entrypoint; the gateway stub and tether-agent are in
# the same image for sidecars and examples (deploy/kubernetes). In a
# container the proxy is PID 1: add --supervise --pid-file /tmp/proxy.pid
# to make SIGUSR2 upgrades work there (docs/operating.md).

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=v0.1.0-dev
ARG REVISION=unknown
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X github.com/tether-proxy/tether/internal/version.Version=${VERSION} -X github.com/tether-proxy/tether/internal/version.Revision=${REVISION}" \
      -o /out/ ./cmd/proxy ./cmd/gateway-stub ./cmd/tether-agent ./cmd/tether-client

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/proxy /usr/local/bin/tether-proxy
COPY --from=build /out/gateway-stub /usr/local/bin/tether-gateway-stub
COPY --from=build /out/tether-agent /usr/local/bin/tether-agent
COPY --from=build /out/tether-client /usr/local/bin/tether-client
USER 65532:65532
EXPOSE 7000/tcp 7100/tcp 7946/tcp 7946/udp
ENTRYPOINT ["/usr/local/bin/tether-proxy"]
CMD ["--help"]
