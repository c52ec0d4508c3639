// channel.leave(): ok reply, phx_close, channel closed, and no more broadcasts for the leaver.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";

import { Clients, chatTopic, joinChannel, push, pushResult, startServer } from "./helpers.js";

let server;
before(async () => {
  server = await startServer({ workers: 2 });
});
after(async () => {
  await server?.stop();
});

test("leave replies ok, closes the channel and stops broadcasts to the leaver", async (t) => {
  const clients = new Clients(server);
  t.after(() => clients.closeAll());
  const topic = chatTopic();

  const leaver = await clients.open();
  const stayer = await clients.open();
  const leaverJoin = await joinChannel(leaver.socket, topic);
  const stayerJoin = await joinChannel(stayer.socket, topic);
  assert.equal(leaverJoin.status, "ok");
  assert.equal(stayerJoin.status, "ok");

  // Both receive a message while joined.
  assert.deepEqual(await push(stayerJoin.channel, "new_msg", { body: "before leave" }), {
    status: "ok",
    response: {},
  });
  await leaverJoin.events.new_msg.waitFor((p) => p.content.text === "before leave");
  await stayerJoin.events.new_msg.waitFor((p) => p.content.text === "before leave");

  const joinRef = leaverJoin.channel.joinRef();
  const leavePush = leaverJoin.channel.leave();
  const leaveReply = await pushResult(leavePush);
  assert.deepEqual(leaveReply, { status: "ok", response: {} });
  assert.equal(leaverJoin.channel.state, "closed");
  assert.equal(leaver.socket.channels.includes(leaverJoin.channel), false);

  // docs/protocol.md, "Leave": the ok reply is followed by [join_ref, join_ref, topic, "phx_close", {}].
  const close = await leaver.messages.waitFor((m) => m.topic === topic && m.event === "phx_close");
  assert.deepEqual(close, { join_ref: joinRef, ref: joinRef, topic, event: "phx_close", payload: {} });
  const reply = leaver.messages.items.find((m) => m.event === "phx_reply" && m.ref === leavePush.ref);
  assert.deepEqual(reply, {
    join_ref: joinRef,
    ref: leavePush.ref,
    topic,
    event: "phx_reply",
    payload: { status: "ok", response: {} },
  });

  // The stayer still receives messages sent after the leave.
  const framesAtLeave = leaver.messages.items.length;
  assert.deepEqual(await push(stayerJoin.channel, "new_msg", { body: "after leave" }), {
    status: "ok",
    response: {},
  });
  await stayerJoin.events.new_msg.waitFor((p) => p.content.text === "after leave");

  // Barrier for the negative: the leaver joins again and waits for a later message. Messages of
  // one topic reach each member in one order, so had the server kept the leaver subscribed,
  // "after leave" would arrive before "after rejoin".
  const rejoin = await joinChannel(leaver.socket, topic);
  assert.equal(rejoin.status, "ok");
  assert.deepEqual(await push(stayerJoin.channel, "new_msg", { body: "after rejoin" }), {
    status: "ok",
    response: {},
  });
  await rejoin.events.new_msg.waitFor((p) => p.content.text === "after rejoin");

  const leaverMsgsAfterLeave = leaver.messages.items
    .slice(framesAtLeave)
    .filter((m) => m.topic === topic && m.event === "new_msg")
    .map((m) => m.payload.content.text);
  assert.deepEqual(leaverMsgsAfterLeave, ["after rejoin"], "the leaver must not get messages sent while it was out");
  assert.deepEqual(
    stayerJoin.events.new_msg.items.map((p) => p.content.text),
    ["before leave", "after leave", "after rejoin"],
  );
});

test("leave of a channel joined on another socket does not affect that socket", async (t) => {
  const clients = new Clients(server);
  t.after(() => clients.closeAll());
  const topic = chatTopic();
  const a = await clients.open();
  const b = await clients.open();
  const aJoin = await joinChannel(a.socket, topic);
  const bJoin = await joinChannel(b.socket, topic);
  assert.equal(aJoin.status, "ok");
  assert.equal(bJoin.status, "ok");

  assert.deepEqual(await pushResult(aJoin.channel.leave()), { status: "ok", response: {} });
  assert.deepEqual(await push(bJoin.channel, "ping", { x: 1 }), { status: "ok", response: { x: 1 } });
  assert.deepEqual(await push(bJoin.channel, "new_msg", { body: "still here" }), { status: "ok", response: {} });
  await bJoin.events.new_msg.waitFor((p) => p.content.text === "still here");
});
