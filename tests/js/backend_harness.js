// The test app backend (tests/backend/app.py, FastAPI on uvicorn) for the private-conversation
// tests: started from its venv, stopped by `stop()` (or at exit, should a test die first).
//
// The venv comes from tests/backend/venv.sh (fastapi, uvicorn, pyjwt pinned in
// tests/backend/requirements.txt, under ~/.cache/nexus-backend): NEXUS_BACKEND_PYTHON names its
// python (tests/run.sh sets it), else the harness runs venv.sh itself, which reuses the venv
// while the requirements are unchanged. A missing package fails naming it; nothing is skipped.

import { execFile } from "node:child_process";
import { join } from "node:path";
import { promisify } from "node:util";

import { REPO_ROOT, TEST_SECRET, withTimeout } from "./helpers.js";
import { spawnTracked } from "./cluster_harness.js";

const execFileP = promisify(execFile);

export const BACKEND_DIR = join(REPO_ROOT, "tests", "backend");
/** The bearer Nexus sends to the backend's join proxy (NEXUS_JOIN_PROXY_SECRET). */
export const PROXY_SECRET = "nexus-js-join-proxy-secret-0123456789";
/** The Nexus server API key (NEXUS_API_KEY) the backend calls with. */
export const API_KEY = "nexus-js-server-api-key-0123456789abcdef";

/** Python's imports (fastapi, pydantic) on a busy 2-core box. */
const BACKEND_START_TIMEOUT_MS = 30_000;
/** First install from PyPI; later runs only check the stamp (well under a second). */
const VENV_TIMEOUT_MS = 300_000;
/** Bound for one HTTP call to the backend (its own calls to Nexus are bounded at 5 s). */
const CALL_TIMEOUT_MS = 10_000;
const READY_RE = /nexus test backend ready on (http:\/\/[^\s]+)/;

/** The venv's python: NEXUS_BACKEND_PYTHON, else what tests/backend/venv.sh prints. */
async function backendPython() {
  if (process.env.NEXUS_BACKEND_PYTHON) return process.env.NEXUS_BACKEND_PYTHON;
  try {
    const { stdout } = await execFileP("bash", [join(BACKEND_DIR, "venv.sh")], {
      timeout: VENV_TIMEOUT_MS,
      maxBuffer: 16 * 1024 * 1024,
    });
    return stdout.trim().split("\n").at(-1);
  } catch (err) {
    throw new Error(
      "could not set up the test backend's venv (Python packages fastapi, uvicorn, pyjwt from " +
        `tests/backend/requirements.txt): bash tests/backend/venv.sh failed:\n${err.stderr || err.message}`,
    );
  }
}

/**
 * Starts the backend on a free port. `env` adds to or overrides its environment (JWT_SECRET is
 * the suite's TEST_SECRET, PROXY_SECRET and NEXUS_API_KEY the constants above). Resolves once
 * it prints its ready line.
 */
