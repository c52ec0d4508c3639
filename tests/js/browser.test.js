// The demo page in a real browser: headless Debian Chromium driven by playwright-core.
// Browser contexts are users on one conversation: they see each other in the presence list,
// exchange messages both ways in order, one reloads and sees the history once (no duplicates),
// one leaves and disappears from the other's list. The composer keeps every keystroke while
// earlier messages are in flight; a message that arrives while history is loading lands in id
// order; a refused message stays visible with its reason and can be sent again. A screenshot
// of the page is saved to tests/js/artifacts/chat.png (look at it).
//
// Reconnect: the page is served through a TCP proxy the test can cut (destroying its
// connections is a dropped network to the browser; while cut it turns new connections away).
// While the page is away another user (the phoenix client in node) sends; phoenix.js
// reconnects by itself and rejoins with `last_seen_id` (the newest message shown), the server
// pushes what was missed (`recovered: true`), or, past NEXUS_RECOVERY_MAX, answers
// `recovered: false` and the page pages the history back over the gap. Either way the page
// ends up showing the stored list (read from the history API), each message once, in order,
// and its status line says what happened.
//
// Needs /usr/bin/chromium (Debian's `chromium` package; tests/run.sh installs it with apt-get
// when missing). Without it these tests fail and say so: they never skip.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import { randomUUID } from "node:crypto";
import { createServer, connect } from "node:net";
import { join } from "node:path";

import { Clients, REPO_ROOT, Recorder, joinChannel, push, startServer } from "./helpers.js";

const CHROMIUM = process.env.NEXUS_CHROMIUM || "/usr/bin/chromium";
const ARTIFACTS = join(REPO_ROOT, "tests", "js", "artifacts");
const WAIT = 10_000;
/** Bound for each reconnect test as a whole. */
const BOUNDED = { timeout: 80_000 };

let server;
let browser;
before(async () => {
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM}: install Debian's chromium package (tests/run.sh does)`);
  const { chromium } = await import("playwright-core");
  server = await startServer({ workers: 2, env: { NEXUS_DEV_TOKENS: "1" } });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
  });
});
after(async () => {
  await browser?.close();
  await server?.stop();
});

/**
 * A new browser user on the page of conversation `conv` (on `srv`), signed in with a dev
 * token. `prepare(page)` runs before the page loads (e.g. to install a route).
 */
async function openUser(conv, { srv = server, prepare } = {}) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await prepare?.(page);
  await page.goto(`${srv.httpUrl}/#${conv}`);
  await page.click("#dev-token");
  await page.waitForSelector("#status-text:text('connected')", { timeout: WAIT });
  return { context, page, errors };
}

const texts = (page) => page.$$eval("#timeline .msg .text", (els) => els.map((e) => e.textContent));
const online = (page) => page.$$eval("#presence li", (els) => els.map((e) => e.dataset.user));

async function waitForTexts(page, expected) {
  try {
    await page.waitForFunction(
      (want) => {
        const got = [...document.querySelectorAll("#timeline .msg .text")].map((e) => e.textContent);
        return JSON.stringify(got) === JSON.stringify(want);
      },
      expected,
      { timeout: WAIT },
    );
  } catch (e) {
    const outbox = await page.$$eval("#outbox .outgoing", (els) => els.map((e) => e.textContent));
    assert.fail(`timeline ${JSON.stringify(await texts(page))}, outbox ${JSON.stringify(outbox)}, wanted ${JSON.stringify(expected)}: ${e.message}`);
  }
}

async function waitForOnline(page, n) {
  await page.waitForFunction((count) => document.querySelectorAll("#presence li").length === count, n, {
    timeout: WAIT,
  });
}

async function waitForStatus(page, want) {
  try {
    await page.waitForFunction(
      (re) => new RegExp(re).test(document.getElementById("status-text").textContent),
      want.source,
      { timeout: WAIT },
    );
  } catch (e) {
    assert.fail(`status ${JSON.stringify(await page.textContent("#status-text"))}, wanted ${want}: ${e.message}`);
  }
}

