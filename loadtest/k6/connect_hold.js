// Connect-and-hold: every VU opens one Phoenix V2 socket, joins one of TOPICS `chat:<uuid>`
// topics, sends a Phoenix heartbeat every HEARTBEAT seconds and holds the connection HOLD
// seconds, then leaves by closing. Checks: connected, join replied ok, every heartbeat replied ok,
// the server never closed the socket. Bounded: one iteration per VU, RAMP + HOLD + 30 s at most.
//
// Env:
//   NEXUS_URL      ws://127.0.0.1:4000   server (loopback only unless NEXUS_ALLOW_REMOTE=1)
//   JWT_SECRET     (required)            the server's HS256 secret; tokens are minted here
//   VUS            50                    connections (one VU each)
//   HOLD           30                    seconds each connection is held after it opens
//   HEARTBEAT      10                    seconds between heartbeats (0 = none)
//   TOPICS         10                    topics the connections are spread over (round robin)
//   RAMP           0                     seconds over which connections start (0 = all at once)
//   JOIN_P99_MS    250                   threshold: p(99) of phx_join → reply
//   HEARTBEAT_P99_MS 250                 threshold: p(99) of heartbeat → reply
//
// Example:
//   JWT_SECRET=change-me-to-a-long-random-secret-0123456789 \
//     k6 run --no-usage-report -e VUS=200 -e HOLD=60 -e RAMP=5 loadtest/k6/connect_hold.js

import { check } from "k6";
import exec from "k6/execution";

import { PhoenixConn, envInt, envNum, jwtSecret, makeTopics, mintToken, socketUrl, uuidv4 } from "./lib/nexus.js";

const VUS = envInt("VUS", 50);
const HOLD = envNum("HOLD", 30);
const HEARTBEAT = envNum("HEARTBEAT", 10);
const TOPICS = envInt("TOPICS", 10);
const RAMP = envNum("RAMP", 0);
const JOIN_P99_MS = envNum("JOIN_P99_MS", 250);
const HEARTBEAT_P99_MS = envNum("HEARTBEAT_P99_MS", 250);
const SECRET = jwtSecret();

export const options = {
  scenarios: {
    hold: {
      executor: "per-vu-iterations",
      vus: VUS,
      iterations: 1,
      maxDuration: `${Math.ceil(RAMP + HOLD + 30)}s`,
    },
  },
  thresholds: {
    checks: ["rate==1"],
    nexus_errors: ["count==0"],
    nexus_join_latency: [`p(99)<${JOIN_P99_MS}`],
    nexus_heartbeat_latency: [`p(99)<${HEARTBEAT_P99_MS}`],
  },
};

export function setup() {
  return { topics: makeTopics(TOPICS) };
}

export default function (data) {
  const topic = data.topics[(exec.vu.idInTest - 1) % data.topics.length];
  const token = mintToken(SECRET, uuidv4(), Math.ceil(RAMP + HOLD + 3600));
  const start = () => {
    const conn = new PhoenixConn(socketUrl(token), {
      heartbeat: HEARTBEAT,
      open() {
        conn.join(topic, (ok) => check(ok, { "join replied ok": (v) => v }));
        conn.setTimeout(() => conn.finish(2000), HOLD * 1000);
      },
      done() {
        check(conn, {
          connected: (c) => c.opened,
          "held until the end": (c) => c.closing,
        });
      },
    });
  };
  if (RAMP > 0) setTimeout(start, Math.random() * RAMP * 1000);
  else start();
}
