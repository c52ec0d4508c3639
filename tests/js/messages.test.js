// Events on a joined `chat:<uuid>` channel: new_msg (good and bad bodies), ping, unknown events.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";

import {
  Clients,
  INSERTED_AT_RE,
  UUID_V7_RE,
  chatTopic,
  joinChannel,
  push,
  pushResult,
  startServer,
} from "./helpers.js";

let server;
before(async () => {
  server = await startServer({ workers: 2 });
});
after(async () => {
  await server?.stop();
});

/** Opens `n` sockets (different users) and joins them all to one fresh topic. */
async function membersOnTopic(clients, n) {
  const topic = chatTopic();
  const members = [];
  for (let i = 0; i < n; i++) {
    const client = await clients.open();
    const joined = await joinChannel(client.socket, topic);
    assert.equal(joined.status, "ok", `member ${i} join: ${JSON.stringify(joined.response)}`);
    members.push({ ...client, ...joined });
  }
  return { topic, members };
}

test("new_msg is broadcast to every member, sender included, with the documented payload", async (t) => {
  const clients = new Clients(server);
  t.after(() => clients.closeAll());
  const {
    members: [alice, bob],
  } = await membersOnTopic(clients, 2);

  const reply = await push(alice.channel, "new_msg", { body: "hello" });
  assert.deepEqual(reply, { status: "ok", response: {} });

  const atAlice = await alice.events.new_msg.waitFor((p) => p.content?.text === "hello");
  const atBob = await bob.events.new_msg.waitFor((p) => p.content?.text === "hello");

  for (const [who, payload] of [
    ["sender", atAlice],
    ["other member", atBob],
  ]) {
    assert.deepEqual(Object.keys(payload).sort(), ["content", "id", "inserted_at", "sender_id"], who);
    assert.deepEqual(
      payload,
      { id: payload.id, content: { text: "hello" }, sender_id: alice.sub, inserted_at: payload.inserted_at },
      who,
    );
    assert.equal(typeof payload.id, "string", who);
    assert.match(payload.id, UUID_V7_RE, `${who}: id must be a UUID v7`);
    assert.equal(typeof payload.inserted_at, "string", who);
    assert.match(payload.inserted_at, INSERTED_AT_RE, `${who}: inserted_at format`);
  }
  assert.deepEqual(atBob, atAlice, "every member gets the same payload");
  assert.equal(alice.events.new_msg.items.length, 1);
  assert.equal(bob.events.new_msg.items.length, 1);
});

test("the sender receives its own new_msg broadcast before the ok reply", async (t) => {
  // docs/protocol.md, "new_msg": persisted first, then broadcast to the topic, then replied ok to the sender.
  const clients = new Clients(server);
  t.after(() => clients.closeAll());
  const {
    topic,
    members: [alice],
  } = await membersOnTopic(clients, 1);

  const pushed = alice.channel.push("new_msg", { body: "order" });
  assert.deepEqual(await pushResult(pushed), { status: "ok", response: {} });
  const frames = await alice.messages.until(
    (items) => items.some((m) => m.event === "phx_reply" && m.ref === pushed.ref) && items,
    undefined,
    "the reply frame",
  );
  const replyIdx = frames.findIndex((m) => m.event === "phx_reply" && m.ref === pushed.ref);
  const bcastIdx = frames.findIndex((m) => m.topic === topic && m.event === "new_msg");
  assert.notEqual(bcastIdx, -1, "the broadcast must have arrived by the time the ok reply did");
  assert.ok(bcastIdx < replyIdx, `broadcast at ${bcastIdx} must precede the reply at ${replyIdx}`);
  const bcast = frames[bcastIdx];
  assert.equal(bcast.join_ref, null, "broadcasts carry a null join_ref");
  assert.equal(bcast.ref, null, "broadcasts carry a null ref");
});

for (const bad of [{}, { body: "" }, { body: 42 }, { body: null }, { body: ["hello"] }]) {
  test(`new_msg ${JSON.stringify(bad)} → error "Failed to save" and nothing is broadcast`, async (t) => {
    const clients = new Clients(server);
    t.after(() => clients.closeAll());
    const {
      members: [alice, bob],
    } = await membersOnTopic(clients, 2);

    const reply = await push(alice.channel, "new_msg", bad);
    assert.equal(reply.status, "error", `reply: ${JSON.stringify(reply)}`);
    assert.deepEqual(Object.keys(reply.response).sort(), ["detail", "reason"]);
    assert.equal(reply.response.reason, "Failed to save");
    assert.equal(typeof reply.response.detail, "string");
    assert.ok(reply.response.detail.length > 0, "detail must say why");

    // Prove the negative: a good message sent afterwards is the first new_msg anyone sees.
    const good = await push(alice.channel, "new_msg", { body: "after bad" });
    assert.deepEqual(good, { status: "ok", response: {} });
    const first = await bob.events.new_msg.waitForCount(1);
    assert.equal(first[0].content.text, "after bad", "first new_msg at the other member");
    const own = await alice.events.new_msg.waitForCount(1);
    assert.equal(own[0].content.text, "after bad", "first new_msg at the sender");
  });
}

test("ping replies ok with the same payload", async (t) => {
  const clients = new Clients(server);
  t.after(() => clients.closeAll());
  const {
    members: [alice],
  } = await membersOnTopic(clients, 1);

  assert.deepEqual(await push(alice.channel, "ping", { a: 1, b: "x" }), {
    status: "ok",
    response: { a: 1, b: "x" },
  });
  const nested = { list: [1, "two", null, { three: 3.5 }], empty: {}, t: true };
  assert.deepEqual(await push(alice.channel, "ping", nested), { status: "ok", response: nested });
  assert.deepEqual(await push(alice.channel, "ping", {}), { status: "ok", response: {} });
});

test("an unknown event replies error {reason:\"unknown event\"} and the channel keeps working", async (t) => {
  const clients = new Clients(server);
  t.after(() => clients.closeAll());
  const {
    members: [alice],
  } = await membersOnTopic(clients, 1);

  assert.deepEqual(await push(alice.channel, "shout", { body: "hi" }), {
    status: "error",
    response: { reason: "unknown event" },
  });
  assert.equal(alice.channel.state, "joined");
  assert.deepEqual(await push(alice.channel, "ping", { still: "here" }), {
    status: "ok",
    response: { still: "here" },
  });
});
