// Authentication on connect: the JWT in params.token or in phoenix 1.8's authToken option
// (Sec-WebSocket-Protocol); every bad token is refused with HTTP 403 before the socket opens.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";

import {
  Clients,
  WAIT_TIMEOUT_MS,
  chatTopic,
  errorText,
  joinChannel,
  mintToken,
  nowSeconds,
  push,
  startServer,
  waitFor,
} from "./helpers.js";

let server;
before(async () => {
  server = await startServer({ workers: 2 });
});
after(async () => {
  await server?.stop();
});

/** Asserts a connected socket works end to end as user `sub`. */
async function assertWorksAs(socket, sub) {
  const { channel, status, response, events } = await joinChannel(socket, chatTopic());
  assert.equal(status, "ok", `join: ${JSON.stringify(response)}`);
  assert.deepEqual(response, {});
  assert.deepEqual(await push(channel, "new_msg", { body: "who am i" }), { status: "ok", response: {} });
  const msg = await events.new_msg.waitFor((p) => p.content?.text === "who am i");
  assert.equal(msg.sender_id, sub, "sender_id is the token's sub");
}

test("authToken option (Sec-WebSocket-Protocol) connects and joins", async (t) => {
  const clients = new Clients(server);
  t.after(() => clients.closeAll());

  // phoenix.js sends btoa(token) with the '=' padding stripped: pick a token whose length is not
  // a multiple of 3 so the server must decode unpadded base64. (btoa of JWT characters never
  // yields '+' or '/', so the standard and URL-safe alphabets agree here.)
  const sub = randomUUID();
  let token = mintToken(server.secret, { sub, exp: nowSeconds() + 600 });
  if (token.length % 3 === 0) {
    token = mintToken(server.secret, { sub, exp: nowSeconds() + 600, claims: { pad: "x" } });
  }
  assert.notEqual(token.length % 3, 0);

  const { socket } = await clients.open({ authToken: token });
  assert.equal(socket.conn.protocol, "phoenix", "the handshake answers Sec-WebSocket-Protocol: phoenix");
  await assertWorksAs(socket, sub);
});

test("params.token works as the token's sub", async (t) => {
  const clients = new Clients(server);
  t.after(() => clients.closeAll());
  const sub = randomUUID();
  const { socket } = await clients.open({ token: mintToken(server.secret, { sub }) });
  await assertWorksAs(socket, sub);
});

/**
 * Connects with the given client options and asserts the socket errors without ever opening.
 * Returns the error text.
 */
async function assertRefused(clients, opts) {
  const { socket } = clients.create(opts);
  const events = [];
  socket.onOpen(() => events.push("open"));
  socket.onClose((ev) => events.push(`close:${ev?.code}`));
  // Wait for the first of open/error: an open fails the test at once instead of timing out.
  const first = waitFor(
    (resolve) => {
      const refs = [
        socket.onError((err) => {
          events.push("error");
          resolve({ kind: "error", err });
        }),
        socket.onOpen(() => resolve({ kind: "open" })),
      ];
      return () => socket.off(refs);
    },
    WAIT_TIMEOUT_MS,
    "socket onError",
  );
  socket.connect();
  const { kind, err } = await first;
  assert.equal(kind, "error", `the socket must not open; events: ${JSON.stringify(events)}`);
  assert.equal(events[0], "error", `onError must be the first event, got ${JSON.stringify(events)}`);
  assert.ok(!events.includes("open"), "the socket must never open");
  assert.equal(socket.isConnected(), false);
  const text = errorText(err);
  assert.match(text, /\b403\b/, `expected an HTTP 403 refusal, got: ${text}`);
  return text;
}

const now = nowSeconds();
const badTokens = {
  "wrong secret": () => mintToken("a-different-secret-that-is-also-32-bytes-long!!"),
  "expired exp": () => mintToken(server.secret, { exp: now - 60 }),
  "missing sub": () => mintToken(server.secret, { sub: null, exp: now + 600 }),
  "sub not a uuid": () => mintToken(server.secret, { sub: "user-42" }),
  "nbf in the future": () => mintToken(server.secret, { nbf: now + 3600 }),
  "alg none": () => mintToken(server.secret, { alg: "none" }),
  "alg HS512": () => mintToken(server.secret, { alg: "HS512" }),
  "tampered payload": () => {
    const [h, , s] = mintToken(server.secret).split(".");
    const forged = Buffer.from(JSON.stringify({ sub: randomUUID() })).toString("base64url");
    return `${h}.${forged}.${s}`;
  },
  "not a jwt": () => "not-a-jwt",
};

for (const [name, makeToken] of Object.entries(badTokens)) {
  test(`params.token with ${name} → onError, never opens (403)`, async (t) => {
    const clients = new Clients(server);
    t.after(() => clients.closeAll());
    await assertRefused(clients, { token: makeToken() });
  });
}

test("no token at all → onError, never opens (403)", async (t) => {
  const clients = new Clients(server);
  t.after(() => clients.closeAll());
  await assertRefused(clients, { token: null });
});

for (const name of ["wrong secret", "expired exp", "missing sub"]) {
  test(`authToken with ${name} → onError, never opens (403)`, async (t) => {
    const clients = new Clients(server);
    t.after(() => clients.closeAll());
    await assertRefused(clients, { authToken: badTokens[name]() });
  });
}

test("a healthy client keeps working after refused connections", async (t) => {
  const clients = new Clients(server);
  t.after(() => clients.closeAll());
  const healthy = await clients.open();
  for (const makeToken of Object.values(badTokens)) {
    await assertRefused(clients, { token: makeToken() });
  }
  await assertWorksAs(healthy.socket, healthy.sub);
});
