// Private conversations with the official client: who may join a `chat:<uuid>` (the join
// policies open, token and proxy) and the server API an application's backend calls (post a
// system message, remove a member, disconnect a user).
//
// The application's backend is a real one: tests/backend/app.py (FastAPI on uvicorn, PyJWT),
// started by backend_harness.js. It mints the socket and join tokens, keeps the membership
// table, answers Nexus's join proxy (and counts how often it is asked, per user and
// conversation) and calls the server API with the API key. Every Nexus here runs 2 workers, so
// a user's sockets and a conversation's members sit on different cores.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import net from "node:net";

import {
  Clients,
  INSERTED_AT_RE,
  Recorder,
  TEST_SECRET,
  UUID_V7_RE,
  joinChannel,
  mintToken,
  nowSeconds,
  push,
  pushResult,
  startServer,
} from "./helpers.js";
import { API_KEY, PROXY_SECRET, nexusApi, startBackend } from "./backend_harness.js";

/** Every test ends within this, pass or fail. */
const BOUNDED = { timeout: 60_000 };
/** phoenix.js reconnects at once after a server close; refused rejoins are not retried in a test's time. */
const FAST_RECONNECT = { reconnectAfterMs: () => 100, rejoinAfterMs: () => 60_000 };
/** Bound for phoenix.js to reconnect and rejoin by itself. */
const REJOIN_TIMEOUT_MS = 10_000;

const UNAUTHORIZED = { status: "error", response: { reason: "unauthorized" } };
const UNAVAILABLE = { status: "error", response: { reason: "authorization unavailable" } };
const JOINED = { status: "ok", response: {} };

let backend;
before(async () => {
  backend = await startBackend();
});
after(async () => {
  await backend?.stop();
});

// ---------------------------------------------------------------------------------------------
// Helpers

/** A Nexus (2 workers) with `env`, and its Clients; both gone when the test ends. */
async function nexus(t, env = {}) {
  const server = await startServer({ workers: 2, env });
  const clients = new Clients(server);
  t.after(async () => {
    await clients.closeAll();
    await server.stop();
  });
  return { server, clients };
}

const TOKEN_POLICY = { NEXUS_JOIN_POLICY: "token", NEXUS_API_KEY: API_KEY };

/** The proxy policy asking the test backend, plus `extra`. */
function proxyPolicy(extra = {}) {
  return {
    NEXUS_JOIN_POLICY: "proxy",
    NEXUS_JOIN_PROXY_URL: backend.authorizeUrl,
    NEXUS_JOIN_PROXY_SECRET: PROXY_SECRET,
    NEXUS_API_KEY: API_KEY,
    ...extra,
  };
}

/** The backend's join proxy goes back to answering at once when the test ends. */
function normalProxyAfter(t) {
  t.after(() => backend.setProxy("normal"));
}

/** Adds every user to `conversation` in the backend's table. */
async function addMembers(conversation, ...users) {
  for (const user of users) await backend.addMember(conversation, user);
}

/** A connected socket of `user` with a socket token from the backend (`chats` claim if asked). */
async function openAs(clients, user, { chats = false, socketOpts } = {}) {
  const token = await backend.socketToken(user, { chats });
  return clients.open({ sub: user, token, socketOpts });
}

/**
 * Joins `chat:<conversation>` and resolves with `{status, response, channel}`. A refused
 * channel is dropped from the socket (no rejoin timer, no duplicate topic on a later join).
 */
async function tryJoin(socket, conversation, params = {}) {
  const { channel, status, response, events } = await joinChannel(socket, `chat:${conversation}`, { params });
  if (status !== "ok") forget(socket, channel);
  return { status, response, channel, events };
}

/** Drops a channel from its socket without a frame: phoenix.js forgets it ever joined. */
function forget(socket, channel) {
  channel.rejoinTimer.reset();
  socket.remove(channel);
}

/** `{status, response}` of a join, for one deepEqual. */
const reply = ({ status, response }) => ({ status, response });

/**
 * Joins `chat:<conversation>` and records every reply to its join push (phoenix.js resends it on
 * each rejoin, with the same hooks), each close of the channel, and its new_msg payloads.
 */
