#!/usr/bin/env bash
# make demo: a local tether cluster on loopback addresses (3 gateway stubs,
# 2 proxies that find them by gossip, no Redis) and a client that keeps its
# gateway while its IP changes. Ctrl-C stops everything. Set DEMO_HOLD=0 to exit right after
# the walk-through (as CI would).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=./bin
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/tether-demo.XXXXXX")
P1=${DEMO_PROXY1:-127.0.0.1:7001}
P2=${DEMO_PROXY2:-127.0.0.1:7002}
ADMIN=${DEMO_ADMIN:-127.0.0.1:7101}
ADMIN2=${DEMO_ADMIN2:-127.0.0.1:7102}
GW_PORT=${DEMO_GATEWAY_PORT:-9000}
GOSSIP_PORT=${DEMO_GOSSIP_PORT:-7946}
pids=()

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() {
	trap - EXIT INT TERM
	if ((${#pids[@]})); then
		say "stopping ${#pids[@]} processes"
		kill "${pids[@]}" 2>/dev/null || true
		wait "${pids[@]}" 2>/dev/null || true
	fi
	echo "logs kept in $LOGS"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_listening FILE: wait until a process logged that it listens.
wait_listening() {
	for _ in $(seq 1 100); do
		grep -q '"listening"\|listening' "$1" 2>/dev/null && return 0
		sleep 0.05
	done
	echo "demo: $1 never reported listening:" >&2
	cat "$1" >&2
	exit 1
}

port_free() { ! (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }
for a in "$P1" "$P2" "$ADMIN" "$ADMIN2" 127.0.1.{1,2,3}:$GW_PORT 127.0.1.{1,2,3}:$GOSSIP_PORT 127.0.0.1:$GOSSIP_PORT 127.0.0.1:$((GOSSIP_PORT + 1)); do
	port_free "$a" || { echo "demo: $a is already in use (set DEMO_PROXY1/DEMO_PROXY2/DEMO_ADMIN/DEMO_ADMIN2/DEMO_GATEWAY_PORT/DEMO_GOSSIP_PORT)" >&2; exit 1; }
done

# http_get HOST:PORT PATH: a tiny HTTP/1.0 client (no curl on a fresh machine).
http_get() {
	exec 3<>"/dev/tcp/${1%:*}/${1##*:}" || return 1
	printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$2" "$1" >&3
	cat <&3
	exec 3<&-
}

# wait_gateways ADMIN N: wait until that proxy's ring holds N active gateways.
wait_gateways() {
	for _ in $(seq 1 200); do
		n=$(http_get "$1" /metrics 2>/dev/null | sed -n 's/^tether_gateways{state="active"} //p')
		[[ "$n" == "$2" ]] && return 0
		sleep 0.05
	done
	echo "demo: the proxy at $1 never saw $2 gateways" >&2
	exit 1
}

say "starting 3 gateway stubs on 127.0.1.1-3:$GW_PORT (PROXY header required), gossiping on port $GOSSIP_PORT"
for i in 1 2 3; do
	join=()
	[[ $i -gt 1 ]] && join=(--join "127.0.1.1:$GOSSIP_PORT")
	$BIN/gateway-stub --id "gw-$i" --listen "127.0.1.$i:$GW_PORT" --proxy-protocol require \
		--gossip-bind "127.0.1.$i:$GOSSIP_PORT" "${join[@]}" --drain-timeout 2s \
		--log-format console 2>"$LOGS/gw-$i.log" &
	pids+=($!)
	wait_listening "$LOGS/gw-$i.log"
	echo "  gw-$i  127.0.1.$i:$GW_PORT  (log: $LOGS/gw-$i.log)"
done

say "starting 2 proxies; they learn the gateways by gossip (no gateway list given)"
$BIN/proxy --listen "$P1" --admin "$ADMIN" --gossip-bind "127.0.0.1:$GOSSIP_PORT" --join "127.0.1.1:$GOSSIP_PORT" \
	--log-format console 2>"$LOGS/proxy-1.log" &
pids+=($!)
$BIN/proxy --listen "$P2" --admin "$ADMIN2" --gossip-bind "127.0.0.1:$((GOSSIP_PORT + 1))" --join "127.0.1.2:$GOSSIP_PORT" \
	--log-format console 2>"$LOGS/proxy-2.log" &
pids+=($!)
wait_listening "$LOGS/proxy-1.log"
wait_listening "$LOGS/proxy-2.log"
wait_gateways "$ADMIN" 3
wait_gateways "$ADMIN2" 3
echo "  proxy-1  $P1  (admin http://$ADMIN/metrics, /route?key=...)"
echo "  proxy-2  $P2  (admin http://$ADMIN2)"
echo "  both proxies see 3 gateways"

say "a phone on WiFi (127.0.0.2) connects via proxy-1, loses the link (RST), comes back on 4G (127.0.0.3) via proxy-2; three switches per key"
status=0
for key in alice carol dave; do
	echo
	echo "key \"$key\":"
	$BIN/tether-client --key "$key" --via "$P1,$P2" --from 127.0.0.2,127.0.0.3 --hops 4 || status=1
done

cat <<TXT

What you just saw: every hop of a key reached the same gateway even though the
client's IP and the proxy changed, because each proxy hashes the key onto the
same weighted rendezvous ring, built from the gateways gossip told it about.
The gateway counted the key's connections (conns=1..4) and saw the client's
real address through the PROXY v2 header. The client only ever talked to the
proxies ($P1, $P2): gateway addresses (127.0.1.x) never reach it.

Try it yourself while the cluster runs:
  $BIN/tether-client --key you --via $P1,$P2 --from 127.0.0.2,127.0.0.3 --hops 6
  curl -s 'http://$ADMIN/route?key=you'
  curl -s http://$ADMIN/metrics | grep ^tether_
  kill -9 one gateway (pids: ${pids[*]:0:3}): its keys fail over at once, and
  within ~6s gossip drops it from both rings (watch the proxy logs);
  kill -TERM one instead: it drains (no new keys) for 2s, then leaves
TXT

if [[ "${DEMO_HOLD:-1}" != 0 && -t 0 ]]; then
	say "cluster is running — press Ctrl-C to stop"
	wait
fi
exit $status
