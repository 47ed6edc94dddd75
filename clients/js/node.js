// tether client for Node over TCP (or TLS): dial sends the hello through
// one of several proxies and reads the reference reply frame; keepSession
// keeps a session up with full-jitter backoff. No dependencies.
import net from "node:net";
import tls from "node:tls";
import { DEFAULT_HEALTHY_MS, fullJitter, hello, parseReply } from "./tether.js";

export { fullJitter, hello, parseReply } from "./tether.js";

/** NoReplyError: the connection closed before any byte ("come back later"). */
export class NoReplyError extends Error {
  constructor(proxy, cause) {
    super(`tether: ${proxy} closed without a reply (come back later)`, { cause });
    this.name = "NoReplyError";
  }
}

/**
 * dial opens one session for key through proxy (HOST:PORT): it connects
 * (TLS when tls options are given), sends the hello, and with readReply
 * reads the reply frame. It resolves to { socket, reply, proxy } with the
 * socket paused (bytes after the reply kept for you): attach listeners,
 * then socket.resume(). A close before any byte rejects with NoReplyError.
 */
export function dial(proxy, { key, payload, readReply = true, tls: tlsOptions, timeoutMs = 10000, localAddress } = {}) {
  const [host, port] = splitHostPort(proxy);
  return new Promise((resolve, reject) => {
    const opts = { host, port, localAddress };
    const socket = tlsOptions
      ? tls.connect({ ...opts, servername: host, ...tlsOptions })
      : net.connect(opts);
    let buf = new Uint8Array(0);
    let settled = false;
    const fail = (err) => {
      if (settled) return;
      settled = true;
      socket.destroy();
      reject(err);
    };
    const timer = setTimeout(() => fail(new Error(`tether: ${proxy}: no answer within ${timeoutMs} ms`)), timeoutMs);
    const done = (reply) => {
      settled = true;
      clearTimeout(timer);
      socket.off("data", onData);
      socket.off("error", onError);
      socket.off("close", onClose);
      resolve({ socket, reply, proxy });
    };
    const onData = (chunk) => {
      const next = new Uint8Array(buf.length + chunk.length);
      next.set(buf);
      next.set(chunk, buf.length);
      buf = next;
      try {
        const got = parseReply(buf);
        if (got) {
          socket.pause();
          if (got.used < buf.length) socket.unshift(Buffer.from(buf.subarray(got.used)));
          done(got.reply);
        }
      } catch (err) {
        fail(err);
      }
    };
    const onError = (err) => {
      clearTimeout(timer);
      fail(buf.length === 0 && (err.code === "ECONNRESET" || err.code === "EPIPE") ? new NoReplyError(proxy, err) : err);
    };
    const onClose = () => {
      clearTimeout(timer);
      fail(buf.length === 0 ? new NoReplyError(proxy) : new Error(`tether: ${proxy}: closed inside the reply`));
    };
    socket.on("error", onError);
    socket.on("close", onClose);
    socket.once(tlsOptions ? "secureConnect" : "connect", () => {
      socket.write(hello(key, payload));
      if (!readReply) {
        socket.pause();
        done(null);
      }
      else socket.on("data", onData);
    });
  });
}

/**
 * keepSession keeps key's session up until signal aborts: it dials the
 * proxies in turn, calls onConnect({ socket, reply, proxy }), waits for the
 * socket to close, calls onDisconnect(error, retryInMs), and waits the
 * full-jitter delay (base 250 ms, cap 30 s; the count starts over after a
 * connection that stayed up healthyMs) before the next attempt.
 */
export async function keepSession({ proxies, signal, onConnect = () => {}, onDisconnect = () => {},
  healthyMs = DEFAULT_HEALTHY_MS, sleep = abortableSleep, now = () => Date.now(), ...options }) {
  let attempt = 0;
  for (let i = 0; !signal?.aborted; i++) {
    let err;
    try {
      const conn = await dial(proxies[i % proxies.length], options);
      const began = now();
      onConnect(conn);
      err = await closed(conn.socket, signal);
      if (now() - began >= healthyMs) attempt = 0;
    } catch (e) {
      err = e;
    }
    if (signal?.aborted) return;
    const retryInMs = fullJitter(attempt++, options);
    onDisconnect(err, retryInMs);
    await sleep(retryInMs, signal);
  }
}

function closed(socket, signal) {
  return new Promise((resolve) => {
    const onAbort = () => socket.destroy();
    signal?.addEventListener("abort", onAbort, { once: true });
    socket.resume();
    socket.once("close", () => {
      signal?.removeEventListener("abort", onAbort);
      resolve(new Error("tether: connection closed"));
    });
    socket.on("error", () => {});
  });
}

function abortableSleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

function splitHostPort(addr) {
  const i = addr.lastIndexOf(":");
  if (i < 0) throw new Error(`tether: ${addr} is not HOST:PORT`);
  return [addr.slice(0, i).replace(/^\[|\]$/g, ""), Number(addr.slice(i + 1))];
}