export async function startBackend({ env = {} } = {}) {
  const python = await backendPython();
  const { child, exited } = spawnTracked(python, [join(BACKEND_DIR, "serve.py"), "--port", "0"], {
    cwd: BACKEND_DIR,
    env: {
      PATH: process.env.PATH,
      JWT_SECRET: TEST_SECRET,
      PROXY_SECRET,
      NEXUS_API_KEY: API_KEY,
      PYTHONUNBUFFERED: "1",
      PYTHONDONTWRITEBYTECODE: "1", // no __pycache__ in the work tree
      ...env,
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  child.stderr?.setEncoding("utf8");
  child.stderr?.on("data", (chunk) => (stderr += chunk));
  const url = await withTimeout(
    new Promise((resolveReady, rejectReady) => {
      child.stdout.setEncoding("utf8");
      child.stdout.on("data", (chunk) => {
        stdout += chunk;
        const m = stdout.match(READY_RE);
        if (m) resolveReady(m[1]);
      });
      exited.then(({ code, signal, error }) =>
        rejectReady(
          new Error(
            `the test backend (${python} tests/backend/serve.py) exited (code ${code}, signal ${signal}` +
              `${error ? `, ${error.message}` : ""}) before it was ready:\n${stderr}${stdout}`,
          ),
        ),
      );
    }),
    BACKEND_START_TIMEOUT_MS,
    "the test backend to print its ready line",
    () => `--- stderr ---\n${stderr}\n--- stdout ---\n${stdout}`,
  ).catch(async (err) => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    await exited;
    throw err;
  });
  return new Backend(url, child, exited, () => stderr);
}

/** A running backend; every method is one bounded HTTP call to it. */
class Backend {
  constructor(url, child, exited, stderr) {
    this.url = url;
    /** For NEXUS_JOIN_PROXY_URL. */
    this.authorizeUrl = `${url}/nexus/authorize`;
    this.child = child;
    this.exited = exited;
    this.stderr = stderr;
  }

  /** `{status, body}` of one call; `body` is parsed JSON, or null when empty. */
  async call(method, path, body) {
    const res = await fetch(`${this.url}${path}`, {
      method,
      headers: body === undefined ? {} : { "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(CALL_TIMEOUT_MS),
    });
    const text = await res.text();
    return { status: res.status, body: text ? JSON.parse(text) : null };
  }

  /** Like `call`, but anything other than `expected` throws with the answer. */
  async expect(expected, method, path, body) {
    const res = await this.call(method, path, body);
    if (res.status !== expected) {
      throw new Error(`backend ${method} ${path}: ${res.status} ${JSON.stringify(res.body)} (expected ${expected})`);
    }
    return res.body;
  }

  /** Points the backend's server API calls at `server` (a helpers.js server). */
  useNexus(server) {
    return this.expect(200, "PUT", "/test/config", { nexus_url: server.httpUrl });
  }

  addMember(conversation, user) {
    return this.expect(204, "PUT", `/conversations/${conversation}/members/${user}`);
  }

  /**
   * Drops `user` from the table and, unless `notify` is false, removes it on Nexus.
   * Resolves with `{was_member, nexus_status?, nexus_body?}`.
   */
  removeMember(conversation, user, { notify = true } = {}) {
    return this.expect(200, "DELETE", `/conversations/${conversation}/members/${user}?notify=${notify}`);
  }

  /** A 24 h socket token for `user`; `chats: true` lists its conversations in the token. */
  async socketToken(user, { chats = false } = {}) {
    return (await this.expect(200, "POST", `/users/${user}/socket-token?chats=${chats}`)).token;
  }

  /** A join token for (`user`, `conversation`); the backend mints them for members only. */
  async joinToken(user, conversation) {
    return (await this.expect(200, "POST", `/users/${user}/join-token/${conversation}`)).token;
  }

  /** How many times Nexus asked the join proxy about (`user`, `conversation`). */
  async calls(user, conversation) {
    return (await this.expect(200, "GET", `/test/calls?user_id=${user}&conversation_id=${conversation}`)).count;
  }

  /** All join proxy calls: `{total, refused_bearer, pairs}`. */
  allCalls() {
    return this.expect(200, "GET", "/test/calls");
  }

  /** The join proxy's behaviour: "normal" (after `delay_ms`), "slow" (after `slow_ms`), "error" (500). */
  setProxy(mode, { delayMs = 0, slowMs } = {}) {
    const body = { mode, delay_ms: delayMs };
    if (slowMs !== undefined) body.slow_ms = slowMs;
    return this.expect(200, "PUT", "/test/proxy", body);
  }

  /** Posts `payload` (`{sender_id, body}`) on Nexus: `{nexus_status, nexus_body}`. */
  systemMessage(conversation, payload) {
    return this.expect(200, "POST", `/conversations/${conversation}/messages`, payload);
  }

  /** Disconnects every socket of `user` on Nexus: `{nexus_status, nexus_body}`. */
  kick(user) {
    return this.expect(200, "POST", `/users/${user}/kick`);
  }

  async stop() {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill("SIGTERM");
    await withTimeout(this.exited, 5_000, "the test backend to exit").catch(() => this.child.kill("SIGKILL"));
    await this.exited;
  }
}

/**
 * One call to the Nexus server API: `{status, body}` (parsed JSON, null when empty). `key`
 * defaults to API_KEY (`null` sends no Authorization); `rawBody` is sent as is.
 */
export async function nexusApi(server, method, path, { key = API_KEY, body, rawBody } = {}) {
  const headers = {};
  if (key !== null) headers.authorization = `Bearer ${key}`;
  let payload = rawBody;
  if (body !== undefined) payload = JSON.stringify(body);
  if (payload !== undefined) headers["content-type"] = "application/json";
  const res = await fetch(`${server.httpUrl}${path}`, {
    method,
    headers,
    body: payload,
    signal: AbortSignal.timeout(CALL_TIMEOUT_MS),
  });
  const text = await res.text();
  let parsed = null;
  if (text) {
    try {
      parsed = JSON.parse(text);
    } catch {
      parsed = text;
    }
  }
  return { status: res.status, body: parsed };
}
