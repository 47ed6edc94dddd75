#!/usr/bin/env bash
# Installs what the tests need and a fresh Debian machine lacks: redis-server,
# haproxy, nginx (stream module), chromium (the browser test), node (the
# JavaScript client's tests), python3 (the example gateway in another
# language), promtool (checks deploy/prometheus; Debian's prometheus
# package) and iproute2 (the network-namespace test), from Debian's packages. Tests start their
# own instances on loopback ports; the system services stay stopped. Safe to
# run again: it installs only what is missing.
set -euo pipefail

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v haproxy >/dev/null || need+=(haproxy)
if ! command -v nginx >/dev/null && ! [ -x /usr/sbin/nginx ]; then need+=(nginx-light); fi
if ! ls /usr/lib/nginx/modules/ngx_stream_module.so >/dev/null 2>&1; then need+=(libnginx-mod-stream); fi
command -v chromium >/dev/null || need+=(chromium)
command -v python3 >/dev/null || need+=(python3-minimal)
command -v node >/dev/null || need+=(nodejs)
command -v promtool >/dev/null || need+=(prometheus)
command -v ip >/dev/null || need+=(iproute2)
((${#need[@]})) || exit 0

if ! command -v apt-get >/dev/null; then
	echo "deps: missing ${need[*]} and no apt-get here; install them by hand" >&2
	exit 1
fi
sudo=()
if [ "$(id -u)" != 0 ]; then
	command -v sudo >/dev/null || { echo "deps: need root (or sudo) to install ${need[*]}" >&2; exit 1; }
	sudo=(sudo)
fi
echo "deps: installing ${need[*]} (apt-get)"
# Keep package scripts from starting system services: tests run their own.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
	printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
	"${sudo[@]}" chmod +x "$policy"
	created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then "${sudo[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "deps: installed: redis-server $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p'), $(haproxy -v | head -1)"
