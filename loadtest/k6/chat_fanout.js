// Chat fan-out: MEMBERS listening sockets and SENDERS sending sockets spread round robin over
// TOPICS `chat:<uuid>` topics. Once its topic's presence shows every socket of the topic (so all
// of them joined before the first message; at most 10 s), every sender sends exactly
// round(RATE * DURATION) `new_msg` `{"body": ...}` at RATE messages/s; the body carries the
// sender's index, a sequence number and the send time. Every socket (senders too: they are
// members of their topic) records each broadcast `new_msg`:
//   - end-to-end latency (send time in the body → broadcast received), nexus_e2e_latency;
//   - the shape {id, content: {text}, sender_id, inserted_at};
//   - order: inserted_at strictly increasing within a topic, each sender's sequence in order;
//   - loss: at the end every socket must have seen every message of every sender on its topic.
// Senders also record ack latency (push → phx_reply ok), nexus_ack_latency. Any error reply,
// phx_error, unexpected close, order violation or lost message counts in nexus_errors.
// Bounded: one iteration per VU; a socket stops once it has seen everything it expects, or
// 10 + DURATION + DRAIN seconds after the start at the latest.
//
// Env:
//   NEXUS_URL      ws://127.0.0.1:4000   server (loopback only unless NEXUS_ALLOW_REMOTE=1)
//   JWT_SECRET     (required)            the server's HS256 secret; tokens are minted here
//   MEMBERS        20                    listening sockets
//   SENDERS        4                     sending sockets (give every topic one: SENDERS >= TOPICS)
//   TOPICS         2                     topics
//   RATE           10                    new_msg per second per sender
//   DURATION       20                    seconds of sending
//   BODY_BYTES     64                    body length (at least the ~30-byte header)
//   DRAIN          10                    seconds after the window before missing messages are lost
//   HEARTBEAT      25                    seconds between heartbeats (0 = none)
//   ACK_P99_MS     250                   threshold: p(99) of new_msg → ok reply
//   E2E_P99_MS     250                   threshold: p(99) of send → broadcast received
//   JOIN_P99_MS    250                   threshold: p(99) of phx_join → reply
//
// Example:
//   JWT_SECRET=change-me-to-a-long-random-secret-0123456789 \
//     k6 run --no-usage-report -e MEMBERS=200 -e SENDERS=10 -e TOPICS=10 -e RATE=50 -e DURATION=30 loadtest/k6/chat_fanout.js

import { check } from "k6";
import exec from "k6/execution";
import { Counter, Trend } from "k6/metrics";

import { PhoenixConn, envInt, envNum, fail, jwtSecret, makeTopics, mintToken, socketUrl, uuidv4 } from "./lib/nexus.js";

const MEMBERS = envInt("MEMBERS", 20);
const SENDERS = envInt("SENDERS", 4);
const TOPICS = envInt("TOPICS", 2);
const RATE = envNum("RATE", 10);
const DURATION = envNum("DURATION", 20);
const BODY_BYTES = envInt("BODY_BYTES", 64);
const DRAIN = envNum("DRAIN", 10);
const HEARTBEAT = envNum("HEARTBEAT", 25);
const ACK_P99_MS = envNum("ACK_P99_MS", 250);
const E2E_P99_MS = envNum("E2E_P99_MS", 250);
const JOIN_P99_MS = envNum("JOIN_P99_MS", 250);
const SECRET = jwtSecret();
if (RATE <= 0) throw new Error("RATE must be > 0");

/** Messages each sender sends. */
const PER_SENDER = Math.max(1, Math.round(RATE * DURATION));
/** Longest a sender waits for every socket of its topic to be present before it sends (s). */
const BARRIER = 10;
/** Latest end of a socket, from the start of the test (seconds). */
const DEADLINE = BARRIER + DURATION + DRAIN;

const ackLatency = new Trend("nexus_ack_latency", true);
const e2eLatency = new Trend("nexus_e2e_latency", true);
const sentMsgs = new Counter("nexus_msgs_sent");
const ackedMsgs = new Counter("nexus_msgs_acked");
const deliveries = new Counter("nexus_deliveries");
const lostMsgs = new Counter("nexus_msgs_lost");

