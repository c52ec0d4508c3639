// Presence under churn with the official JS Presence helper: 50 clients (30 users, 20 of them
// on two sockets) on one topic of a 2-worker server join, leave, disconnect, drop their TCP
// connection and reconnect (the phoenix client rejoining by itself) at random, driven by a
// seeded PRNG for a bounded number of actions. At rest, every joined client's
// `Presence.list()` must be the true set: the users with joined sockets, one meta per joined
// socket, and the same phx_refs everywhere (those of a fresh observer's presence_state).
//
// Seed: PRESENCE_CHURN_SEED (default below); it is printed with any failure.
import { randomUUID } from "node:crypto";
import { after, before, test } from "node:test";
import assert from "node:assert/strict";

import { Presence } from "phoenix";

import { Clients, Recorder, chatTopic, connectSocket, pushResult, startServer, withTimeout } from "./helpers.js";

const SLOTS = 50;
const USERS = 30;
const ACTIONS = 300;
const SEED = Number(process.env.PRESENCE_CHURN_SEED || 0x5eed1234);
const CONVERGE_MS = 10_000;

let server;
before(async () => {
  server = await startServer({ workers: 2 });
});
after(async () => {
  await server?.stop();
});

/** mulberry32: a small seeded PRNG, uniform in [0, 1). */
function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** `{user_id: [phx_ref, ...sorted]}` of a Presence helper's current list. */
function snapshot(presence) {
  const out = {};
  presence.list((id, { metas }) => {
    out[id] = metas.map((m) => m.phx_ref).sort();
  });
  return out;
}

/** `{user_id: number of metas}`. */
const counts = (snap) => Object.fromEntries(Object.entries(snap).map(([id, refs]) => [id, refs.length]));

/** Same keys and values, whatever the key order. */
function sameMap(a, b) {
  const ka = Object.keys(a).sort();
  const kb = Object.keys(b).sort();
  return JSON.stringify(ka) === JSON.stringify(kb) && ka.every((k) => JSON.stringify(a[k]) === JSON.stringify(b[k]));
}

/** Disconnects `socket` cleanly and resolves once its connection is torn down. */
function disconnect(socket) {
  return withTimeout(new Promise((resolve) => socket.disconnect(() => resolve())), 3_000, "socket.disconnect");
}

