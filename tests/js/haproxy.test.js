// The shipped HAProxy example (deploy/haproxy/nexus.cfg) in front of a two-node cluster, with
// the official client over wss://: TLS ends at HAProxy, new sockets are balanced over the
// nodes, and a draining node (503 on /healthz after SIGTERM) is taken out of the pool while
// its 503 upgrades are retried on the other node.
//
// The config is the shipped file with only the bind address, certificate path, server
// addresses, stats socket and log target replaced (and chroot/user/group dropped), so this
// exercises what operators install. Missing `haproxy` or `openssl` fails with the Debian
// package to install (tests/run.sh installs them); this test never skips.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import https from "node:https";
import net from "node:net";
import { join } from "node:path";
import { promisify } from "node:util";

import { Presence } from "phoenix";
import WebSocket from "ws";

import { Clients, REPO_ROOT, Recorder, TEST_SECRET, chatTopic, push, pushResult, withTimeout } from "./helpers.js";
import {
  makeDir,
  metric,
  pollUntil,
  removeDir,
  spawnTracked,
  startCluster,
  startPostgres,
} from "./cluster_harness.js";

const execFileP = promisify(execFile);
const SHIPPED_CFG = join(REPO_ROOT, "deploy", "haproxy", "nexus.cfg");
/** The nodes' drain: long enough that the SIGTERMed node stays up, answering 503, throughout. */
const DRAIN_SECS = 30;
/** `inter 2s fall 2` in the shipped file: a failing node is down after about 4 s. */
const MARKED_DOWN_WITHIN_MS = 15_000;
/** Every test ends within this, pass or fail. */
const BOUNDED = { timeout: 60_000 };

let pg;
let cluster;
let proxy;
before(async () => {
  pg = await startPostgres();
  cluster = await startCluster(pg, 2, { env: { NEXUS_DRAIN_SECS: String(DRAIN_SECS) } });
  proxy = await startHaproxy(cluster.nodes.map((n) => n.port));
});
after(async () => {
  await proxy?.stop();
  await cluster?.stop();
  await pg?.stop();
});

// ---------------------------------------------------------------------------------------------
// HAProxy

/** A self-signed certificate for 127.0.0.1: `{pem (key + cert, for HAProxy), cert}`. */
async function selfSigned(dir) {
  const key = join(dir, "key.pem");
  const cert = join(dir, "cert.pem");
  try {
    await execFileP(
      "openssl",
      ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-days", "1",
        // The SAN lets the client verify the name it dials instead of turning verification off.
        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", key, "-out", cert],
      { timeout: 20_000 },
    );
  } catch (err) {
    if (err.code === "ENOENT") throw new Error("cannot run openssl: install Debian's `openssl` package");
    throw err;
  }
  const pem = join(dir, "nexus.pem");
  writeFileSync(pem, readFileSync(key, "utf8") + readFileSync(cert, "utf8"));
  return { pem, cert: readFileSync(cert, "utf8") };
}

/** Replaces `from` (a string or a RegExp with /g) in `text`, requiring exactly `count` hits. */
function substitute(text, from, to, count = 1) {
  const hits = typeof from === "string" ? text.split(from).length - 1 : (text.match(from) || []).length;
  assert.equal(hits, count, `${SHIPPED_CFG}: expected ${count} occurrence(s) of ${from}`);
  return typeof from === "string" ? text.split(from).join(to) : text.replace(from, to);
}

/** The shipped config, pointed at this test's port, certificate, nodes and stats socket. */
function testConfig(shipped, { port, pem, socket, nodePorts }) {
  let cfg = substitute(shipped, "bind :443 ", `bind 127.0.0.1:${port} `);
  cfg = substitute(cfg, "/etc/haproxy/certs/nexus.pem", pem);
  cfg = substitute(cfg, "stats socket /run/haproxy/admin.sock ", `stats socket ${socket} `);
  // The packaged layout (chroot dir, haproxy user) is not this test's business.
  cfg = substitute(cfg, /^\s*(chroot|user|group) .*\n/gm, "", 3);
  // HAProxy's log goes to its stderr (shown if the test fails), not to syslog.
  cfg = substitute(cfg, "log /dev/log local0", "log stderr format raw local0");
  // The example's nodes (10.0.0.x:4000) become ours, in order; extra ones go.
  const servers = cfg.match(/^\s*server \S+ 10\.0\.0\.\d+:4000.*$/gm) || [];
  assert.ok(servers.length >= nodePorts.length, `${SHIPPED_CFG} lists at least ${nodePorts.length} servers`);
  let i = 0;
  cfg = cfg.replace(/^(\s*server \S+ )10\.0\.0\.\d+:4000(.*)\n/gm, (_, head, tail) =>
    i < nodePorts.length ? `${head}127.0.0.1:${nodePorts[i++]}${tail}\n` : "",
  );
  return cfg;
}

