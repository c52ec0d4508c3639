// The demo page in a real browser (issue 7): headless Debian Chromium driven by playwright-core.
// Two browser contexts are two users on one conversation: they see each other in the presence
// list, exchange messages both ways in order, one reloads and sees the history once (no
// duplicates), one leaves and disappears from the other's list. A screenshot of the page is
// saved to tests/js/artifacts/chat.png (look at it).
//
// Needs /usr/bin/chromium (tests/run.sh installs it with apt-get when missing); skipped with a
// message if it is absent, so `node --test` alone still runs everything else.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import { randomUUID } from "node:crypto";
import { join } from "node:path";

import { REPO_ROOT, startServer } from "./helpers.js";

const CHROMIUM = process.env.NEXUS_CHROMIUM || "/usr/bin/chromium";
const ARTIFACTS = join(REPO_ROOT, "tests", "js", "artifacts");
const WAIT = 10_000;

let server;
let browser;
before(async () => {
  if (!existsSync(CHROMIUM)) return;
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

/** A new browser user on the page of conversation `conv`, signed in with a dev token. */
async function openUser(conv) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(`${server.httpUrl}/#${conv}`);
  await page.click("#dev-token");
  await page.waitForSelector("#status-text:text('connected')", { timeout: WAIT });
  return { context, page, errors };
}

const texts = (page) => page.$$eval("#timeline .msg .text", (els) => els.map((e) => e.textContent));
const online = (page) => page.$$eval("#presence li", (els) => els.map((e) => e.dataset.user));

async function waitForTexts(page, expected) {
  await page.waitForFunction(
    (want) => {
      const got = [...document.querySelectorAll("#timeline .msg .text")].map((e) => e.textContent);
      return JSON.stringify(got) === JSON.stringify(want);
    },
    expected,
    { timeout: WAIT },
  );
}

async function waitForOnline(page, n) {
  await page.waitForFunction((count) => document.querySelectorAll("#presence li").length === count, n, {
    timeout: WAIT,
  });
}

async function send(page, body) {
  await page.fill("#body", body);
  await page.press("#body", "Enter");
}

test("two users chat in the browser: presence, messages both ways, history on reload, leave", {
  skip: existsSync(CHROMIUM) ? false : `no Chromium at ${CHROMIUM} (tests/run.sh installs it)`,
}, async () => {
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
