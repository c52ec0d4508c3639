// Recovery on rejoin with the official client (docs/protocol.md, "Recovery on rejoin"). A
// channel whose params are a function is asked for them on every (re)join, so
// `socket.channel(topic, () => ({last_seen_id: lastId}))` sends the id of the last message it
// got each time phoenix.js rejoins by itself after a dropped connection; the server answers
// `{"recovered":true,"missed":n}`, pushes what was missed after the presence_state and then the
// live messages: no gap, no duplicate, one order. Past NEXUS_RECOVERY_MAX missed messages the
// rejoin answers `{"recovered":false}`, nothing old is pushed, and the client rebuilds the gap
// from the history API, paging back from its first live message (README, "History API").
//
// The recovering client R connects through a TCP proxy the test can cut: destroying the
// proxied connections is what a dropped network looks like to phoenix.js, and a proxy that
// turns connections away keeps R away for as long as the test needs.
import { test } from "node:test";
import assert from "node:assert/strict";

import { Clients, Recorder, TEST_SECRET, chatTopic, joinChannel, push, startServer } from "./helpers.js";
import { RoundRobinProxy, history, startCluster, startPostgres } from "./cluster_harness.js";

/** Every test ends within this, pass or fail. */
const BOUNDED = { timeout: 60_000 };
/** R reconnects and rejoins on its own, quickly, once the proxy lets it through again. */
const FAST_RETRY = { reconnectAfterMs: () => 100, rejoinAfterMs: () => 100 };
/** Bound for the automatic reconnect + rejoin after the proxy is restored. */
const REJOIN_TIMEOUT_MS = 10_000;

/**
 * The round-robin proxy, cuttable: `cut()` destroys every proxied connection and turns new
 * ones away (closed at once, before any backend is picked, so the round robin does not move)
 * until `restore()`.
 */
class CuttableProxy extends RoundRobinProxy {
  constructor(ports) {
    super(ports);
    this.down = false;
    this.turnedAway = new Recorder("connections turned away");
  }

  forward(client) {
    if (this.down) {
      this.turnedAway.push(Date.now());
      client.on("error", () => {});
      client.destroy();
      return;
    }
    return super.forward(client);
  }

  cut() {
    this.down = true;
    for (const socket of this.sockets) socket.destroy();
  }

  restore() {
    this.down = false;
  }
}

/**
 * R: a socket through `proxy` (short reconnect/rejoin delays) joined to `topic` with params
 * evaluated on every (re)join: `{last_seen_id: <id of the last new_msg it got>}`, null before
 * the first. Records the `new_msg` payloads (`msgs`), the params each join sent (`params`),
 * every join reply with the number of messages it had got by then (`joins`), and each close
 * of its socket (`closes`). Resolves once the first join is answered.
 */
async function joinRecovering(clients, topic) {
  const client = await clients.open({ socketOpts: FAST_RETRY });
  const msgs = new Recorder("new_msg at R");
  const params = new Recorder("join params of R");
  const joins = new Recorder("join replies at R");
  const closes = new Recorder("closes of R's socket");
  let lastId = null;
  const channel = client.socket.channel(topic, () => {
    const p = { last_seen_id: lastId };
    params.push(p);
    return p;
  });
  channel.on("new_msg", (payload) => {
    lastId = payload.id;
    msgs.push(payload);
  });
  client.socket.onClose((event) => closes.push(event.code));
  // The join push is resent on each rejoin and keeps its hooks: these fire for every reply.
  // Frames are handled in arrival order, so `msgsBefore` is exactly what R had got before
  // the reply.
  const record = (status) => (response) =>
    joins.push({ status, response, joinRef: channel.joinRef(), msgsBefore: msgs.items.length });
  channel.join().receive("ok", record("ok")).receive("error", record("error")).receive("timeout", record("timeout"));
  const first = await joins.waitForCount(1);
  // No message yet: `null` means no recovery, and the reply is exactly as without it.
  assert.deepEqual(params.items, [{ last_seen_id: null }]);
  assert.deepEqual(first[0].response, {}, `first join: ${JSON.stringify(first[0])}`);
  assert.equal(first[0].status, "ok");
  return { ...client, channel, msgs, params, joins, closes };
}

