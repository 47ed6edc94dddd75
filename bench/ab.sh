#!/usr/bin/env bash
# A/B the bulk path of two proxy builds against one echo gateway,
# alternating, three rounds: did a change cost throughput?
#
#   git worktree add /tmp/old <rev> && (cd /tmp/old && go build -o /tmp/old-proxy ./cmd/proxy)
#   make build && bench/ab.sh /tmp/old-proxy bin/proxy
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
"$old" --listen "127.0.0.1:$pa" --gateway "gw=127.0.1.1:$gw" --proxy-protocol-out off --log-level warn --client-keepalive 0 & pids+=($!)
"$new" --listen "127.0.0.1:$pb" --gateway "gw=127.0.1.1:$gw" --proxy-protocol-out off --log-level warn --client-keepalive 0 & pids+=($!)
for hp in "127.0.1.1/$gw" "127.0.0.1/$pa" "127.0.0.1/$pb"; do
	for _ in $(seq 200); do (exec 3<>"/dev/tcp/$hp") 2>/dev/null && break || sleep 0.05; done
done
for round in 1 2 3; do
	for t in "old:$pa" "new:$pb"; do
		echo "round $round ${t%%:*}: $(bin/benchload --load bulk --addr "127.0.0.1:${t##*:}" --for 4s --streams 8 | tr '\n' ' ')"
	done
done
