// Cluster mode with the official client: several nodes on one PostgreSQL database and one
// Redis act as one server. Members on different nodes see one message order (the history's)
// and one Phoenix.Presence list; a client behind a load balancer (a round-robin TCP proxy)
// whose node is killed reconnects to a live node by itself, gets a full presence_state without
// the dead node's ghosts once NEXUS_NODE_TIMEOUT has passed, and misses nothing after rejoining.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";

import { Presence } from "phoenix";

import { Clients, Recorder, TEST_SECRET, chatTopic, push, pushResult, waitFor } from "./helpers.js";
import { RoundRobinProxy, history, startCluster, startPostgres } from "./cluster_harness.js";

/** Node timeout of the fault test, and how long the dead node's metas may linger after it. */
const NODE_TIMEOUT_S = 3;
const GHOSTS_GONE_WITHIN_MS = NODE_TIMEOUT_S * 1_000 + 5_000;
/** Every test ends within this, pass or fail. */
const BOUNDED = { timeout: 60_000 };

let pg;
before(async () => {
  pg = await startPostgres();
});
after(async () => {
  await pg?.stop();
});

/**
 * Joins `topic` on `client`'s socket with a Presence helper. `msgs` records the `new_msg`
 * payloads, `states` each `presence_state` as it arrived (with the join it answers), `syncs`
 * a snapshot (user -> sorted phx_refs) at every presence sync.
 */
async function joinMember(client, topic) {
  const channel = client.socket.channel(topic);
  // Bound before the Presence helper, which rewrites the metas of a state it merges into the
  // payload object in place: keep a copy of what the server sent.
  const states = new Recorder(`presence_state at ${client.sub}`);
  channel.on("presence_state", (payload) =>
    states.push({ joinRef: channel.joinRef(), payload: structuredClone(payload) }),
  );
  const presence = new Presence(channel);
  const syncs = new Recorder(`presence of ${client.sub}`);
  presence.onSync(() => syncs.push(snapshot(presence)));
  const msgs = new Recorder(`new_msg at ${client.sub}`);
  channel.on("new_msg", (payload) => msgs.push(payload));
  const reply = await pushResult(channel.join());
  assert.deepEqual(reply, { status: "ok", response: {} });
  return { ...client, channel, presence, states, syncs, msgs };
}

/** `{user_id: [phx_ref, ...sorted]}` of a Presence helper's current list. */
function snapshot(presence) {
  const out = {};
  presence.list((id, { metas }) => {
    out[id] = metas.map((m) => m.phx_ref).sort();
  });
  return out;
}

/** `Presence.list()` with metas in phx_ref order, users in id order: comparable across members. */
function fullList(presence) {
  return presence
    .list((id, { metas }) => ({ id, metas: [...metas].sort((a, b) => a.phx_ref.localeCompare(b.phx_ref)) }))
    .sort((a, b) => a.id.localeCompare(b.id));
}

/** Whether a snapshot holds exactly the users of `expected`, each with that many metas. */
const hasCounts = (snap, expected) =>
  Object.keys(snap).length === Object.keys(expected).length &&
  Object.entries(expected).every(([user, n]) => snap[user]?.length === n);

/** Waits until `member`'s latest presence snapshot satisfies `cond`; resolves with it. */
function presenceUntil(member, cond, timeoutMs, what) {
  return member.syncs.until((items) => items.length > 0 && cond(items.at(-1)) && items.at(-1), timeoutMs, what);
}