/**
 * S: sends `<prefix>-<k>` on `channel` one after another (each after the previous ack) until
 * `stop()`. `acked` records `{body, tag}` per acknowledged (so stored) message, `tag` being
 * `tag()` when it was sent. Pacing only keeps the run short; nothing waits on it.
 */
function startSender(channel, prefix, tag, paceMs = 5) {
  const acked = new Recorder(`acks of ${prefix}`);
  let sending = true;
  const done = (async () => {
    for (let k = 0; sending; k++) {
      const entry = { body: `${prefix}-${k}`, tag: tag() };
      const reply = await push(channel, "new_msg", { body: entry.body });
      assert.deepEqual(reply, { status: "ok", response: {} }, `reply to ${entry.body}`);
      acked.push(entry);
      await new Promise((resolveTick) => setTimeout(resolveTick, paceMs));
    }
  })();
  done.catch(() => {}); // awaited by the test; no unhandled rejection if it fails earlier
  return {
    acked,
    done,
    stop() {
      sending = false;
    },
  };
}

/** Cuts R's connection at the proxy; resolves once phoenix.js has seen it close. */
async function cutAndWaitForClose(proxy, r) {
  const before = r.closes.items.length;
  proxy.cut();
  await r.closes.waitForCount(before + 1, 5_000);
}

/** Pings on R's channel: the reply comes after anything the server had queued for R before it. */
async function barrier(r) {
  assert.deepEqual(await push(r.channel, "ping", { barrier: true }), { status: "ok", response: { barrier: true } });
}

const ids = (list) => list.map((p) => p.id);

/**
 * Scenario 1 (single node or cluster): S keeps sending before, during and after R is away;
 * R comes back by itself, is told what it missed, and ends up with exactly the stored list.
 * `senderClients` opens S directly on a node; `historyUrl()` is where to read the stored list.
 * `teardown()` stops the servers; it runs after the scenario's own clients are closed (node:test
 * runs `t.after` hooks in the order they were registered, so there is a single hook).
 */
