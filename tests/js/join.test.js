// Joining topics: `chat:<uuid>` joins with an empty ok reply; anything else is "unmatched topic".
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";

import { Clients, chatTopic, joinChannel, push, startServer } from "./helpers.js";

let server;
before(async () => {
  server = await startServer({ workers: 2 });
});
after(async () => {
  await server?.stop();
});

test("connect with params.token and join chat:<uuid> replies ok {}", async (t) => {
  const clients = new Clients(server);
  t.after(() => clients.closeAll());

  const { socket } = await clients.open();
  assert.equal(socket.isConnected(), true);

  const { channel, status, response } = await joinChannel(socket, chatTopic());
  assert.equal(status, "ok");
  assert.deepEqual(response, {});
  assert.equal(channel.state, "joined");
});

test("join is case-insensitive on the uuid and the topic is echoed as sent", async (t) => {
  const clients = new Clients(server);
  t.after(() => clients.closeAll());

  const { socket } = await clients.open();
  const topic = `chat:${randomUUID().toUpperCase()}`;
  const { channel, status, response, events } = await joinChannel(socket, topic);
  assert.equal(status, "ok", `join ${topic}: ${JSON.stringify(response)}`);
  assert.deepEqual(response, {});

  // The broadcast must come back on the exact topic string we joined, or the client drops it.
  const sent = await push(channel, "new_msg", { body: "upper" });
  assert.deepEqual(sent, { status: "ok", response: {} });
  const msg = await events.new_msg.waitFor((p) => p.content?.text === "upper");
  assert.equal(msg.content.text, "upper");
});

for (const topic of ["room:lobby", "chat:not-a-uuid", "chat:", "chat"]) {
  test(`join ${JSON.stringify(topic)} replies error {reason:"unmatched topic"}`, async (t) => {
    const clients = new Clients(server);
    t.after(() => clients.closeAll());

    const { socket, messages } = await clients.open();
    const { channel, status, response } = await joinChannel(socket, topic);
    assert.equal(status, "error");
    assert.deepEqual(response, { reason: "unmatched topic" });
    assert.equal(channel.state, "errored");

    // Phoenix answers an unmatched join with a null join_ref.
    const reply = await messages.waitFor((m) => m.topic === topic && m.event === "phx_reply");
    assert.equal(reply.join_ref, null);
    assert.equal(reply.ref, channel.joinPush.ref);

    // The socket stays usable: a valid join on it still succeeds.
    channel.leave();
    const ok = await joinChannel(socket, chatTopic());
    assert.equal(ok.status, "ok");
    assert.deepEqual(ok.response, {});
  });
}