/** A free port on 127.0.0.1 (HAProxy fails loudly in the unlikely case it is taken meanwhile). */
async function freePort() {
  const probe = net.createServer();
  await new Promise((resolveListen) => probe.listen(0, "127.0.0.1", resolveListen));
  const { port } = probe.address();
  await new Promise((resolveClose) => probe.close(resolveClose));
  return port;
}

/**
 * Runs `haproxy -f <test config> -db` in front of `nodePorts`; resolves once both servers are
 * UP in `show stat`. The server named `servers[i]` is node i.
 */
async function startHaproxy(nodePorts) {
  const dir = makeDir("nexus-js-haproxy-");
  const { pem, cert } = await selfSigned(dir);
  const port = await freePort();
  const socket = join(dir, "admin.sock");
  const cfgPath = join(dir, "haproxy.cfg");
  const cfg = testConfig(readFileSync(SHIPPED_CFG, "utf8"), { port, pem, socket, nodePorts });
  writeFileSync(cfgPath, cfg);
  const servers = [...cfg.matchAll(/^\s*server (\S+) 127\.0\.0\.1:/gm)].map((m) => m[1]);

  const { child, exited } = spawnTracked("haproxy", ["-f", cfgPath, "-db"], {
    cwd: dir,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let log = "";
  child.stdout?.setEncoding("utf8").on("data", (chunk) => (log += chunk));
  child.stderr?.setEncoding("utf8").on("data", (chunk) => (log += chunk));
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    await exited;
    removeDir(dir);
  };
  const died = exited.then(({ code, signal, error }) => {
    if (error?.code === "ENOENT") {
      throw new Error("cannot run haproxy: install Debian's `haproxy` package (tests/run.sh does)");
    }
    throw new Error(`haproxy exited (code ${code}, signal ${signal}):\n${log}`);
  });
  died.catch(() => {});

  const haproxy = {
    port,
    url: `wss://127.0.0.1:${port}/socket`,
    httpsUrl: `https://127.0.0.1:${port}`,
    ca: cert,
    servers,
    log: () => log,
    stop,
    /** One runtime API command's answer. */
    async command(cmd) {
      return withTimeout(
        new Promise((resolveAnswer, rejectAnswer) => {
          let out = "";
          const conn = net.connect(socket, () => conn.end(`${cmd}\n`));
          conn.setEncoding("utf8");
          conn.on("data", (chunk) => (out += chunk));
          conn.on("end", () => resolveAnswer(out));
          conn.on("error", rejectAnswer);
        }),
        5_000,
        `haproxy's answer to ${cmd}`,
      );
    },
    /** `show stat` of the backend: `{BACKEND: row, <server>: row}`, rows keyed by CSV header. */
    async stats() {
      const [header, ...rows] = (await this.command("show stat")).trim().split("\n");
      const names = header.replace(/^# /, "").split(",");
      const out = {};
      for (const row of rows) {
        const cells = row.split(",");
        const entry = Object.fromEntries(names.map((n, i) => [n, cells[i]]));
        if (entry.pxname === "nexus_nodes") out[entry.svname] = entry;
      }
      return out;
    },
    /** Open sessions per node, as HAProxy counts them (health checks not included). */
    async sessions() {
      const stats = await this.stats();
      return servers.map((s) => Number(stats[s].scur));
    },
  };

  try {
    await Promise.race([
      died,
      pollUntil(
        () => haproxy.stats().catch(() => ({})),
        (stats) => servers.every((s) => stats[s]?.status?.startsWith("UP")),
        { timeoutMs: 10_000, what: "haproxy's servers UP" },
      ),
    ]);
  } catch (err) {
    await stop();
    err.message += `\n--- haproxy log ---\n${log}`;
    throw err;
  }
  return haproxy;
}

// ---------------------------------------------------------------------------------------------
// Clients through HAProxy

/** A `ws` WebSocket that trusts only the test's certificate (phoenix constructs it). */
function tlsTransport(ca) {
  return class TlsWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols, { ca });
    }
  };
}

