# tether — see README.md. The two commands a newcomer needs: make demo, make test.
GO       ?= go
BIN      := bin
BINARIES := $(BIN)/proxy $(BIN)/gateway-stub $(BIN)/tether-client $(BIN)/tether-agent
export CGO_ENABLED ?= 1
# --version and tether_build_info: the release tag (v0.1.0-dev before the
# first one) and the commit, "-dirty" with uncommitted changes.
VERSION  ?= $(shell git describe --tags --match 'v*' 2>/dev/null || echo v0.1.0-dev)
REVISION ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null)$(shell git diff --quiet HEAD 2>/dev/null || echo -dirty)
LDFLAGS  := -X github.com/tether-proxy/tether/internal/version.Version=$(VERSION) -X github.com/tether-proxy/tether/internal/version.Revision=$(REVISION)

.PHONY: all build deps demo test test-unit test-js test-deploy test-e2e chaos bench bench-smoke lint fuzz bench-ring clean

all: build

build: $(BINARIES)

$(BIN)/%: FORCE
	$(GO) build -ldflags "$(LDFLAGS)" -o $@ ./cmd/$*

FORCE:

## demo: start 3 gateway stubs and 2 proxies on loopback and show a client
## keeping its gateway across an IP change (Ctrl-C stops everything).
demo: build
	./scripts/demo.sh

## deps: install redis-server, haproxy and nginx (Debian packages) when missing.
deps:
	./scripts/deps.sh

## test: lint (gofmt, vet, staticcheck), unit tests with -race, then end-to-end tests with real processes
## (real redis-server, haproxy and nginx, installed by deps when missing).
test: deps lint test-unit test-js test-deploy test-e2e bench-smoke

test-unit:
	$(GO) test -race -count=1 ./...

## test-js: the JavaScript client's tests (Node's test runner; no packages needed).
test-js:
	cd clients/js && node --test test/

## test-deploy: the deploy kit against the binaries: alert rules through promtool (Debian's prometheus
## package), Kubernetes manifests decoded strictly and checked against the flags, systemd, sysctl, a static build.
test-deploy: build
	@command -v promtool >/dev/null || { echo "promtool missing: make deps installs it (Debian package prometheus)"; exit 1; }
	promtool check rules deploy/prometheus/tether-rules.yaml
	cd deploy && $(GO) test -count=1 ./...

test-e2e:
	$(GO) test -race -count=1 -tags e2e -timeout 10m ./test/e2e/

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags e2e ./test/e2e/
	cd deploy && $(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.6.1 ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.6.1 -tags e2e ./test/e2e/

## chaos: not part of test. Gossip churn (gateways killed, drained, restarted,
## added), a proxy killed mid-stream and Redis restarted while clients echo;
## then every key must route the same from every proxy. About 3 minutes;
## CHAOS_FOR=60s shortens the churn, CHAOS_SEED=N replays a run.
chaos: deps
	$(GO) test -race -count=1 -tags 'e2e chaos' -run '^TestChaos$$' -timeout 6m -v ./test/e2e/

## bench: tether vs HAProxy (forced splice) vs a direct connection, interleaved;
## several minutes; writes bench/results/<date>.md (see docs/BENCHMARKS.md).
bench: build
	$(GO) run ./bench $(BENCHFLAGS)

## bench-smoke: the benchmark harness in --quick mode, as a correctness check
## only (no figures are judged).
bench-smoke: build
	$(GO) run ./bench --quick > /dev/null

## fuzz: run the hello parser fuzzer for a while (FUZZTIME=30s).
fuzz:
	$(GO) test ./pkg/proto -run '^$$' -fuzz FuzzParseHello -fuzztime $${FUZZTIME:-30s}

bench-ring:
	$(GO) test ./pkg/ring -run '^$$' -bench . -benchmem

clean:
	rm -rf $(BIN)