test("members on three nodes see one message order, the history's, and one presence list", BOUNDED, async (t) => {
  const cluster = await startCluster(pg, 3);
  const perNode = cluster.nodes.map((node) => new Clients(node));
  t.after(async () => {
    await Promise.all(perNode.map((clients) => clients.closeAll()));
    await cluster.stop();
  });
  const topic = chatTopic();

  // One member per node, and the first member's user again on node 1 (a second meta).
  const members = [];
  for (let i = 0; i < 3; i++) members.push(await joinMember(await perNode[i].open(), topic));
  const twin = await joinMember(await perNode[1].open({ sub: members[0].sub }), topic);
  const all = [...members, twin];
  const nodeOf = [0, 1, 2, 1];

  const expected = { [members[0].sub]: 2, [members[1].sub]: 1, [members[2].sub]: 1 };
  const views = await Promise.all(
    all.map((m) => presenceUntil(m, (snap) => hasCounts(snap, expected), 10_000, "3 users, the first with 2 metas")),
  );
  for (const [i, view] of views.entries()) assert.deepEqual(view, views[0], `member ${i}'s presence refs`);
  assert.equal(new Set(Object.values(views[0]).flat()).size, 4, "phx_refs are unique per meta");
  const lists = all.map((m) => fullList(m.presence));
  for (const [i, list] of lists.entries()) assert.deepEqual(list, lists[0], `member ${i}'s Presence.list()`);
  assert.equal(lists[0].length, 3);

  // Every member on every node sends at once, without waiting for its replies in between.
  const PER_SENDER = 5;
  const replies = await Promise.all(
    members.flatMap((m, i) =>
      Array.from({ length: PER_SENDER }, (_, k) => push(m.channel, "new_msg", { body: `n${i}-${k}` })),
    ),
  );
  for (const reply of replies) assert.deepEqual(reply, { status: "ok", response: {} });

  const total = members.length * PER_SENDER;
  const seen = await Promise.all(all.map((m) => m.msgs.waitForCount(total, 10_000)));
  for (const [i, list] of seen.entries()) {
    assert.equal(list.length, total, `member ${i}: no extra message`);
    assert.deepEqual(list, seen[0], `member ${i} (node ${nodeOf[i]}) sees the same messages in the same order`);
  }
  assert.equal(new Set(seen[0].map((p) => p.id)).size, total, "ids are unique");
  // Each sender's own order is kept, and each message names its sender.
  for (const [i, m] of members.entries()) {
    const mine = seen[0].filter((p) => p.content.text.startsWith(`n${i}-`));
    assert.deepEqual(
      mine.map((p) => p.content.text),
      Array.from({ length: PER_SENDER }, (_, k) => `n${i}-${k}`),
      `sender ${i}'s order`,
    );
    for (const p of mine) assert.equal(p.sender_id, m.sub);
  }

  // The history API, asked on each node, holds exactly that list.
  for (const [i, node] of cluster.nodes.entries()) {
    assert.deepEqual(await history(node.httpUrl, topic), seen[0], `history from node ${i}`);
  }
  for (const [i, m] of all.entries()) {
    assert.equal(m.msgs.items.length, total, `member ${i}: nothing arrived twice`);
  }
});