/** `GET path` through HAProxy: `{status, body}`. */
function httpsGet(path) {
  return withTimeout(
    new Promise((resolveGet, rejectGet) => {
      https
        .get(`${proxy.httpsUrl}${path}`, { ca: proxy.ca }, (res) => {
          let body = "";
          res.setEncoding("utf8");
          res.on("data", (chunk) => (body += chunk));
          res.on("end", () => resolveGet({ status: res.statusCode, body }));
        })
        .on("error", rejectGet);
    }),
    5_000,
    `GET ${path} through haproxy`,
  );
}

/** Open sockets per node as the nodes count them (`nexus_connections`, less the asking one). */
const nodeConnections = () =>
  Promise.all(cluster.nodes.map(async (n) => (await metric(n.httpUrl, "nexus_connections")) - 1));

/**
 * Waits until HAProxy's sessions and the nodes' own `nexus_connections` both equal `counts`
 * (a health check briefly adds a connection at a node, and a closed socket leaves the gauge
 * only once its close completes: poll until they agree).
 */
async function settle(counts, what) {
  await pollUntil(
    async () => ({ haproxy: await proxy.sessions(), nodes: await nodeConnections() }),
    ({ haproxy, nodes }) => String(haproxy) === String(counts) && String(nodes) === String(counts),
    { timeoutMs: 10_000, what: `${what}: sessions and nexus_connections = ${counts}` },
  );
}

/**
 * Opens one client through HAProxy (`openClient()`) and finds the node it landed on: the one
 * whose count went up by one, at HAProxy and at the node. `counts` (per node) is updated.
 */
async function openPlaced(openClient, counts, what) {
  const client = await openClient();
  const found = await pollUntil(
    async () => ({ haproxy: await proxy.sessions(), nodes: await nodeConnections() }),
    ({ haproxy, nodes }) =>
      counts.some((_, i) => {
        const want = counts.map((c, j) => c + (i === j ? 1 : 0));
        return String(haproxy) === String(want) && String(nodes) === String(want);
      }),
    { timeoutMs: 10_000, what: `${what} to show up at one node` },
  );
  const node = found.haproxy.findIndex((c, i) => c === counts[i] + 1);
  counts[node] += 1;
  return { ...client, node };
}

/**
 * One test's clients through HAProxy over TLS, closed after the test: `open(what)` opens one
 * and finds its node (openPlaced); `counts` holds the sockets per node.
 */
function placedClients(t) {
  const clients = new Clients({ url: proxy.url, secret: TEST_SECRET });
  t.after(() => clients.closeAll());
  const counts = [0, 0];
  const socketOpts = { transport: tlsTransport(proxy.ca) };
  return { counts, open: (what) => openPlaced(() => clients.open({ socketOpts }), counts, what) };
}

/** Joins `topic` with a Presence helper; `syncs` records user ids at each sync, `msgs` new_msg. */
async function joinMember(client, topic) {
  const channel = client.socket.channel(topic);
  const presence = new Presence(channel);
  const syncs = new Recorder(`presence of ${client.sub}`);
  presence.onSync(() => syncs.push(presence.list((id) => id).sort()));
  const msgs = new Recorder(`new_msg at ${client.sub}`);
  channel.on("new_msg", (payload) => msgs.push(payload));
  assert.deepEqual(await pushResult(channel.join()), { status: "ok", response: {} });
  return { ...client, channel, syncs, msgs };
}

const sorted = (ids) => [...ids].sort();

// ---------------------------------------------------------------------------------------------