function joinTracked(socket, conversation, params = {}) {
  const topic = `chat:${conversation}`;
  const channel = socket.channel(topic, params);
  const replies = new Recorder(`join replies on ${topic}`);
  const closes = new Recorder(`closes of ${topic}`);
  const msgs = new Recorder(`new_msg on ${topic}`);
  const diffs = new Recorder(`presence_diff on ${topic}`);
  channel.on("new_msg", (payload) => msgs.push(payload));
  channel.on("presence_diff", (payload) => diffs.push(payload));
  channel.onClose(() => closes.push({ joinRef: channel.joinRef() }));
  const record = (status) => (response) => replies.push({ status, response });
  channel.join().receive("ok", record("ok")).receive("error", record("error")).receive("timeout", record("timeout"));
  return { channel, topic, replies, closes, msgs, diffs };
}

/** Records `{code, reason}` of each close of `socket`. */
function closesOf(socket) {
  const closes = new Recorder("socket closes");
  socket.onClose((event) => closes.push({ code: event.code, reason: event.reason }));
  return closes;
}

/** `{status, body}` of the history API for `conversation` with `token` as the bearer. */
async function historyAs(server, conversation, token) {
  const res = await fetch(`${server.httpUrl}/api/conversations/${conversation}/messages`, {
    headers: { authorization: `Bearer ${token}` },
    signal: AbortSignal.timeout(5_000),
  });
  const text = await res.text();
  let body = text;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: kept as text for the assertion message
  }
  return { status: res.status, body };
}

/** Sends `body` on a joined channel and waits for its broadcast to come back on `msgs`. */
async function say(joined, body) {
  assert.deepEqual(await push(joined.channel, "new_msg", { body }), { status: "ok", response: {} }, body);
  return joined.msgs.waitFor((p) => p.content.text === body, undefined, `"${body}" back`);
}

/** The claims of a JWT (unverified). */
const claimsOf = (token) => JSON.parse(Buffer.from(token.split(".")[1], "base64url").toString("utf8"));

/** A loopback port nothing listens on (bound, then closed). */
async function closedPort() {
  const probe = net.createServer();
  await new Promise((resolveListen) => probe.listen(0, "127.0.0.1", resolveListen));
  const { port } = probe.address();
  await new Promise((resolveClose) => probe.close(resolveClose));
  return port;
}

// ---------------------------------------------------------------------------------------------
// open

test("open: any socket token joins any conversation as before; the backend is never asked", BOUNDED, async (t) => {
  const { server, clients } = await nexus(t);
  const callsBefore = (await backend.allCalls()).total;
  const user = randomUUID();
  const conversation = randomUUID();
  const u = await openAs(clients, user);

  const joined = await joinChannel(u.socket, `chat:${conversation}`);
  assert.deepEqual(reply(joined), JOINED);
  const msgs = joined.events.new_msg;
  assert.deepEqual(await push(joined.channel, "new_msg", { body: "hi" }), { status: "ok", response: {} });
  const msg = await msgs.waitFor((p) => p.content.text === "hi");
  assert.equal(msg.sender_id, user);

  // A join token for another conversation in the params changes nothing under `open`.
  const elsewhere = randomUUID();
  await addMembers(elsewhere, user);
  const withToken = await tryJoin(u.socket, randomUUID(), { token: await backend.joinToken(user, elsewhere) });
  assert.deepEqual(reply(withToken), JOINED);

  const history = await historyAs(server, conversation, u.token);
  assert.equal(history.status, 200, JSON.stringify(history.body));
  assert.deepEqual(history.body, { messages: [msg], next_before: null });
  assert.equal((await backend.allCalls()).total, callsBefore, "no join proxy call under open");
});

test("without NEXUS_API_KEY every server API route answers 404, whatever the key", BOUNDED, async (t) => {
  const { server } = await nexus(t);
  const conversation = randomUUID();
  const user = randomUUID();
  const routes = [
    ["POST", `/api/conversations/${conversation}/messages`, { sender_id: user, body: "x" }],
    ["DELETE", `/api/conversations/${conversation}/members/${user}`, undefined],
    ["POST", `/api/users/${user}/disconnect`, undefined],
  ];
  for (const [method, path, body] of routes) {
    for (const key of [API_KEY, null]) {
      const res = await nexusApi(server, method, path, { key, body });
      assert.equal(res.status, 404, `${method} ${path} (key ${key}): ${JSON.stringify(res.body)}`);
    }
  }
});

// ---------------------------------------------------------------------------------------------
// token