test("a proxied client whose node is killed comes back on a live node and misses nothing", BOUNDED, async (t) => {
  const cluster = await startCluster(pg, 3, { env: { NEXUS_NODE_TIMEOUT: `${NODE_TIMEOUT_S}s` } });
  const proxy = await new RoundRobinProxy(cluster.nodes.map((n) => n.port)).listen();
  const viaProxy = new Clients({ url: proxy.url, secret: TEST_SECRET });
  const perNode = cluster.nodes.map((node) => new Clients(node));
  let stopSending = () => {};
  t.after(async () => {
    stopSending();
    await Promise.all([viaProxy, ...perNode].map((clients) => clients.closeAll()));
    await proxy.stop();
    await cluster.stop();
  });
  const topic = chatTopic();

  // The proxied client; short reconnect/rejoin delays so it comes back quickly on its own.
  const proxied = await joinMember(
    await viaProxy.open({ socketOpts: { reconnectAfterMs: () => 200, rejoinAfterMs: () => 200 } }),
    topic,
  );
  const { backend: doomed } = await proxy.routes.waitFor(() => true);
  // Two more members through the proxy land on the next two nodes: a bystander, and the
  // sender. The proxy's next pick is then the doomed node again, so the client's reconnect
  // must skip it, and lands on the bystander's node, not the sender's.
  const bystander = await joinMember(await viaProxy.open(), topic);
  const sender = await joinMember(await viaProxy.open(), topic);
  const placed = (await proxy.routes.waitForCount(3)).map((r) => r.backend);
  assert.deepEqual(placed, [doomed, (doomed + 1) % 3, (doomed + 2) % 3], "round robin");
  // A member that dies with the doomed node (its socket never reconnects within the test).
  const ghost = await joinMember(await perNode[doomed].open(), topic);

  const beforeView = await presenceUntil(
    proxied,
    (snap) => [proxied.sub, bystander.sub, ghost.sub, sender.sub].every((u) => snap[u]?.length === 1),
    10_000,
    "the four members",
  );
  const oldRef = beforeView[proxied.sub][0];
  const initialJoinRef = proxied.channel.joinRef();

  // Watch the proxied socket for its rejoin reply: its index in the frame log splits the
  // messages into before and after the rejoin.
  let rejoinAt = null;
  const rejoin = waitFor((resolve) => {
    const ref = proxied.socket.onMessage((m) => {
      if (
        rejoinAt === null &&
        m.event === "phx_reply" &&
        m.topic === topic &&
        m.ref === m.join_ref &&
        m.join_ref !== initialJoinRef &&
        m.payload.status === "ok"
      ) {
        rejoinAt = proxied.messages.items.length - 1;
        resolve(m);
      }
    });
    return () => proxied.socket.off([ref]);
  }, 20_000, "the proxied client's rejoin reply");

  // The sender sends one message after another (each waits for its ack) until told to stop,
  // noting for each whether it was sent after the proxied client's rejoin reply had arrived.
  const sent = [];
  let sending = true;
  stopSending = () => {
    sending = false;
  };
  const senderDone = (async () => {
    for (let k = 0; sending; k++) {
      const entry = { body: `b-${k}`, afterRejoin: rejoinAt !== null };
      const reply = await push(sender.channel, "new_msg", { body: entry.body });
      assert.deepEqual(reply, { status: "ok", response: {} }, `reply to ${entry.body}`);
      sent.push(entry);
      // Pacing only (keeps the run to a few hundred messages); nothing waits on it.
      await new Promise((resolveTick) => setTimeout(resolveTick, 20));
    }
  })();
  rejoin.catch(() => {}); // awaited below; avoid an unhandled rejection if the test fails earlier
  senderDone.catch(() => {});

  // Messages flow to the proxied client before the fault.
  await proxied.msgs.waitForCount(3, 10_000);
  const closed = waitFor((resolve) => {
    const ref = proxied.socket.onClose(resolve);
    return () => proxied.socket.off([ref]);
  }, 5_000, "the proxied socket to close");
  const killedAt = Date.now();
  await cluster.kill(doomed);
  await closed;
  const beforeKill = proxied.messages.items.length;

  // The client reconnects through the proxy by itself, to a live node, and rejoins.
  const reconnect = await proxy.routes.until((routes) => routes.length >= 4 && routes[3], 10_000, "the reconnect");
  assert.deepEqual(proxy.refused.items, [{ backend: doomed, port: proxy.ports[doomed] }], "the dead node refused");
  assert.equal(reconnect.backend, (doomed + 1) % 3, "the proxy skipped the dead node");
  const rejoinReply = await rejoin;
  assert.deepEqual(rejoinReply.payload, { status: "ok", response: {} });
  assert.ok(rejoinAt >= beforeKill, "the rejoin reply came over the new connection");

  // A full presence_state for the new join: the other live member and the client itself.
  const { payload: state } = await proxied.states.waitFor(
    (s) => s.joinRef === rejoinReply.join_ref,
    5_000,
    "presence_state after the rejoin",
  );
  const refsOf = (user) => (state[user]?.metas || []).map((m) => m.phx_ref);
  assert.deepEqual(refsOf(sender.sub), beforeView[sender.sub], `the sender in the state: ${JSON.stringify(state)}`);
  assert.ok(
    refsOf(proxied.sub).some((r) => r !== oldRef),
    `the client's new meta in its own state: ${JSON.stringify(state)}`,
  );

  // Once the node timeout has passed the dead node's metas (the ghost's and the client's old
  // one) are gone: every member converges on exactly the three live metas.
  const converged = (snap) =>
    JSON.stringify(Object.keys(snap).sort()) === JSON.stringify([proxied.sub, bystander.sub, sender.sub].sort()) &&
    snap[proxied.sub].length === 1 &&
    snap[proxied.sub][0] !== oldRef &&
    snap[bystander.sub].length === 1 &&
    snap[sender.sub].length === 1;
  const remaining = () => Math.max(1, killedAt + GHOSTS_GONE_WITHIN_MS - Date.now());
  const afterView = await presenceUntil(proxied, converged, remaining(), "no ghosts at the proxied client");
  for (const m of [sender, bystander]) {
    assert.deepEqual(await presenceUntil(m, converged, remaining(), `no ghosts at ${m.sub}`), afterView);
    assert.deepEqual(fullList(m.presence), fullList(proxied.presence));
  }

  // Enough messages after the rejoin, then stop and wait for the last one to arrive.
  const newMsgsAfterRejoin = () =>
    proxied.messages.items.slice(rejoinAt + 1).filter((m) => m.event === "new_msg" && m.topic === topic);
  await proxied.messages.until(() => newMsgsAfterRejoin().length >= 10, 10_000, "10 messages after the rejoin");
  stopSending();
  await senderDone;
  const last = sent.at(-1).body;
  await proxied.msgs.waitFor((p) => p.content.text === last, 5_000, `the last message (${last})`);

  // Check against the stored order: what arrived after the rejoin is a gapless, duplicate-free
  // run of the history up to its end, and it includes every message sent after the rejoin.
  const stored = await history(cluster.nodes[reconnect.backend].httpUrl, topic);
  assert.equal(stored.length, sent.length, "every acked message is stored once");
  const got = newMsgsAfterRejoin().map((m) => m.payload);
  assert.equal(new Set(got.map((p) => p.id)).size, got.length, "no message arrived twice after the rejoin");
  const start = stored.findIndex((p) => p.id === got[0].id);
  assert.ok(start >= 0, `${got[0].id} is stored`);
  assert.deepEqual(got, stored.slice(start), "after the rejoin: every stored message from the first one on, in order");
  const firstAfter = sent.findIndex((s) => s.afterRejoin);
  assert.ok(firstAfter >= 0, "some messages were sent after the rejoin");
  assert.ok(
    stored.findIndex((p) => p.content.text === sent[firstAfter].body) >= start,
    "every message sent after the rejoin reply arrived",
  );
  // Nothing received before the fault came again after the rejoin.
  const earlier = new Set(
    proxied.messages.items
      .slice(0, beforeKill)
      .filter((m) => m.event === "new_msg")
      .map((m) => m.payload.id),
  );
  assert.ok(got.every((p) => !earlier.has(p.id)), "no message from before the fault was repeated");
});