/**
 * A TCP proxy on loopback to `srv`: the page loads from `httpUrl` and its WebSocket goes
 * through it too. `cut()` destroys every proxied connection and turns new ones away (closed
 * at once) until `restore()`.
 */
async function startProxy(srv) {
  const sockets = new Set();
  let down = false;
  const track = (socket) => {
    sockets.add(socket);
    socket.on("error", () => {});
    socket.once("close", () => sockets.delete(socket));
  };
  const proxy = createServer((client) => {
    track(client);
    if (down) return client.destroy();
    const upstream = connect({ host: "127.0.0.1", port: srv.port });
    track(upstream);
    upstream.once("close", () => client.destroy());
    client.once("close", () => upstream.destroy());
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((resolve, reject) => {
    proxy.once("error", reject);
    proxy.listen(0, "127.0.0.1", resolve);
  });
  const { port } = proxy.address();
  return {
    port,
    httpUrl: `http://127.0.0.1:${port}`,
    cut() {
      down = true;
      for (const socket of sockets) socket.destroy();
    },
    restore() {
      down = false;
    },
    async stop() {
      down = true;
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => proxy.close(() => resolve()));
    },
  };
}

/** The stored messages of `conv` (oldest first), read from the history API with `token`. */
async function stored(srv, conv, token) {
  const all = [];
  let before = null;
  do {
    const query = before ? `before=${before}&limit=200` : "limit=200";
    const res = await fetch(`${srv.httpUrl}/api/conversations/${conv}/messages?${query}`, {
      headers: { authorization: `Bearer ${token}` },
      signal: AbortSignal.timeout(WAIT),
    });
    const body = await res.json();
    assert.equal(res.status, 200, JSON.stringify(body));
    all.unshift(...body.messages);
    before = body.next_before;
  } while (before);
  return all;
}

/** Records the page's finished history requests (install with `prepare`, before it loads). */
function watchHistory(page) {
  const done = new Recorder("finished history requests");
  page.on("requestfinished", (r) => r.url().includes("/api/conversations/") && done.push(r.url()));
  page.on("requestfailed", (r) => r.url().includes("/api/conversations/") && done.push(`failed: ${r.url()}`));
  return done;
}

/** The page shows exactly the stored list of `conv`: same ids, same texts, same order. */
async function assertShowsStored(page, srv, conv, token) {
  const db = await stored(srv, conv, token);
  const shown = await page.$$eval("#timeline .msg", (els) =>
    els.map((e) => ({ id: e.dataset.id, text: e.querySelector(".text").textContent })),
  );
  assert.deepEqual(shown, db.map((m) => ({ id: m.id, text: m.content.text })), "the page shows the stored list");
}

/** Bob: the phoenix client in node, joined to `conv` on `srv` directly (not through the proxy). */
async function openBob(srv, conv) {
  const clients = new Clients(srv);
  const bob = await clients.open();
  const joined = await joinChannel(bob.socket, `chat:${conv}`);
  assert.equal(joined.status, "ok", JSON.stringify(joined.response));
  return {
    token: bob.token,
    async say(body) {
      const reply = await push(joined.channel, "new_msg", { body });
      assert.equal(reply.status, "ok", `${body}: ${JSON.stringify(reply.response)}`);
      return reply.response;
    },
    close: () => clients.closeAll(),
  };
}

/** Sends `body` the way a person does: types it key by key into the composer, then Enter. */
async function send(page, body) {
  await page.locator("#body").pressSequentially(body);
  await page.keyboard.press("Enter");
}

test("two users chat in the browser: presence, messages both ways, history on reload, leave", async () => {
  const conv = randomUUID();
  const ann = await openUser(conv);
  const bob = await openUser(conv);

  // Presence: both see both, one socket each.
  await waitForOnline(ann.page, 2);
  await waitForOnline(bob.page, 2);
  assert.deepEqual((await online(ann.page)).sort(), (await online(bob.page)).sort());
  assert.equal(await ann.page.textContent("#presence li .count"), "1 tab");

  // Messages both ways, in order on both sides.
  await send(ann.page, "hello from ann");
  await waitForTexts(bob.page, ["hello from ann"]);
  await send(bob.page, "hi ann, bob here");
  await send(bob.page, "second from bob");
  const all = ["hello from ann", "hi ann, bob here", "second from bob"];
  await waitForTexts(ann.page, all);
  await waitForTexts(bob.page, all);
  const mine = await ann.page.$$eval("#timeline .msg.mine .text", (els) => els.map((e) => e.textContent));
  assert.deepEqual(mine, ["hello from ann"]);

  // Reload: the same user (token kept in the tab), history from the API, each message once.
  await bob.page.reload();
  await bob.page.waitForSelector("#status-text:text('connected')", { timeout: WAIT });
  await waitForTexts(bob.page, all);
  await waitForOnline(ann.page, 2);
  await send(ann.page, "after bob's reload");
  await waitForTexts(bob.page, [...all, "after bob's reload"]);
  assert.deepEqual(await texts(bob.page), [...all, "after bob's reload"], "no duplicates after the reload");

  mkdirSync(ARTIFACTS, { recursive: true });
  await ann.page.screenshot({ path: join(ARTIFACTS, "chat.png") });

  // Bob leaves: he disappears from Ann's list.
  await bob.context.close();
  await waitForOnline(ann.page, 1);
  assert.deepEqual(ann.errors, [], "no page errors");
  await ann.context.close();
});

test("quick successive sends from one page all go out, in order, and the composer keeps every keystroke", async () => {
  const conv = randomUUID();
  const ann = await openUser(conv);
  const bob = await openUser(conv);
  // Type, Enter, type, Enter... without waiting for any acknowledgement in between: each
  // message is typed while the previous ones are still in flight.
  const burst = Array.from({ length: 8 }, (_, i) => `quick ${i + 1} from ann`);
  for (const body of burst) await send(ann.page, body);
  // The last message is typed but not sent yet: nothing may wipe it while acks come back.
  await ann.page.locator("#body").pressSequentially("still typing");
  await waitForTexts(bob.page, burst);
  await waitForTexts(ann.page, burst);
  await ann.page.waitForFunction(() => document.querySelectorAll("#outbox .outgoing").length === 0, null, {
    timeout: WAIT,
  });
  assert.equal(await ann.page.inputValue("#body"), "still typing");
  await ann.page.keyboard.press("Enter");
  await waitForTexts(bob.page, [...burst, "still typing"]);
  assert.equal(await ann.page.inputValue("#body"), "");
  assert.deepEqual([...ann.errors, ...bob.errors], [], "no page errors");
  await ann.context.close();
  await bob.context.close();
});

test("a live message that arrives while history is loading is shown in id order, each message once", async () => {
  const conv = randomUUID();
  const bob = await openUser(conv);
  await send(bob.page, "older 1");
  await send(bob.page, "older 2");
  await waitForTexts(bob.page, ["older 1", "older 2"]);

  // Ann's history request is held until a live message has reached her page.
  let release;
  const held = new Promise((resolve) => {
    release = resolve;
  });
  let historyRequested;
  const requested = new Promise((resolve) => {
    historyRequested = resolve;
  });
  const ann = await openUser(conv, {
    prepare: (page) =>
      page.route("**/api/conversations/**", async (route) => {
        historyRequested();
        await held;
        await route.continue();
      }),
  });
  await requested;
  await send(bob.page, "live while loading");
  await waitForTexts(ann.page, ["live while loading"]);
  release();
  // The history page also holds "live while loading" (it was committed first): shown once.
  await waitForTexts(ann.page, ["older 1", "older 2", "live while loading"]);
  await send(bob.page, "after history");
  await waitForTexts(ann.page, ["older 1", "older 2", "live while loading", "after history"]);
  const ids = await ann.page.$$eval("#timeline .msg", (els) => els.map((e) => e.dataset.id));
  assert.deepEqual(ids, [...ids].sort(), "timeline in id order");
  assert.equal(new Set(ids).size, ids.length, "each message once");
  assert.deepEqual([...ann.errors, ...bob.errors], [], "no page errors");
  await ann.context.close();
  await bob.context.close();
});

test("a refused message stays visible with its reason and goes out when sent again", async () => {
  // A real, transient refusal: a server allowing 2 messages per second per socket. Six
  // messages sent in one go (one page task, so they reach the server together) cannot all
  // pass; the refused ones wait in the outbox with the server's reason.
  const strict = await startServer({ workers: 2, env: { NEXUS_DEV_TOKENS: "1", NEXUS_MSG_RATE: "2" } });
  try {
    const conv = randomUUID();
    const ann = await openUser(conv, { srv: strict });
    const bodies = Array.from({ length: 6 }, (_, i) => `burst ${i + 1}`);
    await ann.page.evaluate((all) => {
      const box = document.getElementById("body");
      for (const body of all) {
        box.value = body;
        box.dispatchEvent(new KeyboardEvent("keydown", { key: "Enter", bubbles: true }));
      }
    }, bodies);
    assert.equal(await ann.page.inputValue("#body"), "", "the composer is cleared when a message is sent");
    await ann.page.waitForFunction(
      () => document.querySelectorAll("#outbox .outgoing:not(.failed)").length === 0,
      null,
      { timeout: WAIT },
    );
    const failed = await ann.page.$$eval("#outbox .outgoing.failed", (els) =>
      els.map((e) => [e.querySelector(".text").textContent, e.querySelector(".why").textContent]),
    );
    assert.ok(failed.length >= 3, `at most 2 (+ refill) of 6 pass at 2/s: ${JSON.stringify(failed)}`);
    for (const [, why] of failed) assert.match(why, /^not sent: rate limited/);
    const passed = await texts(ann.page);
    assert.deepEqual(
      [...passed, ...failed.map(([text]) => text)].sort(),
      [...bodies].sort(),
      "every message is either shown or waiting to be sent again",
    );

    // Send each again until it goes through. A resend that comes before the bucket refilled
    // (one message per 500 ms at 2/s) is refused again and stays, as a user would see it;
    // then the next try waits out that refill period (the limit is about time, so here
    // waiting for time is the behaviour under test, not synchronisation).
    const deadline = Date.now() + 2 * WAIT;
    while ((await ann.page.locator("#outbox .outgoing").count()) > 0) {
      assert.ok(Date.now() < deadline, "resends did not get through");
      const first = ann.page.locator("#outbox .outgoing").first();
      const text = await first.locator(".text").textContent();
      await first.locator("button.resend").click();
      const refused = await ann.page.waitForFunction(
        (t) => {
          const el = [...document.querySelectorAll("#outbox .outgoing")].find((e) => e.querySelector(".text").textContent === t);
          return el ? el.classList.contains("failed") && "refused" : "sent";
        },
        text,
        { timeout: WAIT },
      );
      if ((await refused.jsonValue()) === "refused") await ann.page.waitForTimeout(500);
    }
    const shown = await texts(ann.page);
    assert.deepEqual([...shown].sort(), [...bodies].sort(), "every message shown exactly once");
    assert.deepEqual(ann.errors, [], "no page errors");
    await ann.context.close();
  } finally {
    await strict.stop();
  }
});

test("the page loses its connection while another user sends: it rejoins and recovers the missed messages", BOUNDED, async () => {
  const conv = randomUUID();
  const proxy = await startProxy(server);
  const bob = await openBob(server, conv);
  try {
    let history;
    const sockets = [];
    const ann = await openUser(conv, {
      srv: proxy,
      prepare: (page) => {
        history = watchHistory(page);
        page.on("websocket", (ws) => sockets.push(ws.url()));
      },
    });
    const before = ["before 1", "before 2", "before 3"];
    for (const body of before) await bob.say(body);
    await waitForTexts(ann.page, before);
    assert.deepEqual(await history.waitForCount(1), [`${proxy.httpUrl}/api/conversations/${conv}/messages?limit=50`]);

    // Cut: the page sees its socket close and cannot get back while Bob sends.
    proxy.cut();
    await waitForStatus(ann.page, /^reconnecting$/);
    const away = ["while away 1", "while away 2", "while away 3", "while away 4"];
    for (const body of away) await bob.say(body);
    const requests = [];
    ann.page.on("request", (r) => requests.push(r.url()));

    // Back: phoenix.js reconnects and rejoins by itself; the server pushes the 4 missed ones.
    proxy.restore();
    await waitForStatus(ann.page, /^reconnected, 4 missed messages recovered$/);
    await waitForTexts(ann.page, [...before, ...away]);
    await bob.say("after the rejoin");
    await waitForTexts(ann.page, [...before, ...away, "after the rejoin"]);
    await assertShowsStored(ann.page, server, conv, bob.token);
    assert.ok(sockets.length >= 2, `a new WebSocket was opened: ${JSON.stringify(sockets)}`);
    assert.deepEqual(requests.filter((u) => u.includes("/api/")), [], "a recovered rejoin reads no history");
    assert.deepEqual(ann.errors, [], "no page errors");
    await ann.context.close();
  } finally {
    await bob.close();
    await proxy.stop();
  }
});

test("messages keep coming while the page is cut and rejoins: each shown once, in order", BOUNDED, async () => {
  const conv = randomUUID();
  const proxy = await startProxy(server);
  const bob = await openBob(server, conv);
  let stop = false;
  let sending = null;
  try {
    let history;
    const ann = await openUser(conv, { srv: proxy, prepare: (page) => (history = watchHistory(page)) });
    await history.waitForCount(1);
    // Bob sends for the whole test, one message every 20 ms or so (each after the previous
    // one's ack; the pause only paces the traffic, nothing waits on it): before the cut, while
    // the page is away, while it rejoins and recovers, and after.
    const sent = new Recorder("Bob's acknowledged messages");
    sending = (async () => {
      for (let i = 1; !stop; i++) {
        await bob.say(`stream ${i}`);
        sent.push(`stream ${i}`);
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    })();
    const shown = () => ann.page.$$eval("#timeline .msg", (els) => els.length);
    await ann.page.waitForFunction(() => document.querySelectorAll("#timeline .msg").length >= 5, null, { timeout: WAIT });
    proxy.cut();
    await waitForStatus(ann.page, /^reconnecting$/);
    const atCut = sent.items.length;
    await sent.until((items) => items.length >= atCut + 10, WAIT, "10 messages sent while the page is away");
    proxy.restore();
    await waitForStatus(ann.page, /^reconnected, \d+ missed messages recovered$/);
    const missed = Number((await ann.page.textContent("#status-text")).match(/\d+/)[0]);
    assert.ok(missed >= 10, `at least the 10 sent while the page was away were missed: ${missed}`);
    const atRejoin = await shown();
    await ann.page.waitForFunction((n) => document.querySelectorAll("#timeline .msg").length >= n + 10, atRejoin, {
      timeout: WAIT,
    });
    stop = true;
    await sending;
    await waitForTexts(ann.page, sent.items);
    await assertShowsStored(ann.page, server, conv, bob.token);
    assert.deepEqual(ann.errors, [], "no page errors");
    await ann.context.close();
  } finally {
    stop = true;
    await sending?.catch(() => {});
    await bob.close();
    await proxy.stop();
  }
});

test("past NEXUS_RECOVERY_MAX the rejoin does not recover: the page fills the gap from the history", BOUNDED, async () => {
  const small = await startServer({ workers: 2, env: { NEXUS_DEV_TOKENS: "1", NEXUS_RECOVERY_MAX: "2" } });
  const conv = randomUUID();
  const proxy = await startProxy(small);
  const bob = await openBob(small, conv);
  try {
    // The page's history requests go through when `hold` is null, else wait for it.
    let hold = null;
    let history;
    const held = new Recorder("held history requests");
    const ann = await openUser(conv, {
      srv: proxy,
      prepare: (page) => {
        history = watchHistory(page);
        return page.route("**/api/conversations/**", async (route) => {
          if (hold) {
            held.push(route.request().url());
            await hold;
          }
          await route.continue();
        });
      },
    });
    const before = ["before 1", "before 2", "before 3"];
    for (const body of before) await bob.say(body);
    await waitForTexts(ann.page, before);
    await history.waitForCount(1);

    proxy.cut();
    await waitForStatus(ann.page, /^reconnecting$/);
    let release;
    hold = new Promise((resolve) => {
      release = resolve;
    });
    // 60 missed: more than the server recovers (2), and more than one history page (50).
    const away = Array.from({ length: 60 }, (_, i) => `away ${i + 1}`);
    for (const body of away) await bob.say(body);
    proxy.restore();

    // The rejoin answers recovered: false; the page starts paging the history back and, while
    // that request is held, a live message arrives: it is shown at once, after the 3 old ones.
    await held.waitForCount(1, WAIT);
    await waitForStatus(ann.page, /^reconnected, loading missed messages…$/);
    await bob.say("live during the fill");
    await waitForTexts(ann.page, [...before, "live during the fill"]);
    release();
    await waitForStatus(ann.page, /^reconnected, 60 missed messages loaded from history$/);
    await waitForTexts(ann.page, [...before, ...away, "live during the fill"]);
    assert.ok(held.items.length >= 2, `more than one page: ${JSON.stringify(held.items)}`);
    // The fill started at the reply, before any live message: from the newest page back.
    assert.doesNotMatch(held.items[0], /[?&]before=/);
    assert.ok(held.items.slice(1).every((u) => /[?&]before=/.test(u)), `paged back: ${JSON.stringify(held.items)}`);

    await bob.say("after the fill");
    const all = [...before, ...away, "live during the fill", "after the fill"];
    await waitForTexts(ann.page, all);
    await assertShowsStored(ann.page, small, conv, bob.token);
    assert.deepEqual(ann.errors, [], "no page errors");
    await ann.context.close();
  } finally {
    await bob.close();
    await proxy.stop();
    await small.stop();
  }
});

test("a refused join shows its reason, and a removal by the app backend shows on the page", BOUNDED, async () => {
  const key = "browser-test-api-key-0123456789";
  const strict = await startServer({
    workers: 2,
    env: { NEXUS_DEV_TOKENS: "1", NEXUS_JOIN_POLICY: "token", NEXUS_API_KEY: key },
  });
  const open = await startServer({ workers: 2, env: { NEXUS_DEV_TOKENS: "1", NEXUS_API_KEY: key } });
  try {
    // Under the token policy a dev token grants nothing: the page says why it is not in.
    const context = await browser.newContext();
    const page = await context.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(`${strict.httpUrl}/#${randomUUID()}`);
    await page.click("#dev-token");
    await waitForStatus(page, /^join refused: unauthorized$/);
    await page.waitForSelector("#timeline .notice:text('could not join: unauthorized')", { timeout: WAIT });
    await context.close();

    // Under open, the backend removes the member: the page says so.
    const conv = randomUUID();
    const ann = await openUser(conv, { srv: open });
    await waitForOnline(ann.page, 1);
    const [user] = await online(ann.page);
    const res = await fetch(`${open.httpUrl}/api/conversations/${conv}/members/${user}`, {
      method: "DELETE",
      headers: { authorization: `Bearer ${key}` },
    });
    assert.equal(res.status, 204);
    await waitForStatus(ann.page, /^removed from this conversation$/);
    assert.deepEqual([...errors, ...ann.errors], [], "no page errors");
    await ann.context.close();
  } finally {
    await strict.stop();
    await open.stop();
  }
});
