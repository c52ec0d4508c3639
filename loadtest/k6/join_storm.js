// Join storm: VUS sockets connect and join the same `chat:<uuid>` topic at once (or spread over
// SPREAD seconds), hold HOLD seconds, then close. Each checks, per docs/protocol.md (Join, Presence):
//   - the join replied ok (nexus_join_latency);
//   - a `presence_state` push with this join's join_ref came after the reply, and it already
//     lists this socket's user (nexus_presence_state_latency: join sent → presence_state);
//   - a `presence_diff` broadcast announced this user in `joins` (diffs may be coalesced over
//     NEXUS_PRESENCE_BATCH_MS, so it can carry other joiners too).
// Bounded: one iteration per VU, SPREAD + HOLD + 30 s at most.
// Cost: every joiner receives the whole presence (n metas) and every later diff, so bytes grow
// with the square of VUS; past ~300 joiners k6's JSON parsing, not the server, sets the latency on
// a 2-core box (at 500: k6 ~4.9 s CPU, the release server ~0.4 s). Use `nexus-load storm` beyond.
//
// Env:
//   NEXUS_URL      ws://127.0.0.1:4000   server (loopback only unless NEXUS_ALLOW_REMOTE=1)
//   JWT_SECRET     (required)            the server's HS256 secret; tokens are minted here
//   VUS            200                   joiners (one socket each)
//   HOLD           3                     seconds each socket stays joined after its join reply
//   SPREAD         0                     seconds over which the joins start (0 = all at once)
//   HEARTBEAT      25                    seconds between heartbeats (0 = none)
//   JOIN_P99_MS    1000                  threshold: p(99) of phx_join → reply
//   PRESENCE_P99_MS 1000                 threshold: p(99) of phx_join → presence_state
//
// Example:
//   JWT_SECRET=change-me-to-a-long-random-secret-0123456789 \
//     k6 run --no-usage-report -e VUS=300 -e HOLD=5 loadtest/k6/join_storm.js

import { check } from "k6";
import { Trend } from "k6/metrics";

import { PhoenixConn, envInt, envNum, fail, jwtSecret, makeTopics, mintToken, socketUrl, uuidv4 } from "./lib/nexus.js";

const VUS = envInt("VUS", 200);
const HOLD = envNum("HOLD", 3);
const SPREAD = envNum("SPREAD", 0);
const HEARTBEAT = envNum("HEARTBEAT", 25);
const JOIN_P99_MS = envNum("JOIN_P99_MS", 1000);
const PRESENCE_P99_MS = envNum("PRESENCE_P99_MS", 1000);
const SECRET = jwtSecret();

const presenceStateLatency = new Trend("nexus_presence_state_latency", true);

export const options = {
  scenarios: {
    storm: {
      executor: "per-vu-iterations",
      vus: VUS,
      iterations: 1,
      maxDuration: `${Math.ceil(SPREAD + HOLD + 30)}s`,
    },
  },
  thresholds: {
    checks: ["rate==1"],
    nexus_errors: ["count==0"],
    nexus_join_latency: [`p(99)<${JOIN_P99_MS}`],
    nexus_presence_state_latency: [`p(99)<${PRESENCE_P99_MS}`],
  },
};

export function setup() {
  return { topic: makeTopics(1)[0] };
}

export default function (data) {
  const topic = data.topic;
  const sub = uuidv4();
  const token = mintToken(SECRET, sub, Math.ceil(SPREAD + HOLD + 3600));
  const start = () => {
    let joinSentAt = 0;
    let joinRef = null;
    let replied = false;
    let stateSeen = false;
    let stateAfterReply = false;
    let stateHasMe = false;
    let diffHasMe = false;

    const conn = new PhoenixConn(socketUrl(token), {
      heartbeat: HEARTBEAT,
      open() {
        joinSentAt = Date.now();
        joinRef = conn.join(topic, (ok) => {
          check(ok, { "join replied ok": (v) => v });
          replied = true;
          if (!ok) {
            conn.finish(0);
            return;
          }
          conn.setTimeout(() => conn.finish(2000), HOLD * 1000);
        });
      },
      event(gotTopic, event, payload, gotJoinRef) {
        if (gotTopic !== topic) {
          fail(`${event} on a topic this socket did not join: ${gotTopic}`);
          return;
        }
        if (event === "presence_state") {
          if (gotJoinRef !== joinRef) fail(`presence_state with join_ref ${gotJoinRef}, expected ${joinRef}`);
          if (stateSeen) fail("a second presence_state for one join");
          stateSeen = true;
          stateAfterReply = replied;
          presenceStateLatency.add(Date.now() - joinSentAt);
          stateHasMe = hasMeta(payload, sub);
        } else if (event === "presence_diff") {
          if (payload && hasMeta(payload.joins, sub)) diffHasMe = true;
        }
      },
      done() {
        check(conn, {
          connected: (c) => c.opened,
          "stayed connected": (c) => c.closing,
        });
        if (!replied) return; // already counted: the join reply never came or the socket died
        check(null, {
          "presence_state received": () => stateSeen,
          "presence_state came after the join reply": () => !stateSeen || stateAfterReply,
          "presence_state lists me": () => !stateSeen || stateHasMe,
          "presence_diff announced my join": () => diffHasMe,
        });
      },
    });
  };
  if (SPREAD > 0) setTimeout(start, Math.random() * SPREAD * 1000);
  else start();
}

/** True when `state` (a presence state or diff side) holds at least one meta for `sub`. */
function hasMeta(state, sub) {
  const entry = state && state[sub];
  return !!(entry && Array.isArray(entry.metas) && entry.metas.length > 0 && entry.metas.every(isMeta));
}

function isMeta(m) {
  return m && typeof m.phx_ref === "string" && m.phx_ref.length > 0 && typeof m.online_at === "string";
}