test("token: a socket token's chats claim joins those conversations, and is refused elsewhere", BOUNDED, async (t) => {
  const { clients } = await nexus(t, TOKEN_POLICY);
  const user = randomUUID();
  const [a, b, c] = [randomUUID(), randomUUID(), randomUUID()];
  await addMembers(a, user);
  await addMembers(b, user);
  await addMembers(c, randomUUID());

  const token = await backend.socketToken(user, { chats: true });
  assert.deepEqual(claimsOf(token).chats, [a, b].sort(), "the backend lists the user's conversations");
  const u = await clients.open({ sub: user, token });

  const inA = await tryJoin(u.socket, a);
  assert.deepEqual(reply(inA), JOINED);
  assert.deepEqual(reply(await tryJoin(u.socket, b)), JOINED);
  const inC = await tryJoin(u.socket, c);
  assert.deepEqual(reply(inC), UNAUTHORIZED);
  // On the wire: the join's own reply, status error.
  const frame = await u.messages.waitFor((m) => m.topic === `chat:${c}` && m.event === "phx_reply");
  assert.equal(frame.ref, inC.channel.joinPush.ref);
  assert.deepEqual(frame.payload, { status: "error", response: { reason: "unauthorized" } });

  // The socket goes on: its joined conversation still works.
  assert.equal(u.socket.isConnected(), true);
  assert.deepEqual(await push(inA.channel, "new_msg", { body: "still here" }), { status: "ok", response: {} });
  await inA.events.new_msg.waitFor((p) => p.content.text === "still here");

  // The same user with a token without the claim is refused everywhere.
  const plain = await openAs(clients, user);
  assert.deepEqual(reply(await tryJoin(plain.socket, a)), UNAUTHORIZED);
  assert.deepEqual(reply(await tryJoin(plain.socket, b)), UNAUTHORIZED);
});

test("token: a join token from the backend joins its user to its conversation only", BOUNDED, async (t) => {
  const { clients } = await nexus(t, TOKEN_POLICY);
  const [user, other] = [randomUUID(), randomUUID()];
  const [x, y] = [randomUUID(), randomUUID()];
  await addMembers(x, user);
  await addMembers(y, other);

  // The backend mints join tokens for members only.
  const refused = await backend.call("POST", `/users/${user}/join-token/${y}`);
  assert.equal(refused.status, 403);
  const joinToken = await backend.joinToken(user, x);
  const claims = claimsOf(joinToken);
  assert.deepEqual(Object.keys(claims).sort(), ["chat", "exp", "sub"]);
  assert.deepEqual([claims.sub, claims.chat], [user, x]);

  const u = await openAs(clients, user);
  const v = await openAs(clients, other);
  const u2 = await openAs(clients, user);

  // Another user's token, and the token for another conversation, are refused; so is no token.
  assert.deepEqual(reply(await tryJoin(v.socket, x, { token: joinToken })), UNAUTHORIZED);
  assert.deepEqual(reply(await tryJoin(u.socket, y, { token: joinToken })), UNAUTHORIZED);
  assert.deepEqual(reply(await tryJoin(u.socket, x)), UNAUTHORIZED);
  assert.deepEqual(reply(await tryJoin(u.socket, y, { token: await backend.joinToken(other, y) })), UNAUTHORIZED);

  // Join tokens Nexus must not take: expired, without exp, another secret, alg none, another chat.
  const bad = {
    expired: mintToken(TEST_SECRET, { sub: user, exp: nowSeconds() - 60, claims: { chat: x } }),
    "without exp": mintToken(TEST_SECRET, { sub: user, claims: { chat: x } }),
    "another secret": mintToken("another-secret-0123456789abcdef0123456789", {
      sub: user,
      exp: nowSeconds() + 600,
      claims: { chat: x },
    }),
    "alg none": mintToken(TEST_SECRET, { sub: user, exp: nowSeconds() + 600, alg: "none", claims: { chat: x } }),
    "without chat": mintToken(TEST_SECRET, { sub: user, exp: nowSeconds() + 600 }),
  };
  for (const [what, token] of Object.entries(bad)) {
    assert.deepEqual(reply(await tryJoin(u2.socket, x, { token })), UNAUTHORIZED, `a join token ${what}`);
  }

  // The user's own token joins, on both of its sockets; messages flow.
  const inX = await tryJoin(u.socket, x, { token: joinToken });
  assert.deepEqual(reply(inX), JOINED);
  assert.deepEqual(reply(await tryJoin(u2.socket, x, { token: joinToken })), JOINED);
  assert.deepEqual(await push(inX.channel, "new_msg", { body: "joined with a token" }), { status: "ok", response: {} });
  const msg = await inX.events.new_msg.waitFor((p) => p.content.text === "joined with a token");
  assert.equal(msg.sender_id, user);
});

