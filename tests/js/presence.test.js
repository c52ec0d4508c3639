// Presence through the official JS Presence helper: every member converges on the same list.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";

import { Presence } from "phoenix";

import { Clients, Recorder, chatTopic, pushResult, startServer } from "./helpers.js";

const RFC3339_RE = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$/;

let server;
before(async () => {
  server = await startServer({ workers: 2 });
});
after(async () => {
  await server?.stop();
});

/** Joins `topic` with a Presence helper; `syncs` records a snapshot of the list on each sync. */
async function joinWithPresence(client, topic) {
  const channel = client.socket.channel(topic);
  const presence = new Presence(channel);
  const syncs = new Recorder(`presence of ${client.sub}`);
  presence.onSync(() => syncs.push(snapshot(presence)));
  const reply = await pushResult(channel.join());
  assert.deepEqual(reply, { status: "ok", response: {} });
  return { ...client, channel, presence, syncs };
}

/** `{user_id: [phx_ref, ...sorted]}` of a Presence helper's current list. */
function snapshot(presence) {
  const out = {};
  presence.list((id, { metas }) => {
    out[id] = metas.map((m) => m.phx_ref).sort();
  });
  return out;
}

const sameUsers = (snap, subs) =>
  JSON.stringify(Object.keys(snap).sort()) === JSON.stringify([...subs].sort());

test("presence_state is pushed to the joiner with its join_ref and includes itself", async (t) => {
  const clients = new Clients(server);
  t.after(() => clients.closeAll());
  const alice = await joinWithPresence(await clients.open(), chatTopic());

  const state = await alice.messages.waitFor((m) => m.event === "presence_state");
  assert.equal(state.join_ref, alice.channel.joinRef());
  assert.equal(state.ref, null);
  assert.deepEqual(Object.keys(state.payload), [alice.sub]);
  const metas = state.payload[alice.sub].metas;
  assert.equal(metas.length, 1);
  assert.equal(typeof metas[0].phx_ref, "string");
  assert.ok(metas[0].phx_ref.length > 0);
  assert.match(metas[0].online_at, RFC3339_RE);

  const diff = await alice.messages.waitFor((m) => m.event === "presence_diff");
  assert.equal(diff.join_ref, null);
  assert.deepEqual(diff.payload.leaves, {});
  assert.deepEqual(Object.keys(diff.payload.joins), [alice.sub]);
  assert.deepEqual(diff.payload.joins[alice.sub].metas, metas);
});

test("members converge on the same presence list through joins and leaves", async (t) => {
  const clients = new Clients(server);
  t.after(() => clients.closeAll());
  const topic = chatTopic();

  const alice = await joinWithPresence(await clients.open(), topic);
  const bob = await joinWithPresence(await clients.open(), topic);
  // Bob's second connection: same user, second meta.
  const bob2 = await joinWithPresence(await clients.open({ sub: bob.sub }), topic);
  const all = [alice, bob, bob2];

  const settled = (snap) =>
    sameUsers(snap, [alice.sub, bob.sub]) && snap[alice.sub].length === 1 && snap[bob.sub].length === 2;
  const views = await Promise.all(
    all.map((m) => m.syncs.until((items) => items.length && settled(items.at(-1)) && items.at(-1), undefined, "alice + 2x bob")),
  );
  assert.deepEqual(views[1], views[0]);
  assert.deepEqual(views[2], views[0]);
  assert.equal(new Set([...views[0][alice.sub], ...views[0][bob.sub]]).size, 3, "phx_refs are unique per meta");

  // One of bob's connections leaves: bob stays with one meta.
  assert.deepEqual(await pushResult(bob2.channel.leave()), { status: "ok", response: {} });
  const afterLeave = await Promise.all(
    [alice, bob].map((m) =>
      m.syncs.until(
        (items) => items.length && items.at(-1)[bob.sub]?.length === 1 && items.at(-1),
        undefined,
        "bob with one meta",
      ),
    ),
  );
  assert.deepEqual(afterLeave[1], afterLeave[0]);
  assert.deepEqual(Object.keys(afterLeave[0]).sort(), [alice.sub, bob.sub].sort());

  // Bob's other socket closes: only alice remains, for alice.
  await new Promise((resolve) => bob.socket.disconnect(resolve));
  await alice.syncs.until(
    (items) => items.length && sameUsers(items.at(-1), [alice.sub]) && items.at(-1),
    undefined,
    "only alice",
  );
});