test("every member's Presence.list() is the true set after random churn", { timeout: 30_000 }, async (t) => {
  const clients = new Clients(server);
  t.after(() => clients.closeAll());
  const topic = chatTopic();
  const random = prng(SEED);
  const pick = (n) => Math.floor(random() * n);
  const log = [];
  const context = () => `seed ${SEED}; last actions:\n  ${log.slice(-15).join("\n  ")}`;

  const users = Array.from({ length: USERS }, () => randomUUID());
  // A slot is one phoenix Socket; `channel` set = it wants to be joined (and is, when connected
  // and idle); `joinOks` records each ok join reply of the current channel (rejoins included).
  const slots = Array.from({ length: SLOTS }, (_, i) => ({
    i,
    sub: users[i % USERS],
    client: null,
    connected: false,
    channel: null,
    presence: null,
    syncs: null,
    joinOks: null,
    busy: null,
  }));

  async function connect(slot) {
    if (!slot.client) {
      slot.client = await clients.open({ sub: slot.sub });
    } else {
      const rejoin = slot.channel && slot.joinOks.items.length;
      await connectSocket(slot.client.socket);
      // The phoenix client rejoins its errored channel by itself on open.
      if (slot.channel) await slot.joinOks.waitForCount(rejoin + 1);
    }
    slot.connected = true;
  }

  async function join(slot) {
    const channel = slot.client.socket.channel(topic);
    const presence = new Presence(channel);
    const syncs = new Recorder(`presence of slot ${slot.i}`);
    const joinOks = new Recorder(`joins of slot ${slot.i}`);
    presence.onSync(() => syncs.push(snapshot(presence)));
    channel.joinPush.receive("ok", () => joinOks.push(channel.joinRef()));
    Object.assign(slot, { channel, presence, syncs, joinOks });
    const reply = await pushResult(channel.join());
    assert.deepEqual(reply, { status: "ok", response: {} }, `join of slot ${slot.i}`);
  }

  async function leave(slot) {
    const joinRef = slot.channel.joinRef();
    const reply = await pushResult(slot.channel.leave());
    assert.deepEqual(reply, { status: "ok", response: {} }, `leave of slot ${slot.i}`);
    Object.assign(slot, { channel: null, presence: null, syncs: null, joinOks: null });
    // phoenix.js resolves leave() at once, locally, and routes broadcasts (join_ref null) by
    // topic alone: a presence_diff the server sent to the old membership before it read the
    // phx_leave would land in the next channel's Presence, which keeps pre-state diffs in a
    // buffer it never clears across rejoins, and could replay it after a later state (a ghost
    // no server can prevent). So wait for the server's phx_close of the old join first.
    await slot.client.messages.waitFor(
      (m) => m.event === "phx_close" && m.topic === topic && m.join_ref === joinRef,
      undefined,
      `the server's phx_close of slot ${slot.i}'s join ${joinRef}`,
    );
  }

  async function drop(slot) {
    // The TCP connection vanishes without a close frame.
    slot.connected = false;
    slot.client.socket.conn.terminate();
  }

  async function close(slot) {
    slot.connected = false;
    await disconnect(slot.client.socket);
  }

  async function reconnect(slot) {
    await close(slot);
    await connect(slot);
  }

  function choose(slot) {
    const r = random();
    if (!slot.connected) {
      // Reconnect (and rejoin, if it was joined).
      return ["connect", slot.client ? reconnect : connect];
    }
    if (!slot.channel) {
      if (r < 0.7) return ["join", join];
      return r < 0.85 ? ["close", close] : ["drop", drop];
    }
    if (r < 0.35) return ["leave", leave];
    if (r < 0.6) return ["close", close];
    if (r < 0.85) return ["drop", drop];
    return ["reconnect", reconnect];
  }

  const failures = [];
  function start(slot, name, action) {
    log.push(`slot ${slot.i} (${slot.sub.slice(0, 8)}): ${name}`);
    slot.busy = action(slot).then(
      () => {
        slot.busy = null;
      },
      (err) => {
        slot.busy = null;
        failures.push(new Error(`slot ${slot.i} ${name} failed: ${err.message}\n${context()}`));
      },
    );
    return slot.busy;
  }

  // Everyone connects and joins first: 50 members on one topic.
  await Promise.all(slots.map((slot) => connect(slot).then(() => join(slot))));

  // Then ACTIONS random actions, at most one in flight per slot, many slots at once.
  const inFlight = new Set();
  for (let n = 0; n < ACTIONS; n++) {
    let idle = slots.filter((s) => !s.busy);
    while (idle.length === 0) {
      await Promise.race(inFlight);
      idle = slots.filter((s) => !s.busy);
    }
    const slot = idle[pick(idle.length)];
    const [name, action] = choose(slot);
    const p = start(slot, name, action);
    inFlight.add(p);
    p.then(() => inFlight.delete(p));
    if (failures.length) break;
  }
  await Promise.all(inFlight);
  if (failures.length) throw failures[0];

  // The truth: users with joined sockets, and how many.
  const present = slots.filter((s) => s.connected && s.channel);
  const truth = {};
  for (const s of present) truth[s.sub] = (truth[s.sub] || 0) + 1;
  assert.ok(present.length >= 5, `too few members left to mean anything (${present.length})\n${context()}`);

  // A fresh observer's view, once it matches the truth, holds the true phx_refs (its state has
  // every current meta; sockets that went away may leave a moment later).
  const client = await clients.open();
  const observer = { i: "observer", sub: client.sub, client };
  await join(observer);
  truth[observer.sub] = 1;
  const expected = await observer.syncs.until(
    (items) => items.length && sameMap(counts(items.at(-1)), truth) && items.at(-1),
    CONVERGE_MS,
    `the observer's list to match the true counts ${JSON.stringify(truth)}\n${context()}`,
  );
  const refs = Object.values(expected).flat();
  assert.equal(new Set(refs).size, refs.length, "phx_refs are unique per meta");

  // Every joined client converges on exactly that list.
  await Promise.all(
    present.map((s) =>
      s.syncs.until(
        (items) => items.length && sameMap(items.at(-1), expected) && items.at(-1),
        CONVERGE_MS,
        `slot ${s.i}'s Presence.list() to equal ${JSON.stringify(expected)}\n${context()}`,
      ),
    ),
  );
  t.diagnostic(`seed ${SEED}: ${present.length} joined sockets of ${Object.keys(truth).length - 1} users at rest`);
});