test("token: the history API follows the grant: 200 with it, 403 otherwise", BOUNDED, async (t) => {
  const { server, clients } = await nexus(t, TOKEN_POLICY);
  const user = randomUUID();
  const [x, y] = [randomUUID(), randomUUID()];
  await addMembers(x, user);
  await addMembers(y, randomUUID());
  const withChats = await backend.socketToken(user, { chats: true });
  const joinToken = await backend.joinToken(user, x);
  const plain = await backend.socketToken(user);

  const u = await clients.open({ sub: user, token: withChats });
  const joined = await tryJoin(u.socket, x);
  assert.deepEqual(reply(joined), JOINED);
  assert.deepEqual(await push(joined.channel, "new_msg", { body: "on the record" }), { status: "ok", response: {} });
  const msg = await joined.events.new_msg.waitFor((p) => p.content.text === "on the record");

  const granted = { status: 200, body: { messages: [msg], next_before: null } };
  const forbidden = { status: 403, body: { error: "unauthorized" } };
  assert.deepEqual(await historyAs(server, x, withChats), granted, "chats claim");
  assert.deepEqual(await historyAs(server, x, joinToken), granted, "join token");
  assert.deepEqual(await historyAs(server, y, withChats), forbidden, "chats claim, another conversation");
  assert.deepEqual(await historyAs(server, y, joinToken), forbidden, "join token, another conversation");
  assert.deepEqual(await historyAs(server, x, plain), forbidden, "no grant");
});

// ---------------------------------------------------------------------------------------------
// proxy

test("proxy: a member joins, a non-member is refused unauthorized, one backend call each", BOUNDED, async (t) => {
  const { clients } = await nexus(t, proxyPolicy());
  const [member, stranger] = [randomUUID(), randomUUID()];
  const conversation = randomUUID();
  await addMembers(conversation, member);
  const refusedBearer = (await backend.allCalls()).refused_bearer;

  const m = await openAs(clients, member);
  const s = await openAs(clients, stranger);
  const inside = await tryJoin(m.socket, conversation);
  assert.deepEqual(reply(inside), JOINED);
  assert.deepEqual(reply(await tryJoin(s.socket, conversation)), UNAUTHORIZED);
  // The refusal is cached as well as the grant.
  assert.deepEqual(reply(await tryJoin(s.socket, conversation)), UNAUTHORIZED);
  assert.deepEqual(reply(await tryJoin(m.socket, randomUUID())), UNAUTHORIZED, "a conversation without members");

  assert.equal(await backend.calls(member, conversation), 1);
  assert.equal(await backend.calls(stranger, conversation), 1);
  assert.equal((await backend.allCalls()).refused_bearer, refusedBearer, "Nexus sent the right bearer");
  await say({ channel: inside.channel, msgs: inside.events.new_msg }, "members only");
});

