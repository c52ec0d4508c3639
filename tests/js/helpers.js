// Test helpers for the Nexus JavaScript integration suite.
//
// Everything here talks to the real server binary over real sockets, through the official
// `phoenix` npm client running on the `ws` package. Waiting is always "wait for the event
// you expect, with a timeout": a timeout is only a failure bound, never synchronization.

import { spawn } from "node:child_process";
import { createHmac, randomUUID } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { Socket } from "phoenix";
import WebSocket from "ws";

const HERE = dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = resolve(HERE, "..", "..");
export const NEXUS_BIN = process.env.NEXUS_BIN
  ? resolve(process.env.NEXUS_BIN)
  : join(REPO_ROOT, "target", "debug", "nexus");

/** 48 bytes: comfortably above the 32-byte minimum for an HS256 key. */
export const TEST_SECRET = "nexus-js-integration-test-secret-0123456789abcdef";

/** Bound for the server to print its `listening on` line (the box may be busy compiling). */
const SERVER_START_TIMEOUT_MS = Number(process.env.NEXUS_START_TIMEOUT_MS || 10_000);
/** Default bound for waiting on one expected frame/event. */
export const WAIT_TIMEOUT_MS = 5_000;
/** Phoenix push timeout used by the helpers: a missing reply fails fast. */
export const PUSH_TIMEOUT_MS = 5_000;

