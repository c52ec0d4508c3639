// Cluster harness for the JS suite: a private PostgreSQL and redis-server, N `nexus` nodes in
// cluster mode on them, and an in-process round-robin TCP proxy standing in for a load
// balancer. Mirrors tests/common/{pg,redis,cluster}.rs. Missing PostgreSQL or Redis fails with
// the Debian package to install (tests/run.sh installs them); these tests never skip.
//
// Every process and temp dir is removed by `stop()`, and, should a test die before its hooks
// run, by the exit handler below.

import { execFile, spawn } from "node:child_process";
import { chownSync, existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";

import { Recorder, TEST_SECRET, mintToken, nowSeconds, startServer, withTimeout } from "./helpers.js";

const execFileP = promisify(execFile);

/** initdb + first start on a busy box (the Rust harness allows the same). */
const PG_START_TIMEOUT_MS = 30_000;
const REDIS_START_TIMEOUT_MS = 10_000;

// ---------------------------------------------------------------------------------------------
// Last-resort cleanup: a test that throws in a hook or is interrupted must not leave servers.

const livePids = new Set();
const liveDirs = new Set();
process.on("exit", () => {
  for (const pid of livePids) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // already gone
    }
  }
  for (const dir of liveDirs) rmSync(dir, { recursive: true, force: true });
});
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.once(signal, () => process.exit(130));
}

/** Spawns a tracked child; `exited` resolves with `{code, signal}` (also after a failed spawn). */
export function spawnTracked(cmd, args, opts) {
  const child = spawn(cmd, args, opts);
  const exited = new Promise((resolveExit) => {
    child.once("exit", (code, signal) => resolveExit({ code, signal }));
    child.once("error", (err) => resolveExit({ code: null, signal: null, error: err }));
  });
  if (child.pid) {
    livePids.add(child.pid);
    exited.then(() => livePids.delete(child.pid));
  }
  return { child, exited };
}

/**
 * Resolves once `stream` has printed text matching `re`; rejects if the process exits first.
 * Afterwards the stream keeps being drained (a full pipe would block the process) but not kept.
 */
export function waitForOutput(name, stream, exited, re, timeoutMs) {
  let text = "";
  const done = new Promise((resolveReady, rejectReady) => {
    stream.setEncoding("utf8");
    const onData = (chunk) => {
      text += chunk;
      if (re.test(text)) {
        stream.off("data", onData);
        stream.resume();
        resolveReady();
      }
    };
    stream.on("data", onData);
    exited.then(({ code, signal, error }) =>
      rejectReady(
        new Error(`${name} exited (code ${code}, signal ${signal}${error ? `, ${error.message}` : ""}):\n${text}`),
      ),
    );
  });
  return withTimeout(done, timeoutMs, `${name} to print ${re}`, () => text);
}

/** A temp dir removed by `removeDir`, or at exit if a test dies first. */
export function makeDir(prefix) {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  liveDirs.add(dir);
  return dir;
}