test("proxy: 20 sockets of one user joining at once, then rejoining, make one backend call", BOUNDED, async (t) => {
  normalProxyAfter(t);
  const { clients } = await nexus(t, proxyPolicy());
  const [user, stranger] = [randomUUID(), randomUUID()];
  const conversation = randomUUID();
  await addMembers(conversation, user);
  // The backend answers after 300 ms, so all 20 joins arrive while the first call is out.
  await backend.setProxy("normal", { delayMs: 300 });

  const token = await backend.socketToken(user);
  const sockets = await Promise.all(Array.from({ length: 20 }, () => clients.open({ sub: user, token })));
  const first = await Promise.all(sockets.map((c) => tryJoin(c.socket, conversation)));
  assert.deepEqual(first.map(reply), first.map(() => JOINED));
  assert.equal(await backend.calls(user, conversation), 1, "concurrent joins share one call");

  // Leave and join again, three times on every socket: answered from the cache.
  let channels = first.map((j) => j.channel);
  for (let round = 0; round < 3; round++) {
    channels = await Promise.all(
      sockets.map(async (c, i) => {
        assert.deepEqual(await pushResult(channels[i].leave()), { status: "ok", response: {} });
        const again = await tryJoin(c.socket, conversation);
        assert.deepEqual(reply(again), JOINED, `round ${round}, socket ${i}`);
        return again.channel;
      }),
    );
  }
  assert.equal(await backend.calls(user, conversation), 1, "rejoins are answered from the cache");

  // The same for a refusal: 5 sockets of a non-member at once, then again.
  const strangerToken = await backend.socketToken(stranger);
  const others = await Promise.all(Array.from({ length: 5 }, () => clients.open({ sub: stranger, token: strangerToken })));
  const refused = await Promise.all(others.map((c) => tryJoin(c.socket, conversation)));
  assert.deepEqual(refused.map(reply), refused.map(() => UNAUTHORIZED));
  for (const c of others) assert.deepEqual(reply(await tryJoin(c.socket, conversation)), UNAUTHORIZED);
  assert.equal(await backend.calls(stranger, conversation), 1, "one call for the refusals too");
});

test("proxy: a backend answering 500 gives authorization unavailable, not cached", BOUNDED, async (t) => {
  normalProxyAfter(t);
  const { clients } = await nexus(t, proxyPolicy());
  const user = randomUUID();
  const conversation = randomUUID();
  await addMembers(conversation, user);
  const u = await openAs(clients, user);

  await backend.setProxy("error");
  assert.deepEqual(reply(await tryJoin(u.socket, conversation)), UNAVAILABLE);
  assert.equal(await backend.calls(user, conversation), 1);
  assert.equal(u.socket.isConnected(), true);

  await backend.setProxy("normal");
  assert.deepEqual(reply(await tryJoin(u.socket, conversation)), JOINED, "the failure was not cached");
  assert.equal(await backend.calls(user, conversation), 2);
});

test("proxy: a backend slower than NEXUS_JOIN_PROXY_TIMEOUT gives authorization unavailable, not cached", BOUNDED, async (t) => {
  normalProxyAfter(t);
  const { clients } = await nexus(t, proxyPolicy({ NEXUS_JOIN_PROXY_TIMEOUT: "300ms" }));
  const user = randomUUID();
  const conversation = randomUUID();
  await addMembers(conversation, user);
  const u = await openAs(clients, user);

  await backend.setProxy("slow", { slowMs: 3_000 });
  const started = Date.now();
  assert.deepEqual(reply(await tryJoin(u.socket, conversation)), UNAVAILABLE);
  const waited = Date.now() - started;
  assert.ok(waited < 2_500, `refused after ${waited} ms: the 300 ms timeout, not the backend's 3 s answer`);
  assert.equal(await backend.calls(user, conversation), 1);

  // Back to normal while the slow answer is still out: the next join asks again and gets in.
  await backend.setProxy("normal");
  assert.deepEqual(reply(await tryJoin(u.socket, conversation)), JOINED, "the timeout was not cached");
  assert.equal(await backend.calls(user, conversation), 2);
});

test("proxy: a backend that is down gives authorization unavailable (joins and history)", BOUNDED, async (t) => {
  const port = await closedPort();
  const { server, clients } = await nexus(t, proxyPolicy({ NEXUS_JOIN_PROXY_URL: `http://127.0.0.1:${port}/nexus/authorize` }));
  const user = randomUUID();
  const conversation = randomUUID();
  const u = await openAs(clients, user);
  assert.deepEqual(reply(await tryJoin(u.socket, conversation)), UNAVAILABLE);
  assert.deepEqual(reply(await tryJoin(u.socket, conversation)), UNAVAILABLE);
  assert.deepEqual(await historyAs(server, conversation, u.token), {
    status: 503,
    body: { error: "authorization unavailable" },
  });
  assert.equal(u.socket.isConnected(), true);
});

test("proxy: a backend refusing Nexus's secret (401) gives authorization unavailable", BOUNDED, async (t) => {
  const { clients } = await nexus(t, proxyPolicy({ NEXUS_JOIN_PROXY_SECRET: "not-the-backend-secret-0123456789" }));
  const user = randomUUID();
  const conversation = randomUUID();
  await addMembers(conversation, user);
  const refusedBearer = (await backend.allCalls()).refused_bearer;
  const u = await openAs(clients, user);
  assert.deepEqual(reply(await tryJoin(u.socket, conversation)), UNAVAILABLE);
  assert.equal((await backend.allCalls()).refused_bearer, refusedBearer + 1, "the backend saw the wrong bearer");
  assert.equal(await backend.calls(user, conversation), 0);
});