export const options = {
  scenarios: {
    members: {
      executor: "per-vu-iterations",
      exec: "member",
      vus: MEMBERS,
      iterations: 1,
      maxDuration: `${Math.ceil(DEADLINE + 30)}s`,
    },
    senders: {
      executor: "per-vu-iterations",
      exec: "sender",
      vus: SENDERS,
      iterations: 1,
      maxDuration: `${Math.ceil(DEADLINE + 30)}s`,
    },
  },
  thresholds: {
    checks: ["rate==1"],
    nexus_errors: ["count==0"],
    nexus_msgs_lost: ["count==0"],
    nexus_ack_latency: [`p(99)<${ACK_P99_MS}`],
    nexus_e2e_latency: [`p(99)<${E2E_P99_MS}`],
    nexus_join_latency: [`p(99)<${JOIN_P99_MS}`],
  },
};

export function setup() {
  return { topics: makeTopics(TOPICS), t0: Date.now() };
}

/** Sender indexes (0-based) that send on topic index `t`. */
function sendersOn(t) {
  const out = [];
  for (let j = t; j < SENDERS; j += TOPICS) out.push(j);
  return out;
}

/** Sockets (members and senders) on topic index `t`. */
function socketsOn(t) {
  let n = 0;
  for (let i = t; i < MEMBERS; i += TOPICS) n++;
  return n + sendersOn(t).length;
}

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const INSERTED_AT_RE = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$/;

/**
 * Opens one socket on topic index `t`, joins, and tracks every broadcast `new_msg`.
 * `role.onJoined(conn, joinRef, maybeFinish)` runs after the join reply; `role.idle()` says
 * whether the role has nothing left in flight (a sender: everything sent and acked); `role.self`
 * is the sender index of this socket (-1 for a member).
 */
function runSocket(data, t, role) {
  const topic = data.topics[t];
  const sub = uuidv4();
  const expectFrom = sendersOn(t);
  const expected = expectFrom.length * PER_SENDER;
  const lastSeq = {}; // sender index -> last sequence seen
  const count = {}; // sender index -> messages seen
  for (const j of expectFrom) {
    lastSeq[j] = 0;
    count[j] = 0;
  }
  let received = 0;
  let lastInsertedAt = "";
  let joined = false;
  let joinedAt = 0; // when the join reply came (ms)
  const present = {}; // phx_ref -> true: the topic's presence as this socket sees it
  let presentCount = 0;
  const addMetas = (side, sign) => {
    for (const user of Object.keys(side || {})) {
      for (const meta of (side[user] && side[user].metas) || []) {
        const had = present[meta.phx_ref] === true;
        if (sign > 0 && !had) {
          present[meta.phx_ref] = true;
          presentCount++;
        } else if (sign < 0 && had) {
          delete present[meta.phx_ref];
          presentCount--;
        }
      }
    }
  };

  const complete = () => received >= expected && role.idle();
  const maybeFinish = () => {
    if (joined && complete()) conn.finish(2000);
  };

  const conn = new PhoenixConn(socketUrl(mintToken(SECRET, sub, DEADLINE + 3600)), {
    heartbeat: HEARTBEAT,
    open() {
      conn.join(topic, (ok, _payload, _ms, joinRef) => {
        check(ok, { "join replied ok": (v) => v });
        if (!ok) {
          conn.finish(0);
          return;
        }
        joined = true;
        joinedAt = Date.now();
        role.onJoined(conn, joinRef, maybeFinish, () => presentCount, socketsOn(t));
        maybeFinish();
      });
      // Whatever happens, stop at the deadline (measured from the start of the test).
      conn.setTimeout(() => conn.finish(2000), Math.max(0, data.t0 + DEADLINE * 1000 - Date.now()));
    },
    event(gotTopic, event, payload) {
      if (event === "presence_state") {
        for (const ref of Object.keys(present)) delete present[ref];
        presentCount = 0;
        addMetas(payload, 1);
        return;
      }
      if (event === "presence_diff") {
        addMetas(payload && payload.joins, 1);
        addMetas(payload && payload.leaves, -1);
        return;
      }
      if (event !== "new_msg") return;
      const now = Date.now();
      deliveries.add(1);
      const text = payload && payload.content && payload.content.text;
      const wellFormed = check(payload, {
        "new_msg well-formed": (p) =>
          gotTopic === topic &&
          typeof p.id === "string" &&
          UUID_RE.test(p.id) &&
          typeof text === "string" &&
          typeof p.sender_id === "string" &&
          UUID_RE.test(p.sender_id) &&
          typeof p.inserted_at === "string" &&
          INSERTED_AT_RE.test(p.inserted_at),
      });
      if (!wellFormed) {
        fail(`malformed new_msg on ${gotTopic}: ${JSON.stringify(payload).slice(0, 300)}`);
        return;
      }
      // Fixed-width RFC 3339 timestamps compare as text.
      if (lastInsertedAt !== "" && !(payload.inserted_at > lastInsertedAt)) {
        fail(`inserted_at not increasing on ${topic}: ${payload.inserted_at} after ${lastInsertedAt}`);
      }
      lastInsertedAt = payload.inserted_at;
      // Body: "<sender>:<seq>:<sent ms>:<padding>"
      const parts = text.split(":");
      const j = Number(parts[0]);
      const seq = Number(parts[1]);
      const sentAt = Number(parts[2]);
      if (!(j in lastSeq) || !Number.isFinite(seq) || !Number.isFinite(sentAt)) {
        fail(`new_msg this run did not send on ${topic}: ${text.slice(0, 60)}`);
        return;
      }
      e2eLatency.add(now - sentAt);
      if (j === role.self) check(payload, { "own new_msg has sender_id = token sub": (p) => p.sender_id === sub });
      if (seq !== lastSeq[j] + 1) {
        fail(
          `sender ${j} on ${topic}: got seq ${seq} after ${lastSeq[j]} (order or loss); ` +
            `it was sent ${sentAt - joinedAt} ms after this socket's join reply`,
        );
      }
      if (seq > lastSeq[j]) lastSeq[j] = seq;
      count[j]++;
      received++;
      maybeFinish();
    },
    done() {
      let lost = 0;
      for (const j of expectFrom) lost += Math.max(0, PER_SENDER - count[j]);
      if (lost > 0 && conn.opened) {
        lostMsgs.add(lost);
        fail(`${lost} of ${expected} messages on ${topic} never arrived`);
      }
      check(conn, {
        connected: (c) => c.opened,
        "stayed connected": (c) => c.closing,
        "saw every message": () => lost === 0,
      });
    },
  });
}

