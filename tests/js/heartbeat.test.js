// Heartbeat: the "phoenix" topic's heartbeat gets an ok reply with an empty response.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";

import { Clients, startServer, waitFor } from "./helpers.js";

let server;
before(async () => {
  server = await startServer({ workers: 2 });
});
after(async () => {
  await server?.stop();
});

/** socket.ping(cb) as a promise of the round-trip time. */
function ping(socket) {
  return waitFor((resolve) => {
    assert.equal(socket.ping(resolve), true, "socket.ping must be able to push");
  }, undefined, "the heartbeat reply (socket.ping callback)");
}

test("socket.ping resolves with the round-trip time", async (t) => {
  const clients = new Clients(server);
  t.after(() => clients.closeAll());
  const { socket, messages } = await clients.open();

  const rtt = await ping(socket);
  assert.equal(typeof rtt, "number");
  assert.ok(rtt >= 0);

  const reply = await messages.waitFor((m) => m.topic === "phoenix" && m.event === "phx_reply");
  assert.deepEqual(reply, {
    join_ref: null,
    ref: reply.ref,
    topic: "phoenix",
    event: "phx_reply",
    payload: { status: "ok", response: {} },
  });
  assert.equal(typeof reply.ref, "string");
});

test("repeated heartbeats each get their own reply", async (t) => {
  const clients = new Clients(server);
  t.after(() => clients.closeAll());
  const { socket, messages } = await clients.open();

  await Promise.all(Array.from({ length: 5 }, () => ping(socket)));
  const replies = messages.items.filter((m) => m.topic === "phoenix" && m.event === "phx_reply");
  assert.equal(new Set(replies.map((m) => m.ref)).size, 5);
  assert.equal(socket.isConnected(), true);
});