test("proxy: the history API asks the backend: 200 member, 403 non-member, 503 while it fails", BOUNDED, async (t) => {
  normalProxyAfter(t);
  const { server } = await nexus(t, proxyPolicy());
  const [member, stranger, later] = [randomUUID(), randomUUID(), randomUUID()];
  const conversation = randomUUID();
  await addMembers(conversation, member, later);
  const [tm, ts, tl] = await Promise.all([member, stranger, later].map((u) => backend.socketToken(u)));

  const empty = { status: 200, body: { messages: [], next_before: null } };
  assert.deepEqual(await historyAs(server, conversation, tm), empty);
  assert.deepEqual(await historyAs(server, conversation, ts), { status: 403, body: { error: "unauthorized" } });
  assert.equal(await backend.calls(member, conversation), 1);
  assert.equal(await backend.calls(stranger, conversation), 1);

  // While the backend fails: the cached member still reads, an unknown pair gets 503.
  await backend.setProxy("error");
  assert.deepEqual(await historyAs(server, conversation, tm), empty, "answered from the cache");
  assert.deepEqual(await historyAs(server, conversation, tl), {
    status: 503,
    body: { error: "authorization unavailable" },
  });
  await backend.setProxy("normal");
  assert.deepEqual(await historyAs(server, conversation, tl), empty, "the failure was not cached");
  assert.equal(await backend.calls(member, conversation), 1);
  assert.equal(await backend.calls(later, conversation), 2);
});

test("proxy: NEXUS_JOIN_PROXY_CACHE=0s asks the backend on every join", BOUNDED, async (t) => {
  const { clients } = await nexus(t, proxyPolicy({ NEXUS_JOIN_PROXY_CACHE: "0s" }));
  const [member, stranger] = [randomUUID(), randomUUID()];
  const conversation = randomUUID();
  await addMembers(conversation, member);
  const m = await openAs(clients, member);
  const s = await openAs(clients, stranger);
  for (let k = 1; k <= 3; k++) {
    const joined = await tryJoin(m.socket, conversation);
    assert.deepEqual(reply(joined), JOINED);
    assert.deepEqual(await pushResult(joined.channel.leave()), { status: "ok", response: {} });
    assert.deepEqual(reply(await tryJoin(s.socket, conversation)), UNAUTHORIZED);
    assert.equal(await backend.calls(member, conversation), k);
    assert.equal(await backend.calls(stranger, conversation), k);
  }
});

// ---------------------------------------------------------------------------------------------
// Server API, called by the backend

test("server API: a system message reaches members as new_msg equal to the 201 body, and is in history", BOUNDED, async (t) => {
  const { server, clients } = await nexus(t, proxyPolicy());
  await backend.useNexus(server);
  const [alice, bob] = [randomUUID(), randomUUID()];
  const conversation = randomUUID();
  await addMembers(conversation, alice, bob);
  // Three sockets (alice, bob twice): spread over both cores.
  const members = await Promise.all([alice, bob, bob].map((u) => openAs(clients, u)));
  const joined = members.map((m) => joinTracked(m.socket, conversation));
  for (const j of joined) assert.deepEqual(await j.replies.waitForCount(1).then((r) => r[0]), JOINED);

  const system = randomUUID();
  const answer = await backend.systemMessage(conversation, { sender_id: system, body: "Carol joined the conversation" });
  assert.equal(answer.nexus_status, 201, JSON.stringify(answer));
  const stored = answer.nexus_body;
  assert.deepEqual(Object.keys(stored).sort(), ["content", "id", "inserted_at", "sender_id"]);
  assert.match(stored.id, UUID_V7_RE);
  assert.match(stored.inserted_at, INSERTED_AT_RE);
  assert.deepEqual(stored.content, { text: "Carol joined the conversation" });
  assert.equal(stored.sender_id, system);

  for (const j of joined) {
    assert.deepEqual(await j.msgs.waitFor((p) => p.id === stored.id), stored, "the broadcast is the 201 body");
  }
  // A member answers; history has both, in order.
  const answerMsg = await say({ channel: joined[1].channel, msgs: joined[1].msgs }, "welcome Carol");
  assert.deepEqual(await historyAs(server, conversation, members[0].token), {
    status: 200,
    body: { messages: [stored, answerMsg], next_before: null },
  });
  assert.deepEqual(joined[0].msgs.items, [stored, answerMsg], "alice got each once, in order");
});