export function member(data) {
  const i = exec.scenario.iterationInTest;
  runSocket(data, i % TOPICS, {
    self: -1,
    onJoined() {},
    idle: () => true,
  });
}

export function sender(data) {
  const j = exec.scenario.iterationInTest;
  let sent = 0;
  let acked = 0;
  const pad = "x".repeat(BODY_BYTES);
  runSocket(data, j % TOPICS, {
    self: j,
    onJoined(conn, joinRef, maybeFinish, presentCount, want) {
      // Barrier: send only once every socket of this topic shows in presence, so every one of
      // them joined before the first message and must receive all of them.
      const waitStart = Date.now();
      const poll = conn.setInterval(() => {
        const have = presentCount();
        const late = Date.now() - waitStart > BARRIER * 1000;
        if (have < want && !late) return;
        clearInterval(poll);
        if (have < want) fail(`only ${have} of ${want} sockets present on ${data.topics[j % TOPICS]} after ${BARRIER} s`);
        startSending(conn, joinRef, maybeFinish);
      }, 10);
    },
    idle: () => sent >= PER_SENDER && acked >= sent,
  });

  /** Sends PER_SENDER messages at RATE per second from now on. */
  function startSending(conn, joinRef, maybeFinish) {
    const start = Date.now();
    const tick = Math.max(10, Math.floor(1000 / RATE));
    let timer = null;
    const send = () => {
      const due = Math.min(PER_SENDER, Math.floor(((Date.now() - start) / 1000) * RATE) + 1);
      while (sent < due) {
        const seq = sent + 1;
        let body = `${j}:${seq}:${Date.now()}:`;
        if (body.length < BODY_BYTES) body += pad.slice(body.length);
        const ref = conn.push(data.topics[j % TOPICS], "new_msg", { body }, joinRef, (ok, _payload, ms) => {
          ackLatency.add(ms);
          check(ok, { "new_msg replied ok": (v) => v });
          if (ok) ackedMsgs.add(1);
          acked++;
          maybeFinish();
        });
        if (ref === null) break; // the socket is finishing
        sent = seq;
        sentMsgs.add(1);
      }
      if ((sent >= PER_SENDER || conn.closing || conn.closed) && timer !== null) {
        clearInterval(timer);
        timer = null;
      }
    };
    send();
    if (sent < PER_SENDER) timer = conn.setInterval(send, tick);
  }
}

/** Reached only when `--vus`/`--duration` on the command line replaced the two scenarios. */
export default function () {
  exec.test.abort(
    "chat_fanout.js runs members and senders as two scenarios: size it with -e MEMBERS/SENDERS/" +
      "TOPICS/RATE/DURATION, not --vus/--duration/--iterations",
  );
}