async function cutWhileOthersSend(t, { proxy, senderClients, historyUrl, teardown }) {
  const topic = chatTopic();
  const viaProxy = new Clients({ url: proxy.url, secret: TEST_SECRET });
  let sender = null;
  t.after(async () => {
    sender?.stop();
    await viaProxy.closeAll();
    await teardown();
  });
  const r = await joinRecovering(viaProxy, topic);
  const s = await senderClients.open();
  const joined = await joinChannel(s.socket, topic, { events: [] });
  assert.equal(joined.status, "ok");

  let restored = false;
  const tag = () => (r.closes.items.length === 0 ? "before" : restored ? "back" : "away");
  sender = startSender(joined.channel, "m", tag);

  // R is getting the messages, then its connection drops.
  await r.msgs.waitForCount(5, 10_000);
  await cutAndWaitForClose(proxy, r);
  const hadAtClose = r.msgs.items.length;
  const lastSeen = r.msgs.items.at(-1).id;

  // S goes on while R is away: wait for a few acks of messages sent after R's close, and for
  // phoenix.js to have tried to reconnect and been turned away (a network still down).
  const AWAY = 5;
  await sender.acked.until(
    (items) => items.filter((e) => e.tag === "away").length >= AWAY,
    10_000,
    `${AWAY} messages acked while R is away`,
  );
  await proxy.turnedAway.waitForCount(2, 5_000);
  const sentWhileAway = sender.acked.items.filter((e) => e.tag === "away").length;
  assert.equal(r.socket.isConnected(), false, "R is still away");
  assert.equal(r.msgs.items.length, hadAtClose, "nothing reached R while it was away");
  restored = true;
  proxy.restore();

  // phoenix.js reconnects and rejoins by itself, with the id of the last message it got.
  const [, rejoin] = await r.joins.waitForCount(2, REJOIN_TIMEOUT_MS);
  assert.equal(rejoin.status, "ok", `rejoin: ${JSON.stringify(rejoin)}`);
  assert.deepEqual(r.params.items.at(-1), { last_seen_id: lastSeen }, "the rejoin carries the last id R got");
  assert.deepEqual(Object.keys(rejoin.response).sort(), ["missed", "recovered"], JSON.stringify(rejoin.response));
  assert.equal(rejoin.response.recovered, true);
  const missed = rejoin.response.missed;
  assert.ok(Number.isInteger(missed), `missed: ${missed}`);
  assert.ok(missed >= sentWhileAway, `missed ${missed} >= ${sentWhileAway} sent and acked while R was away`);
  assert.equal(rejoin.msgsBefore, hadAtClose, "no message between the close and the rejoin reply");

  // The recovered messages, then live ones; S stops once R has had a few live ones.
  await r.msgs.waitForCount(hadAtClose + missed + 10, 10_000);
  sender.stop();
  await sender.done;
  const last = sender.acked.items.at(-1).body;
  await r.msgs.waitFor((p) => p.content.text === last, 5_000, `the last message (${last})`);
  await barrier(r);
  assert.ok(
    sender.acked.items.some((e) => e.tag === "back"),
    "S was still sending after R's proxy came back (during and after the rejoin)",
  );

  // R's list is exactly the stored one: every message once, in the stored order.
  const stored = await history(historyUrl(), topic);
  assert.equal(stored.length, sender.acked.items.length, "every acked message is stored once");
  assert.deepEqual(
    stored.map((p) => p.content.text),
    sender.acked.items.map((e) => e.body),
    "stored in S's order",
  );
  assert.equal(new Set(ids(r.msgs.items)).size, r.msgs.items.length, "no message reached R twice");
  assert.deepEqual(r.msgs.items, stored, "R's messages are the stored ones, in order, each once");
  // The first `missed` after the rejoin are exactly those stored after the last one R had seen.
  const from = stored.findIndex((p) => p.id === lastSeen);
  assert.deepEqual(
    ids(r.msgs.items.slice(hadAtClose, hadAtClose + missed)),
    ids(stored.slice(from + 1, from + 1 + missed)),
  );

  // On the wire: the rejoin reply, then the presence_state, then the first new_msg.
  const frames = r.messages.items;
  const replyAt = frames.findIndex(
    (m) => m.event === "phx_reply" && m.topic === topic && m.ref === rejoin.joinRef && m.join_ref === rejoin.joinRef,
  );
  assert.ok(replyAt >= 0, "the rejoin reply is in R's frame log");
  const stateAt = frames.findIndex((m, i) => i > replyAt && m.topic === topic && m.event === "presence_state");
  const firstMsgAt = frames.findIndex((m, i) => i > replyAt && m.topic === topic && m.event === "new_msg");
  assert.ok(stateAt > replyAt, "a presence_state follows the rejoin reply");
  assert.ok(firstMsgAt > stateAt, `new_msg at ${firstMsgAt} must follow the presence_state at ${stateAt}`);

  assert.equal(r.joins.items.length, 2, `one rejoin only: ${JSON.stringify(r.joins.items)}`);
  t.diagnostic(
    `${sender.acked.items.length} messages; R missed ${missed} (${sentWhileAway} acked while away); ` +
      `the proxy turned R away ${proxy.turnedAway.items.length} time(s)`,
  );
}

test("cut while others send: R rejoins by itself and gets every message once, in order", BOUNDED, async (t) => {
  const server = await startServer({ workers: 2 });
  const proxy = await new CuttableProxy([server.port]).listen();
  const direct = new Clients(server);
  await cutWhileOthersSend(t, {
    proxy,
    senderClients: direct,
    historyUrl: () => server.httpUrl,
    async teardown() {
      await direct.closeAll();
      await proxy.stop();
      await server.stop();
    },
  });
});

