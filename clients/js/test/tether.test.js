import { test } from "node:test";
import assert from "node:assert/strict";
import { fullJitter, hello, parseReply, TetherSocket } from "../tether.js";

// A seeded generator, so the statistics are the same every run.
function seeded(seed) {
  let s = seed >>> 0;
  return () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2 ** 32);
}

test("full jitter stays within its ceiling and spreads over it", () => {
  const random = seeded(7);
  for (const [attempt, ceil] of [[0, 250], [1, 500], [2, 1000], [3, 2000], [20, 30000]]) {
    let sum = 0, lo = Infinity, hi = 0;
    const n = 4000;
    for (let i = 0; i < n; i++) {
      const d = fullJitter(attempt, { random });
      assert.ok(d >= 0 && d < ceil, `attempt ${attempt}: ${d} outside [0, ${ceil})`);
      sum += d; lo = Math.min(lo, d); hi = Math.max(hi, d);
    }
    const mean = sum / n / ceil;
    assert.ok(mean > 0.45 && mean < 0.55, `attempt ${attempt}: mean ${mean} of the ceiling`);
    assert.ok(lo < ceil / 20 && hi > (ceil * 19) / 20, `attempt ${attempt}: draws span [${lo}, ${hi}]`);
  }
});

test("hello matches the Go encoder's golden bytes", () => {
  assert.deepEqual([...hello("user-42")], [0, 0, 0, 9, 1, 7, 0x75, 0x73, 0x65, 0x72, 0x2d, 0x34, 0x32]);
  assert.throws(() => hello(""), RangeError);
  assert.throws(() => hello("x".repeat(256)), RangeError);
});

test("reply frames parse whole, wait for more, reject nonsense", () => {
  const body = new TextEncoder().encode('{"gateway":"gw-2","key":"k","conns":1}');
  const frame = new Uint8Array(4 + body.length + 3);
  new DataView(frame.buffer).setUint32(0, body.length);
  frame.set(body, 4);
  assert.equal(parseReply(frame.subarray(0, 10)), null);
  const got = parseReply(frame);
  assert.equal(got.reply.gateway, "gw-2");
  assert.equal(got.used, 4 + body.length);
  assert.throws(() => parseReply(new Uint8Array([0xff, 0xff, 0xff, 0xff])));
});

// FakeWebSocket records what TetherSocket does; the test drives it.
class FakeWebSocket {
  static made = [];
  constructor(url) { this.url = url; this.readyState = 0; this.sent = []; FakeWebSocket.made.push(this); }
  send(d) { this.sent.push(d); }
  close(code) { this.readyState = 3; this.onclose?.({ code: code ?? 1006, reason: "" }); }
  open() { this.readyState = 1; this.onopen?.(); }
  message(data) { this.onmessage?.({ data }); }
}

test("TetherSocket puts the key in the query, rotates URLs and backs off with jitter", () => {
  FakeWebSocket.made = [];
  const timers = [];
  let clock = 0;
  const sock = new TetherSocket(["ws://a.test/ws", "ws://b.test/ws"], {
    key: "user 42", WebSocket: FakeWebSocket, random: () => 0.5, now: () => clock,
    setTimer: (f, ms) => { timers.push({ f, ms }); return timers.length; }, clearTimer: () => {},
  });
  const closes = [];
  sock.addEventListener("close", (e) => closes.push(e));
  const first = FakeWebSocket.made[0];
  assert.equal(new URL(first.url).searchParams.get("sid"), "user 42");
  assert.equal(new URL(first.url).host, "a.test");
  // Refused (closed before any byte) three times: 125, 250, 500 ms.
  first.close();
  timers.shift().f();
  FakeWebSocket.made[1].close();
  timers.shift().f();
  FakeWebSocket.made[2].close();
  assert.deepEqual(closes.map((c) => [c.refused, c.retryInMs]), [[true, 125], [true, 250], [true, 500]]);
  assert.equal(new URL(FakeWebSocket.made[1].url).host, "b.test");
  // A connection that served for longer than healthyMs starts the count over.
  timers.shift().f();
  const good = FakeWebSocket.made[3];
  good.open();
  good.message("hi");
  assert.equal(sock.send("ping"), true);
  clock += 20000;
  good.close();
  assert.deepEqual([closes[3].refused, closes[3].retryInMs], [false, 125]);
  sock.close();
  assert.equal(timers.length, 1); // the pending reconnect is cancelled by close()
});
