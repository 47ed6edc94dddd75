// tether client for browsers and Node: the hello frame, the reference reply
// frame, full-jitter backoff, and TetherSocket, a WebSocket that keeps its
// session key's gateway and reconnects politely. No dependencies; the same
// file runs in a browser (<script type="module">) and in Node.
//
// The contract (docs/clients.md): a close before any byte means "come back
// later"; reconnect after a uniformly random wait in
// [0, min(cap, base * 2^attempt)), base 250 ms, cap 30 s; start over only
// after a connection that stayed up (10 s).

/** Default backoff base, cap and healthy time, in milliseconds. */
export const DEFAULT_BASE_MS = 250;
export const DEFAULT_CAP_MS = 30000;
export const DEFAULT_HEALTHY_MS = 10000;

/**
 * fullJitter returns the wait before attempt n (0 first): uniform in
 * [0, min(cap, base * 2^n)).
 */
export function fullJitter(attempt, { baseMs = DEFAULT_BASE_MS, capMs = DEFAULT_CAP_MS, random = Math.random } = {}) {
  const ceil = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 60));
  return random() * ceil;
}

/**
 * hello encodes the first bytes of a tether TCP session: a 4-byte
 * big-endian length, version 1, the key length, the key (UTF-8, 1..255
 * bytes), then the payload.
 */
export function hello(key, payload = new Uint8Array(0)) {
  const k = new TextEncoder().encode(key);
  if (k.length < 1 || k.length > 255) {
    throw new RangeError(`tether: key of ${k.length} bytes (want 1..255)`);
  }
  const out = new Uint8Array(4 + 2 + k.length + payload.length);
  new DataView(out.buffer).setUint32(0, 2 + k.length + payload.length);
  out[4] = 1;
  out[5] = k.length;
  out.set(k, 6);
  out.set(payload, 6 + k.length);
  return out;
}

/** MAX_REPLY bounds a reply frame. */
export const MAX_REPLY = 64 * 1024;

/**
 * parseReply reads a reference reply frame ([u32 length][JSON]) from the
 * start of buf. It returns { reply, used } once the frame is whole, null
 * while more bytes are needed, and throws on a frame that cannot be one.
 */
export function parseReply(buf) {
  if (buf.length < 4) return null;
  const n = new DataView(buf.buffer, buf.byteOffset, buf.byteLength).getUint32(0);
  if (n > MAX_REPLY) throw new Error(`tether: reply frame of ${n} bytes is not a reply`);
  if (buf.length < 4 + n) return null;
  const reply = JSON.parse(new TextDecoder().decode(buf.subarray(4, 4 + n)));
  return { reply, used: 4 + n };
}

/**
 * TetherSocket is a WebSocket to a tether proxy that carries the session
 * key in the URL's query (keyIn "query", the default) or in a cookie the
 * page sets before connecting (keyIn "cookie", browsers only), and
 * reconnects after every close with full-jitter backoff, rotating over the
 * URLs given. Events: "open" ({ url, attempt }), "message" (the
 * MessageEvent's data), "close" ({ code, reason, refused, retryInMs });
 * close() stops it.
 */
export class TetherSocket extends EventTarget {
  constructor(urls, { key, keyIn = "query", param = "sid", WebSocket: Impl = globalThis.WebSocket,
    baseMs = DEFAULT_BASE_MS, capMs = DEFAULT_CAP_MS, healthyMs = DEFAULT_HEALTHY_MS,
    random = Math.random, setTimer = globalThis.setTimeout.bind(globalThis),
    clearTimer = globalThis.clearTimeout.bind(globalThis), now = () => Date.now() } = {}) {
    super();
    if (!Impl) throw new Error("tether: no WebSocket here; pass { WebSocket } (Node < 22: the ws package)");
    if (!key) throw new Error("tether: a session key is required");
    this.urls = Array.isArray(urls) ? urls : [urls];
    Object.assign(this, { key, keyIn, param, Impl, baseMs, capMs, healthyMs, random, setTimer, clearTimer, now });
    this.attempt = 0;
    this.next = 0;
    this.stopped = false;
    this.ws = null;
    this.timer = null;
    this.connect();
  }

  /** url returns the next URL to dial, with the key in its query. */
  url() {
    const u = new URL(this.urls[this.next++ % this.urls.length], globalThis.location?.href);
    if (this.keyIn === "query") u.searchParams.set(this.param, this.key);
    else if (globalThis.document) globalThis.document.cookie = `${this.param}=${encodeURIComponent(this.key)}; path=/; SameSite=Strict`;
    return u.toString();
  }

  connect() {
    this.timer = null;
    if (this.stopped) return;
    const url = this.url();
    const ws = new this.Impl(url);
    this.ws = ws;
    let opened = -1;
    let heard = false;
    ws.onopen = () => {
      opened = this.now();
      this.dispatchEvent(Object.assign(new Event("open"), { url, attempt: this.attempt }));
    };
    ws.onmessage = (ev) => {
      heard = true;
      this.dispatchEvent(Object.assign(new Event("message"), { data: ev.data }));
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      // A close before any byte is "come back later": never a reset of
      // the backoff, never a tight loop.
      const refused = opened < 0 || !heard;
      if (!refused && this.now() - opened >= this.healthyMs) this.attempt = 0;
      const retryInMs = this.stopped ? 0 : fullJitter(this.attempt, this);
      this.attempt++;
      this.dispatchEvent(Object.assign(new Event("close"), { code: ev.code, reason: ev.reason, refused, retryInMs }));
      if (!this.stopped) this.timer = this.setTimer(() => this.connect(), retryInMs);
    };
  }

  /** send sends data on the current connection; false when there is none. */
  send(data) {
    if (!this.ws || this.ws.readyState !== 1) return false;
    this.ws.send(data);
    return true;
  }

  /** reconnect drops the current connection; it is dialled again after the backoff. */
  reconnect() {
    if (this.ws) this.ws.close();
  }

  /** close stops reconnecting and closes the current connection. */
  close(code = 1000, reason = "") {
    this.stopped = true;
    if (this.timer !== null) this.clearTimer(this.timer);
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(code, reason);
  }
}