export function removeDir(dir) {
  rmSync(dir, { recursive: true, force: true });
  liveDirs.delete(dir);
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/** The newest /usr/lib/postgresql/<v>/bin holding initdb and postgres, else /usr/bin etc. */
function pgBinDir() {
  const candidates = [];
  if (existsSync("/usr/lib/postgresql")) {
    const versions = readdirSync("/usr/lib/postgresql").sort((a, b) => Number(b) - Number(a));
    candidates.push(...versions.map((v) => join("/usr/lib/postgresql", v, "bin")));
  }
  candidates.push("/usr/local/bin", "/usr/bin");
  const dir = candidates.find((d) => existsSync(join(d, "initdb")) && existsSync(join(d, "postgres")));
  if (!dir) {
    throw new Error(
      "PostgreSQL binaries (initdb, postgres) not found: install Debian's `postgresql` package (tests/run.sh does)",
    );
  }
  return dir;
}

/** `{uid, gid}` of the `postgres` user when we are root (initdb refuses root), else null. */
function pgRunAs() {
  if (process.getuid() !== 0) return null;
  const line = readFileSync("/etc/passwd", "utf8")
    .split("\n")
    .find((l) => l.startsWith("postgres:"));
  if (!line) {
    throw new Error("running as root and there is no `postgres` user: install Debian's `postgresql` package");
  }
  const [, , uid, gid] = line.split(":");
  return { uid: Number(uid), gid: Number(gid) };
}

/**
 * A private PostgreSQL on a unix socket in a temp dir (no TCP). `createDb()` makes a fresh
 * database and returns its `NEXUS_DATABASE_URL`.
 */
export async function startPostgres() {
  const bin = pgBinDir();
  const runAs = pgRunAs();
  const dir = makeDir("nexus-js-pg-");
  if (runAs) chownSync(dir, runAs.uid, runAs.gid);
  const asPg = runAs ? { uid: runAs.uid, gid: runAs.gid } : {};
  const port = 5432; // only names the socket file, inside our own dir

  try {
    const args = ["-A", "trust", "-U", "nexus", "--no-sync", "-E", "UTF8", "-D", join(dir, "data")];
    await execFileP(join(bin, "initdb"), args, { ...asPg, cwd: dir, timeout: PG_START_TIMEOUT_MS });
  } catch (err) {
    removeDir(dir);
    throw new Error(`initdb failed: ${err.stderr || err.message}`);
  }

  const { child, exited } = spawnTracked(
    join(bin, "postgres"),
    ["-D", join(dir, "data"), "-k", dir, "-p", String(port)].concat(
      ["-c", "listen_addresses=", "-c", "fsync=off", "-c", "max_connections=300"],
    ),
    { ...asPg, cwd: dir, stdio: ["ignore", "ignore", "pipe"] },
  );
  try {
    await waitForOutput("postgres", child.stderr, exited, /ready to accept connections/, PG_START_TIMEOUT_MS);
  } catch (err) {
    child.kill("SIGKILL");
    await exited;
    removeDir(dir);
    throw err;
  }

  let dbCount = 0;
  const url = (db) => `postgresql:///${db}?host=${dir}&port=${port}&user=nexus`;
  return {
    dir,
    url,
    async createDb() {
      const name = `js${process.pid}_${dbCount++}`;
      await execFileP(join(bin, "createdb"), ["-h", dir, "-p", String(port), "-U", "nexus", name], {
        timeout: 10_000,
      });
      return url(name);
    },
    async stop() {
      // SIGQUIT: immediate shutdown, no checkpoint (the data is thrown away).
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGQUIT");
      await withTimeout(exited, 10_000, "postgres to exit").catch(() => child.kill("SIGKILL"));
      await exited;
      removeDir(dir);
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Redis

/** A private redis-server on a unix socket in a temp dir, persistence off. */
export async function startRedis() {
  const dir = makeDir("nexus-js-redis-");
  const socket = join(dir, "redis.sock");
  const { child, exited } = spawnTracked(
    "redis-server",
    ["--port", "0", "--unixsocket", socket, "--save", "", "--appendonly", "no", "--dir", dir],
    { cwd: dir, stdio: ["ignore", "pipe", "ignore"] },
  );
  try {
    await waitForOutput("redis-server", child.stdout, exited, /ready to accept connections/, REDIS_START_TIMEOUT_MS);
  } catch (err) {
    if (child.pid) child.kill("SIGKILL");
    await exited;
    removeDir(dir);
    const missing = (await exited).error?.code === "ENOENT";
    throw missing
      ? new Error("cannot run redis-server: install Debian's `redis-server` package (tests/run.sh does)")
      : err;
  }
  return {
    url: `unix://${socket}`,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
      await exited;
      removeDir(dir);
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Cluster

/**
 * `n` nexus nodes (one worker each, `node-<i>`) on a fresh database of `pg` and a private
 * Redis. `env` goes to every node. `nodes[i]` is a helpers.js server (`port`, `url`, `pid`,
 * `stop()`), or null once killed.
 */
export async function startCluster(pg, n, { env = {} } = {}) {
  const dbUrl = await pg.createDb();
  const redis = await startRedis();
  const cluster = new Cluster(dbUrl, redis, env);
  try {
    for (let i = 0; i < n; i++) cluster.nodes.push(await cluster.startNode(i));
  } catch (err) {
    await cluster.stop();
    throw err;
  }
  return cluster;
}

class Cluster {
  constructor(dbUrl, redis, env) {
    this.dbUrl = dbUrl;
    this.redis = redis;
    this.env = env;
    this.nodes = [];
  }

  /** Starts node `i` (again, after a kill: same id, same database and Redis, a new port). */
  async startNode(i) {
    const node = await startServer({
      workers: 1,
      env: {
        NEXUS_DATABASE_URL: this.dbUrl,
        NEXUS_REDIS_URL: this.redis.url,
        NEXUS_NODE_ID: `node-${i}`,
        NEXUS_MSG_RATE: "0",
        ...this.env,
      },
    });
    // Killed at exit too, should the test die before its hooks run.
    livePids.add(node.pid);
    const stop = node.stop;
    node.stop = async () => {
      await stop();
      livePids.delete(node.pid);
    };
    return node;
  }

  /** SIGKILL (the "node died" fault); resolves once the process is gone. */
  async kill(i) {
    const node = this.nodes[i];
    this.nodes[i] = null;
    await node?.stop();
  }

  async stop() {
    await Promise.all(this.nodes.map((node) => node?.stop()));
    this.nodes = [];
    await this.redis.stop();
  }
}

// ---------------------------------------------------------------------------------------------
// HTTP against one node

/** A valid token for the history API. */
export const historyToken = () => mintToken(TEST_SECRET, { exp: nowSeconds() + 600 });

/** Every stored message of `topic` (`chat:<uuid>`), oldest first, paging through the history API. */
export async function history(httpUrl, topic) {
  const conversation = topic.replace(/^chat:/, "");
  const token = historyToken();
  const pages = [];
  let before = null;
  do {
    const query = `limit=200${before ? `&before=${before}` : ""}`;
    const res = await fetch(`${httpUrl}/api/conversations/${conversation}/messages?${query}`, {
      headers: { authorization: `Bearer ${token}` },
      signal: AbortSignal.timeout(5_000),
    });
    const body = await res.json();
    if (res.status !== 200) throw new Error(`history: ${res.status} ${JSON.stringify(body)}`);
    pages.unshift(body.messages);
    before = body.next_before;
  } while (before);
  return pages.flat();
}

/**
 * The value of the gauge/counter `name` (no labels) in `httpUrl`'s `/metrics`, read over a
 * connection of its own that closes after it (no keep-alive connection lingers at the node).
 * Note that `nexus_connections` counts the connection that asks.
 */
export async function metric(httpUrl, name) {
  const text = await withTimeout(
    new Promise((resolveGet, rejectGet) => {
      http
        .get(`${httpUrl}/metrics`, { agent: false }, (res) => {
          let body = "";
          res.setEncoding("utf8");
          res.on("data", (chunk) => (body += chunk));
          res.on("end", () => resolveGet(body));
        })
        .on("error", rejectGet);
    }),
    5_000,
    `GET ${httpUrl}/metrics`,
  );
  const m = text.match(new RegExp(`^${name} (\\S+)$`, "m"));
  if (!m) throw new Error(`no ${name} in /metrics:\n${text}`);
  return Number(m[1]);
}

/**
 * Polls `probe()` (async) until `done(value)` holds, every `everyMs`; rejects after
 * `timeoutMs` with the last value. For state that has no event to wait for (HTTP gauges).
 */
export async function pollUntil(probe, done, { timeoutMs = 10_000, everyMs = 50, what = "a condition" } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await probe();
    if (done(last)) return last;
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last: ${JSON.stringify(last)}`);
    }
    await new Promise((resolveTick) => setTimeout(resolveTick, everyMs));
  }
}

// ---------------------------------------------------------------------------------------------
// Round-robin TCP proxy (a load balancer stand-in)

/**
 * Listens on 127.0.0.1 and forwards each new client connection to the next backend port in
 * turn, skipping backends that refuse. When either side closes, the other is closed too, so
 * a dead backend looks to the client like a load balancer dropping the connection.
 * `routes` records `{backend, port}` for each forwarded connection, `refused` each backend
 * that refused one.
 */
export class RoundRobinProxy {
  constructor(ports) {
    this.ports = ports;
    this.next = 0;
    this.sockets = new Set();
    this.routes = new Recorder("proxy routes");
    this.refused = new Recorder("refused dials");
    this.server = net.createServer((client) => this.forward(client));
  }

  async listen() {
    await new Promise((resolveListen, rejectListen) => {
      this.server.once("error", rejectListen);
      this.server.listen(0, "127.0.0.1", resolveListen);
    });
    this.port = this.server.address().port;
    this.url = `ws://127.0.0.1:${this.port}/socket`;
    return this;
  }

  track(socket) {
    this.sockets.add(socket);
    socket.once("close", () => this.sockets.delete(socket));
  }

  async forward(client) {
    this.track(client);
    client.pause();
    client.on("error", () => {});
    for (let tried = 0; tried < this.ports.length; tried++) {
      const backend = this.next;
      this.next = (this.next + 1) % this.ports.length;
      const upstream = await this.dial(this.ports[backend]);
      if (!upstream) {
        this.refused.push({ backend, port: this.ports[backend] });
        continue;
      }
      if (client.destroyed) return upstream.destroy();
      this.track(upstream);
      upstream.on("error", () => {});
      upstream.once("close", () => client.destroy());
      client.once("close", () => upstream.destroy());
      client.pipe(upstream);
      upstream.pipe(client);
      client.resume();
      this.routes.push({ backend, port: this.ports[backend] });
      return;
    }
    client.destroy();
  }

  /** A connected socket to `port`, or null if it refuses. */
  dial(port) {
    return new Promise((resolveDial) => {
      const upstream = net.connect({ host: "127.0.0.1", port });
      upstream.once("connect", () => {
        upstream.removeAllListeners("error");
        resolveDial(upstream);
      });
      upstream.once("error", () => resolveDial(null));
    });
  }

  async stop() {
    for (const socket of this.sockets) socket.destroy();
    await new Promise((resolveClose) => this.server.close(() => resolveClose()));
  }
}
