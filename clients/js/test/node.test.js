import { test } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { dial, keepSession, NoReplyError } from "../node.js";

// gateway answers each hello with a reply frame naming id and the key it
// read, then echoes.
function gateway(id) {
  const srv = net.createServer((c) => {
    let buf = Buffer.alloc(0);
    c.on("data", (d) => {
      if (buf === null) return c.write(d);
      buf = Buffer.concat([buf, d]);
      if (buf.length < 6) return;
      const len = buf.readUInt32BE(0), keylen = buf[5];
      if (buf.length < 4 + len) return;
      const key = buf.subarray(6, 6 + keylen).toString();
      const body = Buffer.from(JSON.stringify({ gateway: id, key, conns: 1 }));
      const head = Buffer.alloc(4);
      head.writeUInt32BE(body.length);
      c.write(Buffer.concat([head, body]));
      const rest = buf.subarray(4 + len);
      buf = null;
      if (rest.length) c.write(rest);
    });
    c.on("error", () => {});
  });
  return listen(srv);
}

// refuser closes every connection with a reset, sending nothing.
function refuser() {
  return listen(net.createServer((c) => c.resetAndDestroy()));
}

function listen(srv) {
  return new Promise((resolve) => srv.listen(0, "127.0.0.1", () => resolve({ addr: `127.0.0.1:${srv.address().port}`, srv })));
}

test("dial sends the hello, reads the reply and leaves the echo to the caller", async () => {
  const gw = await gateway("gw-1");
  const { socket, reply } = await dial(gw.addr, { key: "alice" });
  assert.equal(reply.gateway, "gw-1");
  assert.equal(reply.key, "alice");
  socket.write("ping");
  const echo = new Promise((r) => socket.once("data", r));
  socket.resume();
  await echo;
  assert.equal((await echo).toString(), "ping");
  socket.destroy();
  gw.srv.close();
});

test("a close without a byte is NoReplyError", async () => {
  const r = await refuser();
  await assert.rejects(dial(r.addr, { key: "k" }), NoReplyError);
  r.srv.close();
});

test("keepSession rotates over proxies, backs off after refusals, stops on abort", async () => {
  const r = await refuser();
  const gw = await gateway("gw-2");
  const ac = new AbortController();
  const waits = [];
  const errors = [];
  let connects = 0;
  await keepSession({
    proxies: [r.addr, r.addr, gw.addr], key: "bob", signal: ac.signal, random: () => 0.5,
    sleep: async (ms) => { waits.push(ms); },
    onDisconnect: (err) => errors.push(err),
    onConnect: ({ socket, reply }) => {
      connects++;
      assert.equal(reply.gateway, "gw-2");
      ac.abort();
      socket.destroy();
    },
  });
  assert.equal(connects, 1);
  assert.deepEqual(waits, [125, 250]);
  assert.ok(errors.every((e) => e instanceof NoReplyError));
  r.srv.close();
  gw.srv.close();
});
