#!/usr/bin/env python3
"""A complete tether gateway in Python, standard library only.

Behind tether proxies every connection starts with a PROXY protocol v2
header (the real client address, and the session key in TLV 0xE0), then the
client's hello frame: u32 big-endian length, version 1, key length, key,
payload. This gateway answers each hello with one reply frame
[u32 length][JSON {"gateway","key","conns","client"}], then echoes every byte
until EOF. Run it beside tether-agent, which announces it to the cluster:

    python3 gateway.py --id gw-py --listen 127.0.1.5:9000 --trusted 127.0.0.0/8
    tether-agent --id gw-py --service 127.0.1.5:9000 --gossip-bind 127.0.1.5:7946 --join SEED
"""
import argparse
import ipaddress
import json
import socket
import socketserver
import struct
import sys
import threading

SIG_V2 = b"\r\n\r\n\x00\r\nQUIT\n"
KEY_TLV = 0xE0
HANDSHAKE_TIMEOUT = 5.0
MAX_HELLO = 4096

conns_lock = threading.Lock()
conns = {}  # key -> connections seen


def read_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("closed during the handshake")
        buf += chunk
    return buf


def read_proxy_v2(sock, peer):
    """Returns (client address string, key TLV bytes or None)."""
    head = read_exact(sock, 16)
    if head[:12] != SIG_V2 or head[12] >> 4 != 2:
        raise ValueError("not a PROXY v2 header")
    command, family = head[12] & 0x0F, head[13]
    body = read_exact(sock, struct.unpack("!H", head[14:16])[0])
    client, rest = "%s:%d" % peer, body
    if command == 1 and family == 0x11:  # PROXY over TCP/IPv4
        src, port = socket.inet_ntop(socket.AF_INET, body[0:4]), struct.unpack("!H", body[8:10])[0]
        client, rest = "%s:%d" % (src, port), body[12:]
    elif command == 1 and family == 0x21:  # PROXY over TCP/IPv6
        src, port = socket.inet_ntop(socket.AF_INET6, body[0:16]), struct.unpack("!H", body[32:34])[0]
        client, rest = "[%s]:%d" % (src, port), body[36:]
    elif command == 0:  # LOCAL: the TCP peer is the client
        rest = b""
    key = None
    while len(rest) >= 3:  # TLVs: type, u16 length, value
        typ, length = rest[0], struct.unpack("!H", rest[1:3])[0]
        if typ == KEY_TLV:
            key = rest[3:3 + length]
        rest = rest[3 + length:]
    return client, key


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        sock, peer = self.request, self.client_address
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            if not any(ipaddress.ip_address(peer[0]) in net for net in self.server.trusted):
                return  # PROXY headers are believed only from tether proxies
            client, tlv_key = read_proxy_v2(sock, peer)
            length = struct.unpack("!I", read_exact(sock, 4))[0]
            if length < 2 or length > MAX_HELLO:
                return
            frame = read_exact(sock, length)
            version, keylen = frame[0], frame[1]
            key = frame[2:2 + keylen]
            if version != 1 or keylen == 0 or len(key) != keylen or (tlv_key is not None and tlv_key != key):
                return
        except (OSError, ValueError, EOFError):
            return
        sock.settimeout(None)
        key = key.decode("utf-8", "replace")
        with conns_lock:
            conns[key] = conns.get(key, 0) + 1
            n = conns[key]
        body = json.dumps({"gateway": self.server.gateway_id, "key": key, "conns": n, "client": client}).encode()
        try:
            sock.sendall(struct.pack("!I", len(body)) + body)
            while True:  # echo until EOF, then half-close
                data = sock.recv(65536)
                if not data:
                    sock.shutdown(socket.SHUT_WR)
                    return
                sock.sendall(data)
        except OSError:
            return


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--id", required=True, help="gateway ID, reported in every reply")
    ap.add_argument("--listen", default="127.0.0.1:9000", help="HOST:PORT to serve on (port 0 picks one)")
    ap.add_argument("--trusted", default="127.0.0.0/8", help="comma-separated CIDRs of the tether proxies")
    args = ap.parse_args()
    host, port = args.listen.rsplit(":", 1)
    srv = Server((host, int(port)), Handler)
    srv.gateway_id = args.id
    srv.trusted = [ipaddress.ip_network(c.strip()) for c in args.trusted.split(",") if c.strip()]
    addr = "%s:%d" % srv.server_address[:2]
    # One JSON line, as tether's own binaries log it, so scripts can wait on it.
    print(json.dumps({"level": "info", "msg": "listening", "addr": addr, "id": args.id}), file=sys.stderr, flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