const LISTENING_RE = /listening on [^\s]+:(\d+)/;
// tracing colours its output only on a TTY, but strip escapes in case a build forces ANSI.
// eslint-disable-next-line no-control-regex
const ANSI_RE = /\x1b\[[0-9;]*m/g;

export const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
export const UUID_V7_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/i;
export const INSERTED_AT_RE = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$/;

// ---------------------------------------------------------------------------------------------
// Timeouts

/** Rejects with `what` (and optional `detail()`) if `promise` does not settle in `timeoutMs`. */
export function withTimeout(promise, timeoutMs, what, detail = () => "") {
  let timer;
  const bound = new Promise((_, reject) => {
    timer = setTimeout(() => {
      const extra = detail();
      reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}${extra ? `\n${extra}` : ""}`));
    }, timeoutMs);
  });
  return Promise.race([promise, bound]).finally(() => clearTimeout(timer));
}

/**
 * Records items pushed by an event source and lets tests wait for a condition over them.
 * `until(cond)` re-evaluates `cond(items)` on every new item and resolves with its first truthy
 * result; past items count, so there is no race between "subscribe" and "wait".
 */
export class Recorder {
  constructor(name = "events") {
    this.name = name;
    this.items = [];
    this.waiters = new Set();
  }

  push(item) {
    this.items.push(item);
    for (const waiter of [...this.waiters]) waiter();
  }

  /** Resolves with the first truthy `cond(items)`; rejects after `timeoutMs`. */
  until(cond, timeoutMs = WAIT_TIMEOUT_MS, what = "a condition") {
    let check;
    const done = new Promise((resolvePromise) => {
      check = () => {
        const result = cond(this.items);
        if (result) {
          this.waiters.delete(check);
          resolvePromise(result);
        }
      };
      this.waiters.add(check);
      check();
    });
    return withTimeout(done, timeoutMs, `${what} on ${this.name}`, () =>
      `${this.name} recorded ${this.items.length} item(s): ${preview(this.items)}`,
    ).finally(() => this.waiters.delete(check));
  }

  /** Resolves with the first recorded item matching `pred`. */
  waitFor(pred, timeoutMs = WAIT_TIMEOUT_MS, what = "a matching item") {
    return this.until((items) => items.find(pred), timeoutMs, what);
  }

  /** Resolves with the items once at least `n` were recorded. */
  waitForCount(n, timeoutMs = WAIT_TIMEOUT_MS) {
    return this.until((items) => items.length >= n && items, timeoutMs, `${n} item(s)`);
  }
}

function preview(items) {
  const text = JSON.stringify(items.slice(-5));
  return text.length > 800 ? `${text.slice(0, 800)}...` : text;
}

/**
 * Generic wait on an event source: `subscribe(resolve)` registers a listener that calls
 * `resolve(value)` when the expected event happens, and may return an unsubscribe function.
 */
export function waitFor(subscribe, timeoutMs = WAIT_TIMEOUT_MS, what = "an event") {
  let unsubscribe = () => {};
  const done = new Promise((resolvePromise) => {
    unsubscribe = subscribe(resolvePromise) || (() => {});
  });
  return withTimeout(done, timeoutMs, what).finally(() => unsubscribe());
}

// ---------------------------------------------------------------------------------------------
// Server

/**
 * Spawns the Nexus binary on an ephemeral port with its own database in a temp dir, and
 * resolves once it logs `listening on <addr>:<port>`.
 */
export async function startServer({ workers = 2, env = {} } = {}) {
  const dir = mkdtempSync(join(tmpdir(), "nexus-js-"));
  const child = spawn(NEXUS_BIN, [], {
    cwd: dir,
    env: {
      PATH: process.env.PATH,
      PORT: "0",
      NEXUS_BIND: "127.0.0.1",
      NEXUS_WORKERS: String(workers),
      JWT_SECRET: TEST_SECRET,
      DATABASE_PATH: join(dir, "nexus.db"),
      RUST_LOG: "info",
      ...env,
    },
    stdio: ["ignore", "pipe", "pipe"],
  });

  let stderr = "";
  let stdout = "";
  let exited = null;
  const exitPromise = new Promise((resolveExit) => {
    child.once("exit", (code, signal) => {
      exited = { code, signal };
      resolveExit(exited);
    });
    // A failed spawn (e.g. ENOENT) emits "error" and never "exit".
    child.once("error", () => {
      exited ??= { code: null, signal: null };
      resolveExit(exited);
    });
  });

  const port = await withTimeout(
    new Promise((resolvePort, rejectPort) => {
      const scan = () => {
        const m = (stderr + stdout).replace(ANSI_RE, "").match(LISTENING_RE);
        if (m) resolvePort(Number(m[1]));
      };
      child.stderr.setEncoding("utf8");
      child.stdout.setEncoding("utf8");
      child.stderr.on("data", (chunk) => {
        stderr += chunk;
        scan();
      });
      child.stdout.on("data", (chunk) => {
        stdout += chunk;
        scan();
      });
      child.once("error", (err) => rejectPort(new Error(`could not spawn ${NEXUS_BIN}: ${err.message}`)));
      exitPromise.then(({ code, signal }) =>
        rejectPort(
          new Error(
            `nexus exited (code ${code}, signal ${signal}) before logging "listening on"\n` +
              `--- stderr ---\n${stderr}\n--- stdout ---\n${stdout}`,
          ),
        ),
      );
    }),
    SERVER_START_TIMEOUT_MS,
    `nexus (${NEXUS_BIN}) to log "listening on <addr>:<port>"`,
    () => `--- stderr ---\n${stderr}\n--- stdout ---\n${stdout}`,
  ).catch(async (err) => {
    if (!exited) child.kill("SIGKILL");
    await exitPromise;
    rmSync(dir, { recursive: true, force: true });
    throw err;
  });

  return {
    port,
    url: `ws://127.0.0.1:${port}/socket`,
    httpUrl: `http://127.0.0.1:${port}`,
    secret: TEST_SECRET,
    pid: child.pid,
    stderr: () => stderr,
    stdout: () => stdout,
    async stop() {
      if (!exited) child.kill("SIGKILL");
      await exitPromise;
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Tokens

const HMAC_BY_ALG = { HS256: "sha256", HS384: "sha384", HS512: "sha512" };

/**
 * Mints a JWT with node's crypto. `sub` defaults to a random UUID; pass `sub: null` to omit it.
 * `exp`/`nbf` (seconds since the epoch) are included when given. `alg` goes in the header;
 * HS* are signed with that hash, `"none"` gets an empty signature, anything else is signed with
 * HS256 (a forged token). `header` adds header fields; `claims` adds/overrides claims.
 */
export function mintToken(secret, { sub, exp, nbf, alg = "HS256", header = {}, claims = {} } = {}) {
  const payload = {};
  const subject = sub === undefined ? randomUUID() : sub;
  if (subject !== null) payload.sub = subject;
  payload.iat = Math.floor(Date.now() / 1000);
  if (exp !== undefined) payload.exp = exp;
  if (nbf !== undefined) payload.nbf = nbf;
  Object.assign(payload, claims);

  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const signingInput = `${b64({ alg, typ: "JWT", ...header })}.${b64(payload)}`;
  const signature =
    alg === "none"
      ? ""
      : createHmac(HMAC_BY_ALG[alg] || "sha256", secret).update(signingInput).digest("base64url");
  return `${signingInput}.${signature}`;
}

/** Seconds since the epoch, for `exp`/`nbf`. */
export const nowSeconds = () => Math.floor(Date.now() / 1000);

// ---------------------------------------------------------------------------------------------
// Phoenix clients

/**
 * Opens phoenix Sockets against one server and disconnects all of them in `closeAll()`.
 * Sockets never auto-reconnect or auto-rejoin within a test's lifetime.
 */
export class Clients {
  constructor(server) {
    this.server = server;
    this.sockets = [];
  }

  /**
   * Creates a Socket (not yet connected). Options: `token` (sent as `params.token`; `null`
   * sends none), `authToken` (sent via Sec-WebSocket-Protocol), `sub` (used to mint a token if
   * neither is given), `socketOpts` (passed to the Socket constructor).
   * Returns `{socket, sub, token, messages}`; `messages` records every decoded frame received.
   */
  create({ token, authToken, sub, socketOpts = {} } = {}) {
    const userSub = sub || randomUUID();
    let userToken = token;
    if (userToken === undefined && authToken === undefined) {
      userToken = mintToken(this.server.secret, { sub: userSub, exp: nowSeconds() + 600 });
    }
    const opts = {
      transport: WebSocket,
      timeout: PUSH_TIMEOUT_MS,
      reconnectAfterMs: () => 60_000,
      rejoinAfterMs: () => 60_000,
      ...socketOpts,
    };
    if (userToken != null) opts.params = { token: userToken };
    if (authToken !== undefined) opts.authToken = authToken;

    const socket = new Socket(this.server.url, opts);
    const messages = new Recorder("socket frames");
    socket.onMessage((msg) => messages.push(msg));
    this.sockets.push(socket);
    return { socket, sub: userSub, token: userToken ?? authToken, messages };
  }

  /** Creates and connects a Socket; resolves once it is open, rejects on error/close first. */
  async open(opts = {}) {
    const client = this.create(opts);
    await connectSocket(client.socket);
    return client;
  }

  /** Disconnects every socket and cancels the client's pending timers. */
  async closeAll() {
    await Promise.all(this.sockets.map((socket) => disconnectSocket(socket)));
    this.sockets = [];
  }
}

/** Connects `socket` and resolves on open; rejects with the error if it errors or closes first. */
export function connectSocket(socket, timeoutMs = WAIT_TIMEOUT_MS) {
  const refs = [];
  const done = new Promise((resolveOpen, rejectOpen) => {
    refs.push(socket.onOpen(() => resolveOpen()));
    refs.push(socket.onError((err) => rejectOpen(new Error(`socket error before open: ${errorText(err)}`))));
    refs.push(socket.onClose((ev) => rejectOpen(new Error(`socket closed before open: code ${ev && ev.code}`))));
  });
  socket.connect();
  return withTimeout(done, timeoutMs, "the socket to open").finally(() => socket.off(refs));
}

/** Best-effort text for a ws ErrorEvent / Error. */
export function errorText(err) {
  if (!err) return String(err);
  return err.message || (err.error && err.error.message) || String(err);
}

/** Disconnects a phoenix Socket and makes sure nothing it owns keeps node alive. */
async function disconnectSocket(socket) {
  const transport = socket.conn;
  await withTimeout(
    new Promise((resolveClosed) => socket.disconnect(() => resolveClosed())),
    3_000,
    "socket.disconnect",
  ).catch(() => {});
  if (transport && typeof transport.terminate === "function" && transport.readyState !== WebSocket.CLOSED) {
    transport.terminate();
  }
  for (const channel of [...socket.channels]) {
    channel.rejoinTimer.reset();
    channel.joinPush.cancelTimeout();
    for (const push of channel.pushBuffer) push.cancelTimeout();
  }
}

// ---------------------------------------------------------------------------------------------
// Channels

/** Resolves with `{status, response}` of a Push: "ok", "error" or "timeout". */
export function pushResult(push, timeoutMs = PUSH_TIMEOUT_MS + 1_000) {
  return withTimeout(
    new Promise((resolveReply) => {
      push
        .receive("ok", (response) => resolveReply({ status: "ok", response }))
        .receive("error", (response) => resolveReply({ status: "error", response }))
        .receive("timeout", () => resolveReply({ status: "timeout", response: null }));
    }),
    timeoutMs,
    `a reply to ${push.event}`,
  );
}

/**
 * Creates `socket.channel(topic)`, records the given events on it, and joins.
 * Resolves with `{channel, status, response, events}` where `events[name]` is a Recorder.
 */
export async function joinChannel(socket, topic, { events = ["new_msg"], params = {} } = {}) {
  const channel = socket.channel(topic, params);
  const recorders = {};
  for (const event of events) {
    const recorder = new Recorder(`${topic} ${event}`);
    channel.on(event, (payload) => recorder.push(payload));
    recorders[event] = recorder;
  }
  const { status, response } = await pushResult(channel.join());
  return { channel, status, response, events: recorders };
}

/** Pushes `event` on `channel` and resolves with `{status, response}`. */
export function push(channel, event, payload) {
  return pushResult(channel.push(event, payload, PUSH_TIMEOUT_MS));
}

/** A fresh `chat:<uuid>` topic. */
export const chatTopic = () => `chat:${randomUUID()}`;