test("phoenix over wss through HAProxy: two clients land on different nodes and chat", BOUNDED, async (t) => {
  const { counts, open } = placedClients(t);

  await settle(counts, "no client yet");
  const alice = await open("the first client");
  const bob = await open("the second client");
  assert.notEqual(bob.node, alice.node, "leastconn sends the second socket to the other node");

  const topic = chatTopic();
  const members = [await joinMember(alice, topic), await joinMember(bob, topic)];
  const both = sorted([alice.sub, bob.sub]);
  for (const m of members) {
    await m.syncs.until((items) => String(items.at(-1)) === String(both), 10_000, "both users present");
  }

  assert.deepEqual(await push(members[0].channel, "new_msg", { body: "from alice" }), { status: "ok", response: {} });
  assert.deepEqual(await push(members[1].channel, "new_msg", { body: "from bob" }), { status: "ok", response: {} });
  const views = await Promise.all(members.map((m) => m.msgs.waitForCount(2, 10_000)));
  assert.deepEqual(views[1], views[0], "both see the same messages in the same order");
  assert.deepEqual(views[0].map((p) => p.content.text), ["from alice", "from bob"]);
  assert.deepEqual(views[0].map((p) => p.sender_id), [alice.sub, bob.sub]);

  // Plain HTTP through the same frontend: health is public, metrics are not.
  assert.deepEqual(await httpsGet("/healthz"), { status: 200, body: "ok" });
  assert.equal((await httpsGet("/metrics")).status, 404);
});

test("a draining node (503 on /healthz) leaves the pool; its 503 upgrades are retried elsewhere", BOUNDED, async (t) => {
  const { counts, open } = placedClients(t);

  // Three sockets: 2 on one node, 1 on the other. The node with one is drained, so that
  // leastconn still picks it for the next socket until its checks fail.
  await settle(counts, "the previous test's clients gone");
  const first = await open("socket 1");
  const second = await open("socket 2");
  assert.notEqual(second.node, first.node);
  await open("socket 3");
  const drained = counts.indexOf(1);
  const live = 1 - drained;
  const drainedName = proxy.servers[drained];

  process.kill(cluster.nodes[drained].pid, "SIGTERM");
  // Asked directly, the node answers 503 from now on (its one socket keeps it draining).
  await pollUntil(
    () => fetch(`${cluster.nodes[drained].httpUrl}/healthz`).then((r) => r.status),
    (status) => status === 503,
    { timeoutMs: 5_000, what: "the drained node's /healthz to answer 503" },
  );

  // Before HAProxy's checks notice, a new socket goes to the drained node (fewest sockets),
  // gets 503, and is retried on the live node: the client never sees the 503.
  const statsBefore = await proxy.stats();
  const retried = await open("a socket during the drain, before the checks notice");
  assert.equal(retried.node, live, "the socket ended up on the live node");
  const afterRetry = await proxy.stats();
  // If the node was in the pool all along, leastconn did pick it: HAProxy retried elsewhere.
  if (statsBefore[drainedName].status.startsWith("UP") && afterRetry[drainedName].status.startsWith("UP")) {
    assert.ok(
      Number(afterRetry.BACKEND.wredis) > Number(statsBefore.BACKEND.wredis),
      `the 503 was redispatched: ${JSON.stringify({ before: statsBefore.BACKEND, after: afterRetry.BACKEND })}`,
    );
  }

  // The checks see the 503 (layer 7 status, not a refused connection: the node is still up)
  // and take the node out.
  const down = await pollUntil(
    () => proxy.stats(),
    (stats) => stats[drainedName].status === "DOWN",
    { timeoutMs: MARKED_DOWN_WITHIN_MS, what: `${drainedName} marked DOWN` },
  );
  assert.equal(down[drainedName].check_status, "L7STS", JSON.stringify(down[drainedName]));
  assert.equal(down[drainedName].check_code, "503");

  // New sockets all go to the live node now, though it holds more.
  const later = [await open("a socket after the node is down"), await open("another one")];
  for (const c of later) assert.equal(c.node, live);

  // And they work: a message from one reaches the other members on the live node.
  const topic = chatTopic();
  const members = [];
  for (const c of [retried, ...later]) members.push(await joinMember(c, topic));
  const reply = await push(members[2].channel, "new_msg", { body: "after the drain" });
  assert.deepEqual(reply, { status: "ok", response: {} });
  for (const m of members) await m.msgs.waitFor((p) => p.content.text === "after the drain", 5_000);
});
