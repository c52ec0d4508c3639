// Graceful drain with the official client: a rolling restart. Server A gets SIGTERM, closes
// the socket with 1001 "going away"; phoenix.js reconnects on its own, and once a new server
// (B) listens on the same address, the socket and its channel come back and messages flow.
import { after, test } from "node:test";
import assert from "node:assert/strict";

import { Clients, chatTopic, joinChannel, push, startServer, waitFor } from "./helpers.js";

let servers = [];
after(async () => {
  await Promise.all(servers.map((s) => s.stop()));
});

test("SIGTERM closes with 1001 and the client comes back on the next server", async () => {
  const a = await startServer({ workers: 2, env: { NEXUS_DRAIN_SECS: "1" } });
  servers.push(a);
  const clients = new Clients(a);
  const { socket } = await clients.open({ socketOpts: { reconnectAfterMs: () => 100, rejoinAfterMs: () => 100 } });
  const topic = chatTopic();
  const { channel, status, events } = await joinChannel(socket, topic);
  assert.equal(status, "ok");

  const closed = waitFor((resolve) => {
    const ref = socket.onClose((e) => resolve(e));
    return () => socket.off([ref]);
  }, 10_000, "the drain's close");
  process.kill(a.pid, "SIGTERM");
  const event = await closed;
  assert.equal(event.code, 1001);
  assert.equal(event.reason, "going away");

  // A finishes its drain and exits; B takes the same port (a rolling restart).
  const port = a.port;
  await a.stop();
  const b = await startServer({ workers: 2, env: { PORT: String(port) } });
  servers.push(b);
  // The client retries every 100 ms and B's cores accept before B logs "listening on", so the
  // reconnect may already have opened by now: check the state, then listen for the event.
  await waitFor((resolve) => {
    const ref = socket.onOpen(resolve);
    if (socket.isConnected()) resolve();
    return () => socket.off([ref]);
  }, 10_000, "the reconnect to the new server");
  // phoenix.js rejoins on its own after the reconnect; its channel state says when.
  await waitFor((resolve) => {
    const timer = setInterval(() => channel.isJoined() && resolve(), 20);
    return () => clearInterval(timer);
  }, 10_000, "the channel rejoined");
  const reply = await push(channel, "new_msg", { body: "after the restart" });
  assert.equal(reply.status, "ok");
  const msg = await events.new_msg.waitFor((p) => p.content.text === "after the restart");
  assert.equal(msg.content.text, "after the restart");
  await clients.closeAll();
});
