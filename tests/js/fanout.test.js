// Many sockets on one topic across worker cores: every member gets every message, all members
// see one order, and each sender's messages keep its send order.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";

import { Clients, chatTopic, joinChannel, pushResult, startServer } from "./helpers.js";

const WORKERS = 2;
const SOCKETS = 40;
const SENDERS = 3;
const MESSAGES_PER_SENDER = 20;
const TOTAL = SENDERS * MESSAGES_PER_SENDER;
const FANOUT_TIMEOUT_MS = 15_000;

let server;
before(async () => {
  server = await startServer({ workers: WORKERS });
});
after(async () => {
  await server?.stop();
});

test(`${SOCKETS} sockets, ${SENDERS} senders x ${MESSAGES_PER_SENDER} messages, NEXUS_WORKERS=${WORKERS}`, async (t) => {
  const clients = new Clients(server);
  t.after(() => clients.closeAll());
  const topic = chatTopic();

  const members = await Promise.all(
    Array.from({ length: SOCKETS }, async () => {
      const client = await clients.open();
      const joined = await joinChannel(client.socket, topic);
      assert.equal(joined.status, "ok", `join: ${JSON.stringify(joined.response)}`);
      return { ...client, ...joined };
    }),
  );
  const senders = members.slice(0, SENDERS);

  // Each sender pipelines its messages (no waiting between pushes); the senders run at once.
  const replies = await Promise.all(
    senders.flatMap((sender, s) =>
      Array.from({ length: MESSAGES_PER_SENDER }, (_, n) =>
        pushResult(sender.channel.push("new_msg", { body: `s${s}-m${n}` })),
      ),
    ),
  );
  replies.forEach((reply, i) => assert.deepEqual(reply, { status: "ok", response: {} }, `push #${i}`));

  const received = await Promise.all(
    members.map((m) => m.events.new_msg.waitForCount(TOTAL, FANOUT_TIMEOUT_MS)),
  );

  const reference = received[0].map((p) => p.id);
  assert.equal(new Set(reference).size, TOTAL, "message ids are unique");
  received.forEach((payloads, i) => {
    assert.equal(payloads.length, TOTAL, `socket ${i} got exactly ${TOTAL} messages`);
    assert.deepEqual(
      payloads.map((p) => p.id),
      reference,
      `socket ${i} sees the same order as socket 0`,
    );
  });

  const order = received[0];
  for (let i = 1; i < order.length; i++) {
    assert.ok(
      order[i - 1].inserted_at < order[i].inserted_at,
      `inserted_at strictly increases in delivery order: ${order[i - 1].inserted_at} then ${order[i].inserted_at}`,
    );
  }
  senders.forEach((sender, s) => {
    const mine = order.filter((p) => p.sender_id === sender.sub).map((p) => p.content.text);
    assert.deepEqual(
      mine,
      Array.from({ length: MESSAGES_PER_SENDER }, (_, n) => `s${s}-m${n}`),
      `sender ${s}'s messages in its send order`,
    );
  });
});
