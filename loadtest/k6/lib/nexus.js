// Shared helpers for the Nexus k6 scripts: env knobs, HS256 tokens, topics, and a minimal
// Phoenix Channels V2 client on top of k6's browser-like WebSocket.
//
// Env read here (every script): NEXUS_URL (default ws://127.0.0.1:4000), JWT_SECRET (required),
// NEXUS_ALLOW_REMOTE (set to 1 to target a host outside 127.0.0.0/8, localhost or [::1]).

import { WebSocket } from "k6/experimental/websockets";
import crypto from "k6/crypto";
import encoding from "k6/encoding";
import { check } from "k6";
import { Counter, Trend } from "k6/metrics";

// ---------------------------------------------------------------------------------------------
// Env

/** A non-negative number from env `name`, or `def`; anything else stops the run at init. */
export function envNum(name, def) {
  const raw = __ENV[name];
  if (raw === undefined || raw === "") return def;
  const n = Number(raw);
  if (!Number.isFinite(n) || n < 0) throw new Error(`${name}=${raw}: expected a non-negative number`);
  return n;
}

/** A positive integer from env `name`, or `def`. */
export function envInt(name, def) {
  const n = envNum(name, def);
  if (!Number.isInteger(n) || n < 1) throw new Error(`${name}=${__ENV[name]}: expected a positive integer`);
  return n;
}

export const NEXUS_URL = (__ENV.NEXUS_URL || "ws://127.0.0.1:4000").replace(/\/+$/, "");

const LOOPBACK_RE = /^wss?:\/\/(localhost|127\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[::1\])(:\d+)?$/i;
if (!LOOPBACK_RE.test(NEXUS_URL) && __ENV.NEXUS_ALLOW_REMOTE !== "1") {
  throw new Error(
    `NEXUS_URL=${NEXUS_URL}: these scripts target loopback (ws://127.0.0.1:PORT) by default; ` +
      `set NEXUS_ALLOW_REMOTE=1 to load a host you own elsewhere`,
  );
}

export function jwtSecret() {
  const secret = __ENV.JWT_SECRET;
  if (!secret) throw new Error("JWT_SECRET is required (the server's HS256 secret)");
  return secret;
}

// ---------------------------------------------------------------------------------------------
// Ids and tokens