const OVER_THE_LIMIT = "more than NEXUS_RECOVERY_MAX missed: recovered false, only live messages, history fills the gap";
test(OVER_THE_LIMIT, BOUNDED, async (t) => {
  const server = await startServer({ workers: 2, env: { NEXUS_RECOVERY_MAX: "5" } });
  const proxy = await new CuttableProxy([server.port]).listen();
  const direct = new Clients(server);
  const viaProxy = new Clients({ url: proxy.url, secret: TEST_SECRET });
  t.after(async () => {
    await Promise.all([direct, viaProxy].map((clients) => clients.closeAll()));
    await proxy.stop();
    await server.stop();
  });
  const topic = chatTopic();
  const r = await joinRecovering(viaProxy, topic);
  const s = await direct.open();
  const { channel: sChannel, status } = await joinChannel(s.socket, topic, { events: [] });
  assert.equal(status, "ok");
  const send = async (body) => {
    assert.deepEqual(await push(sChannel, "new_msg", { body }), { status: "ok", response: {} }, body);
  };

  for (let k = 0; k < 3; k++) await send(`before-${k}`);
  await r.msgs.waitForCount(3);
  await cutAndWaitForClose(proxy, r);
  const lastSeen = r.msgs.items.at(-1).id;

  // Twice the limit while R is away.
  for (let k = 0; k < 10; k++) await send(`away-${k}`);
  assert.equal(r.socket.isConnected(), false, "R is still away");
  proxy.restore();

  const [, rejoin] = await r.joins.waitForCount(2, REJOIN_TIMEOUT_MS);
  assert.deepEqual(r.params.items.at(-1), { last_seen_id: lastSeen });
  assert.deepEqual(rejoin, { status: "ok", response: { recovered: false }, joinRef: rejoin.joinRef, msgsBefore: 3 });

  // Only live messages from here on.
  for (let k = 0; k < 3; k++) await send(`live-${k}`);
  await r.msgs.waitFor((p) => p.content.text === "live-2");
  await barrier(r);
  const before = r.msgs.items.slice(0, 3);
  const live = r.msgs.items.slice(3);
  assert.deepEqual(
    r.msgs.items.map((p) => p.content.text),
    ["before-0", "before-1", "before-2", "live-0", "live-1", "live-2"],
    "nothing old is pushed after a refused recovery",
  );

  // The README recipe: page the history back from the first live message, here 4 at a time
  // (so several pages), until reaching the last message R had, with R's own token.
  const conversation = topic.replace(/^chat:/, "");
  const fetched = [];
  let cursor = live[0].id;
  let pages = 0;
  while (cursor) {
    const res = await fetch(
      `${server.httpUrl}/api/conversations/${conversation}/messages?before=${cursor}&limit=4`,
      { headers: { authorization: `Bearer ${r.token}` }, signal: AbortSignal.timeout(5_000) },
    );
    const body = await res.json();
    assert.equal(res.status, 200, JSON.stringify(body));
    pages++;
    fetched.unshift(...body.messages);
    cursor = body.messages.some((p) => p.id === lastSeen) ? null : body.next_before;
  }
  assert.equal(pages, 3, "10 missed + the last seen one, 4 per page");
  const gap = fetched.slice(fetched.findIndex((p) => p.id === lastSeen) + 1);
  assert.deepEqual(
    gap.map((p) => p.content.text),
    Array.from({ length: 10 }, (_, k) => `away-${k}`),
  );
  const rebuilt = [...before, ...gap, ...live];
  assert.deepEqual(rebuilt, await history(server.httpUrl, topic), "rebuilt list = the stored one, each once, in order");
  assert.equal(r.joins.items.length, 2, `one rejoin only: ${JSON.stringify(r.joins.items)}`);
});

const IN_A_CLUSTER = "cluster: cut while others send, R rejoins on the other node and recovers from the database";
test(IN_A_CLUSTER, BOUNDED, async (t) => {
  const pg = await startPostgres();
  let cluster = null;
  let proxy = null;
  let perNode = [];
  const teardown = async () => {
    await Promise.all(perNode.map((clients) => clients.closeAll()));
    await proxy?.stop();
    await cluster?.stop();
    await pg.stop();
  };
  try {
    cluster = await startCluster(pg, 2);
    proxy = await new CuttableProxy(cluster.nodes.map((n) => n.port)).listen();
    perNode = cluster.nodes.map((node) => new Clients(node));
  } catch (err) {
    await teardown();
    throw err;
  }

  // S sends on the node R first lands on; after the cut the round robin takes R to the other,
  // which recovers from PostgreSQL and gets S's live messages through Redis.
  const senderClients = {
    open: async () => perNode[(await proxy.routes.waitFor(() => true)).backend].open(),
  };
  await cutWhileOthersSend(t, {
    proxy,
    senderClients,
    // Read where R came back.
    historyUrl: () => cluster.nodes[proxy.routes.items.at(-1).backend].httpUrl,
    teardown,
  });
  const routes = proxy.routes.items.map((route) => route.backend);
  assert.equal(routes.length, 2, `R connected twice through the proxy: ${JSON.stringify(routes)}`);
  assert.notEqual(routes[1], routes[0], "R came back on the other node");
});