test("server API: a wrong or missing key is 401, a bad message 400; neither broadcasts", BOUNDED, async (t) => {
  const { server, clients } = await nexus(t, proxyPolicy());
  const user = randomUUID();
  const conversation = randomUUID();
  await addMembers(conversation, user);
  const u = await openAs(clients, user);
  const closes = closesOf(u.socket);
  const joined = joinTracked(u.socket, conversation);
  assert.deepEqual((await joined.replies.waitForCount(1))[0], JOINED);

  const routes = [
    ["POST", `/api/conversations/${conversation}/messages`, { sender_id: user, body: "not with that key" }],
    ["DELETE", `/api/conversations/${conversation}/members/${user}`, undefined],
    ["POST", `/api/users/${user}/disconnect`, undefined],
  ];
  for (const [method, path, body] of routes) {
    for (const key of ["not-the-api-key-0123456789abcdef", null]) {
      const res = await nexusApi(server, method, path, { key, body });
      assert.deepEqual(res, { status: 401, body: { error: "unauthorized" } }, `${method} ${path} with key ${key}`);
    }
  }

  const messages = `/api/conversations/${conversation}/messages`;
  const badBodies = {
    "bad JSON": { rawBody: "{not json" },
    "no body": { rawBody: "" },
    "sender_id not a UUID": { body: { sender_id: "system", body: "x" } },
    "no sender_id": { body: { body: "x" } },
    "empty body": { body: { sender_id: user, body: "" } },
    "no body field": { body: { sender_id: user } },
  };
  for (const [what, opts] of Object.entries(badBodies)) {
    const res = await nexusApi(server, "POST", messages, opts);
    assert.equal(res.status, 400, `${what}: ${JSON.stringify(res.body)}`);
    assert.equal(typeof res.body?.error, "string", `${what}: ${JSON.stringify(res.body)}`);
  }

  const good = await nexusApi(server, "POST", messages, { body: { sender_id: user, body: "the only one" } });
  assert.equal(good.status, 201, JSON.stringify(good.body));
  const first = await joined.msgs.waitForCount(1);
  assert.deepEqual(first, [good.body], "nothing refused was broadcast");
  assert.equal(joined.channel.state, "joined", "the refused DELETE removed nobody");
  assert.deepEqual(closes.items, [], "the refused disconnect closed nothing");
});

test("server API: removing a member closes its channel, others see it leave; its next join is asked again and refused", BOUNDED, async (t) => {
  const { server, clients } = await nexus(t, proxyPolicy());
  await backend.useNexus(server);
  const [user, watcher] = [randomUUID(), randomUUID()];
  const [conversation, elsewhere] = [randomUUID(), randomUUID()];
  await addMembers(conversation, user, watcher);
  await addMembers(elsewhere, user);

  // The user on two sockets (in the conversation and, on the first, elsewhere); the watcher on one.
  const u = await Promise.all([openAs(clients, user), openAs(clients, user)]);
  const w = await openAs(clients, watcher);
  const wIn = joinTracked(w.socket, conversation);
  assert.deepEqual((await wIn.replies.waitForCount(1))[0], JOINED);
  const uIn = u.map((c) => joinTracked(c.socket, conversation));
  for (const j of uIn) assert.deepEqual((await j.replies.waitForCount(1))[0], JOINED);
  const uElsewhere = joinTracked(u[0].socket, elsewhere);
  assert.deepEqual((await uElsewhere.replies.waitForCount(1))[0], JOINED);
  // The watcher has seen both of the user's connections arrive.
  await wIn.diffs.until((diffs) => metasOf(diffs, "joins", user) === 2, undefined, "the user's 2 joins");
  assert.equal(await backend.calls(user, conversation), 1);

  const removed = await backend.removeMember(conversation, user);
  assert.deepEqual(removed, { was_member: true, nexus_status: 204, nexus_body: null });

  // Each of the user's channels in the conversation is closed by the server (phx_close, its join_ref).
  for (const [i, j] of uIn.entries()) {
    const [close] = await j.closes.waitForCount(1);
    assert.equal(j.channel.state, "closed");
    const frame = u[i].messages.items.find((m) => m.topic === j.topic && m.event === "phx_close");
    assert.ok(frame, `a phx_close frame on socket ${i}`);
    assert.equal(frame.join_ref, close.joinRef);
  }
  // The watcher sees the user leave (both connections) and stays.
  await wIn.diffs.until((diffs) => metasOf(diffs, "leaves", user) === 2, undefined, "the user's 2 leaves");
  assert.equal(wIn.channel.state, "joined");
  await say(wIn, "still talking");

  // The user's sockets stay up, and its other conversation too.
  for (const c of u) assert.equal(c.socket.isConnected(), true);
  assert.equal(uElsewhere.channel.state, "joined");
  await say(uElsewhere, "elsewhere still works");

  // Its next join is asked again (the cached grant was dropped) and refused.
  assert.deepEqual(reply(await tryJoin(u[0].socket, conversation)), UNAUTHORIZED);
  assert.equal(await backend.calls(user, conversation), 2);

  // Removing someone who is not there is fine too.
  const nobody = await backend.removeMember(conversation, randomUUID());
  assert.deepEqual(nobody, { was_member: false, nexus_status: 204, nexus_body: null });
});