/** A random version-4 UUID, canonical lower-case form. */
export function uuidv4() {
  const b = new Uint8Array(crypto.randomBytes(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  let hex = "";
  for (let i = 0; i < 16; i++) hex += (b[i] < 16 ? "0" : "") + b[i].toString(16);
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** `n` fresh `chat:<uuid>` topics (call it in setup() so every VU gets the same list). */
export function makeTopics(n) {
  const topics = [];
  for (let i = 0; i < n; i++) topics.push(`chat:${uuidv4()}`);
  return topics;
}

const b64url = (s) => encoding.b64encode(s, "rawurl");

/** An HS256 JWT `{sub, iat, exp}` signed with `secret`, valid for `ttlSecs`. */
export function mintToken(secret, sub, ttlSecs = 3600) {
  const now = Math.floor(Date.now() / 1000);
  const input = `${b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }))}.${b64url(
    JSON.stringify({ sub, iat: now, exp: now + ttlSecs }),
  )}`;
  return `${input}.${crypto.hmac("sha256", secret, input, "base64rawurl")}`;
}

/** The V2 socket URL with the token in the query. */
export function socketUrl(token) {
  return `${NEXUS_URL}/socket/websocket?vsn=2.0.0&token=${encodeURIComponent(token)}`;
}

// ---------------------------------------------------------------------------------------------
// Metrics shared by the scripts

/** Anything the server should never do: error replies, phx_error, unexpected close, bad frames,
 *  replies that never came. Every script has the threshold `nexus_errors: count==0`. */
export const errors = new Counter("nexus_errors");
/** phx_join sent → its phx_reply (ms; Date.now() resolution). */
export const joinLatency = new Trend("nexus_join_latency", true);
/** WebSocket constructed → open (TCP connect + HTTP upgrade, ms). */
export const connectLatency = new Trend("nexus_connect_latency", true);
/** heartbeat sent → its phx_reply (ms). */
export const heartbeatLatency = new Trend("nexus_heartbeat_latency", true);

/** Records one error and logs the first few of each VU (a failing run says why). */
let loggedErrors = 0;
export function fail(what) {
  errors.add(1);
  if (loggedErrors++ < 3) console.warn(`nexus error: ${what}`);
}

// ---------------------------------------------------------------------------------------------
// Phoenix V2 connection

/**
 * One socket speaking Phoenix V2: `[join_ref, ref, topic, event, payload]`.
 * Handlers: `open()` runs once connected; `event(topic, event, payload, joinRef)` gets every
 * frame that is not a reply; `done()` runs once when the socket is finished, whatever the cause
 * (timers made with `conn.setTimeout`/`conn.setInterval` are cleared then, so the iteration
 * ends). `heartbeat: secs` sends a Phoenix heartbeat that often and checks each reply.
 * Replies go to the callback given with the push. Every error the server may show (error event,
 * a close this side did not ask for, a non-JSON or wrong-shaped frame, a reply nobody waits for,
 * an error reply, `phx_error`) is counted in `nexus_errors`.
 */
export class PhoenixConn {
  constructor(url, handlers = {}) {
    this.handlers = handlers;
    this.timers = [];
    this.nextRef = 0;
    this.pending = new Map(); // ref -> {t0, what, cb}
    this.closing = false;
    this.closed = false;
    this.opened = false;
    const t0 = Date.now();
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.onopen = () => {
      this.opened = true;
      connectLatency.add(Date.now() - t0);
      const beat = this.handlers.heartbeat || 0;
      if (beat > 0) {
        this.setInterval(() => {
          this.push("phoenix", "heartbeat", {}, null, (ok, _payload, ms) => {
            heartbeatLatency.add(ms);
            check(ok, { "heartbeat replied ok": (v) => v });
          });
        }, beat * 1000);
      }
      if (this.handlers.open) this.handlers.open();
    };
    ws.onmessage = (e) => this.onFrame(e.data);
    ws.onerror = (e) => {
      if (this.closing || this.dead) return;
      this.dead = true;
      fail(`websocket error${this.opened ? "" : " before open"}: ${(e && e.error) || JSON.stringify(e)}`);
      this.abandon();
    };
    ws.onclose = () => {
      this.closed = true;
      if (!this.closing && !this.dead) fail("server closed the socket (k6's close event carries no code; see the server log)");
      this.abandon();
    };
  }

  onFrame(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch (_) {
      fail(`non-JSON frame: ${String(data).slice(0, 200)}`);
      return;
    }
    if (!Array.isArray(msg) || msg.length !== 5) {
      fail(`frame is not a V2 array of 5: ${String(data).slice(0, 200)}`);
      return;
    }
    const [joinRef, ref, topic, event, payload] = msg;
    if (event === "phx_reply") {
      const p = ref === null ? undefined : this.pending.get(ref);
      if (!p) {
        fail(`reply to unknown ref ${ref}: ${String(data).slice(0, 200)}`);
        return;
      }
      this.pending.delete(ref);
      const ok = payload && payload.status === "ok";
      if (!ok) fail(`${p.what} on ${topic} answered ${JSON.stringify(payload)}`);
      if (p.cb) p.cb(ok, payload, Date.now() - p.t0);
      if (this.closing && this.pending.size === 0) this.closeNow();
      return;
    }
    if (event === "phx_error") fail(`phx_error on ${topic}`);
    if (event === "phx_close" && !this.closing) fail(`unexpected phx_close on ${topic}`);
    if (this.handlers.event) this.handlers.event(topic, event, payload, joinRef);
  }

  /** Sends one frame and remembers its ref; `cb(ok, payload, latencyMs)` gets the reply. */
  push(topic, event, payload, joinRef, cb) {
    if (this.closed || this.closing) return null;
    const ref = String(++this.nextRef);
    this.pending.set(ref, { t0: Date.now(), what: event, cb });
    this.ws.send(JSON.stringify([joinRef === undefined ? null : joinRef, ref, topic, event, payload]));
    return ref;
  }

  /** `phx_join` (join_ref = ref); `cb(ok, payload, ms, joinRef)`; latency goes to nexus_join_latency. */
  join(topic, cb) {
    const ref = String(this.nextRef + 1);
    return this.push(topic, "phx_join", {}, ref, (ok, payload, ms) => {
      joinLatency.add(ms);
      if (cb) cb(ok, payload, ms, ref);
    });
  }

  /** setTimeout that is cleared when the connection is done. */
  setTimeout(fn, ms) {
    const id = setTimeout(fn, ms);
    this.timers.push(() => clearTimeout(id));
    return id;
  }

  /** setInterval that is cleared when the connection is done (or finishing). */
  setInterval(fn, ms) {
    const id = setInterval(fn, ms);
    this.timers.push(() => clearInterval(id));
    return id;
  }

  clearTimers() {
    for (const clear of this.timers) clear();
    this.timers = [];
  }

  /**
   * Stops the socket once every reply it waits for came, or after `graceMs`; replies still
   * missing then count as errors.
   */
  finish(graceMs = 2000) {
    if (this.closing || this.closed) return;
    this.closing = true;
    this.clearTimers();
    if (this.pending.size === 0) {
      this.closeNow();
      return;
    }
    this.graceTimer = setTimeout(() => {
      const n = this.pending.size;
      if (n > 0) {
        fail(`${n} repl${n === 1 ? "y" : "ies"} missing after ${graceMs} ms (${[...this.pending.values()]
          .map((p) => p.what)
          .slice(0, 5)
          .join(", ")})`);
      }
      this.closeNow();
    }, graceMs);
  }

  closeNow() {
    this.closing = true;
    if (this.graceTimer) clearTimeout(this.graceTimer);
    this.graceTimer = null;
    if (!this.closed) {
      this.closed = true;
      try {
        this.ws.close();
      } catch (_) {
        // already closing
      }
    }
    this.abandon();
  }

  /** Runs the script's cleanup hook once (clears its timers so the iteration can end). */
  abandon() {
    if (this.abandoned) return;
    this.abandoned = true;
    if (this.graceTimer) clearTimeout(this.graceTimer);
    this.clearTimers();
    if (this.handlers.done) this.handlers.done();
  }
}
