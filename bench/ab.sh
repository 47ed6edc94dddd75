#!/usr/bin/env bash
# A/B two proxy builds against one echo gateway, alternating, three rounds:
# bulk throughput (8 streams), then new connections per second with the
# proxy's CPU milliseconds per 1,000 connections (from /proc). Did a change
# cost (or gain) anything?
#
#   git worktree add /tmp/old <rev> && (cd /tmp/old && go build -o /tmp/old-proxy ./cmd/proxy)
#   make build && bench/ab.sh /tmp/old-proxy bin/proxy
#
# AB_FLAGS adds proxy flags to both (default: --client-keepalive 0, as the
# full benchmark runs; AB_FLAGS="--client-keepalive 60s" measures the
# shipped default). AB_ROUNDS sets the rounds (3).
set -euo pipefail
old=${1:?usage: bench/ab.sh OLD_PROXY NEW_PROXY}
new=${2:?usage: bench/ab.sh OLD_PROXY NEW_PROXY}
cd "$(dirname "$0")/.."
go build -o bin/benchload ./bench
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
gw=$(port); pa=$(port); pb=$(port)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
bin/gateway-stub --id gw --listen "127.0.1.1:$gw" --proxy-protocol optional --log-level warn & pids+=($!)
flags=${AB_FLAGS:---client-keepalive 0}
rounds=${AB_ROUNDS:-3}
# shellcheck disable=SC2086 # AB_FLAGS is a list of flags
"$old" --listen "127.0.0.1:$pa" --gateway "gw=127.0.1.1:$gw" --proxy-protocol-out off --log-level warn $flags & pids+=($!)
# shellcheck disable=SC2086
"$new" --listen "127.0.0.1:$pb" --gateway "gw=127.0.1.1:$gw" --proxy-protocol-out off --log-level warn $flags & pids+=($!)
for hp in "127.0.1.1/$gw" "127.0.0.1/$pa" "127.0.0.1/$pb"; do
	for _ in $(seq 200); do (exec 3<>"/dev/tcp/$hp") 2>/dev/null && break || sleep 0.05; done
done
for round in $(seq "$rounds"); do
	for t in "old:$pa" "new:$pb"; do
		echo "round $round ${t%%:*} bulk: $(bin/benchload --load bulk --addr "127.0.0.1:${t##*:}" --for 4s --streams 8 | tr '\n' ' ')"
	done
done
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system, in 10 ms ticks
for round in $(seq "$rounds"); do
	for t in "old:$pa:${pids[1]}" "new:$pb:${pids[2]}"; do
		IFS=: read -r name port pid <<<"$t"
		c0=$(cpu "$pid")
		rate=$(bin/benchload --load connrate --addr "127.0.0.1:$port" --for 5s)
		c1=$(cpu "$pid")
		n=${rate%% *}
		echo "round $round $name connrate: $rate, $(( (c1 - c0) * 10 * 1000 / (n * 5) )) ms CPU per 1,000 connections"
	done
done