/** Metas of `user` over every diff's `joins` or `leaves`. */
function metasOf(diffs, side, user) {
  return diffs.reduce((n, diff) => n + (diff[side][user]?.metas.length ?? 0), 0);
}

test("server API: kick closes every socket of the user with 1008; phoenix.js reconnects and rejoins only what it may", BOUNDED, async (t) => {
  // Without the cache every rejoin asks the backend, which has meanwhile dropped the user from `b`.
  const { server, clients } = await nexus(t, proxyPolicy({ NEXUS_JOIN_PROXY_CACHE: "0s" }));
  await backend.useNexus(server);
  const [user, bystander] = [randomUUID(), randomUUID()];
  const [a, b] = [randomUUID(), randomUUID()];
  await addMembers(a, user, bystander);
  await addMembers(b, user);

  const u = await Promise.all([0, 1].map(() => openAs(clients, user, { socketOpts: FAST_RECONNECT })));
  const v = await openAs(clients, bystander, { socketOpts: FAST_RECONNECT });
  const uCloses = u.map((c) => closesOf(c.socket));
  const vCloses = closesOf(v.socket);
  const uA = u.map((c) => joinTracked(c.socket, a));
  const uB = joinTracked(u[0].socket, b);
  const vA = joinTracked(v.socket, a);
  for (const j of [...uA, uB, vA]) assert.deepEqual((await j.replies.waitForCount(1))[0], JOINED, j.topic);

  // The app drops the user from `b` (in its own table only), then kicks the user.
  assert.deepEqual(await backend.removeMember(b, user, { notify: false }), { was_member: true });
  const callsB = await backend.calls(user, b);
  assert.deepEqual(await backend.kick(user), { nexus_status: 204, nexus_body: null });

  for (const closes of uCloses) {
    const [close] = await closes.waitForCount(1);
    assert.deepEqual(close, { code: 1008, reason: "disconnected by the server" });
  }
  // phoenix.js reconnects by itself and rejoins: `a` is granted again, `b` is refused.
  for (const j of uA) assert.deepEqual((await j.replies.waitForCount(2, REJOIN_TIMEOUT_MS))[1], JOINED);
  assert.deepEqual((await uB.replies.waitForCount(2, REJOIN_TIMEOUT_MS))[1], UNAUTHORIZED);
  assert.equal(await backend.calls(user, b), callsB + 1, "the rejoin of b asked the backend");
  for (const c of u) assert.equal(c.socket.isConnected(), true);

  // Back in `a`: the bystander, never disconnected, hears the user.
  const heard = await say(uA[0], "back again");
  assert.equal(heard.sender_id, user);
  await vA.msgs.waitFor((p) => p.id === heard.id);
  assert.deepEqual(vCloses.items, [], "the bystander was not disconnected");
  assert.equal(vA.replies.items.length, 1, "nor rejoined");

  // Kicking a user with no socket is fine too.
  assert.deepEqual(await backend.kick(randomUUID()), { nexus_status: 204, nexus_body: null });
});
