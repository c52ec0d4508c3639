#!/usr/bin/env bash
# Crash loop (issue 17, item 2): for N rounds, run Nexus under load, SIGKILL it (or, in cluster
# mode, one node, Redis or PostgreSQL) at a random moment, start it again on the same data and
# check that nothing acknowledged was lost or duplicated.
#
# Every round: `nexus-load persist --acked-log` sends closed-loop `new_msg`s into the same
# conversations (`--seed`: the same ids every round) and logs every acknowledged message;
# after 0.5..--max-kill-secs s the victim gets SIGKILL (PostgreSQL: its whole process group,
# postmaster and backends at once); the victim starts again (start-up time: spawn → `GET
# /healthz` answers 200 for a node, `pg_isready` for PostgreSQL, `PING` for Redis); then
# `nexus-load verify` reads the database and checks, against every round's acked log so far:
# each acknowledged message is stored exactly once (none lost, none twice, none under two ids),
# in every conversation ids and `inserted_at` increase together and every round's messages sort
# after the earlier rounds' (ids keep increasing across restarts), SQLite's `integrity_check`
# is ok. SQLite: the WAL the killed server left (its size is recorded) must be recovered at the
# next start, or the acked messages in it would be missing. Acks may fail while a victim is
# down (cluster mode: `storage unavailable`); only acknowledged messages must be stored.
#
# Fails (exit 1) when a check fails, a server does not come back, a survivor dies, a panic is
# logged, or start-up time grows unbounded: per victim kind, the last start-up taking more than
# 10x the first and more than 2 s (the database grows every round; a start-up that scans it
# all would cross this long before it hurts in production).
#
# Usage: loadtest/crashloop.sh [--rounds N] [--mode single|cluster] [--seed S] [--out DIR]
#          [--max-kill-secs S] [--senders N] [--rate MSGS_PER_S] [--keep]
# Binaries: NEXUS_BIN and NEXUS_LOAD_BIN (default target/release/{nexus,nexus-load}, built
# first when neither is set). Loopback only; bounded (every wait has a deadline); everything it
# starts is killed on exit. Writes OUT/crashloop.csv (one row per start) and OUT/summary.txt;
# the databases and acked logs live in a temp dir, removed on success unless --keep.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

ROUNDS=20
MODE=single
SEED=$(( $(date +%s) % 1000000 ))
OUT=""
MAX_KILL_S=4
SENDERS=16
RATE=0
KEEP=0
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --mode) MODE=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --max-kill-secs) MAX_KILL_S=$2; shift 2 ;;
    --senders) SENDERS=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "usage: $0 [--rounds N] [--mode single|cluster] [--seed S] [--out DIR] [--max-kill-secs S]" \
      "[--senders N] [--rate MSGS_PER_S] [--keep]" >&2; exit 2 ;;
  esac
done
case $MODE in single | cluster) ;; *) echo "$0: --mode is single or cluster" >&2; exit 2 ;; esac
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -ge 1 && $ROUNDS -le 1000 ]] || { echo "$0: --rounds 1..1000" >&2; exit 2; }
[[ $SEED =~ ^[0-9]+$ ]] || { echo "$0: --seed is a number" >&2; exit 2; }
[[ $MAX_KILL_S =~ ^[0-9]+$ && $MAX_KILL_S -ge 1 && $MAX_KILL_S -le 600 ]] || { echo "$0: --max-kill-secs 1..600" >&2; exit 2; }

say() { echo "crashloop: $*"; }

if [ -z "${NEXUS_BIN:-}" ] && [ -z "${NEXUS_LOAD_BIN:-}" ]; then
  say "building release binaries"
  cargo build --release --quiet -p nexus -p nexus-load --bins
fi
NEXUS_BIN=${NEXUS_BIN:-$REPO/target/release/nexus}
NEXUS_LOAD_BIN=${NEXUS_LOAD_BIN:-$REPO/target/release/nexus-load}
for b in "$NEXUS_BIN" "$NEXUS_LOAD_BIN"; do [ -x "$b" ] || { echo "$0: no binary $b" >&2; exit 1; }; done
if [ "$MODE" = cluster ]; then
  PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -x "$PG_BIN/initdb" ] || { echo "$0: PostgreSQL is missing (Debian package postgresql)" >&2; exit 1; }
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null ||
    { echo "$0: redis-server and redis-cli are missing (Debian package redis-server)" >&2; exit 1; }
fi

OUT=${OUT:-$(mktemp -d /tmp/nexus-crashloop-out.XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/nexus-crashloop.XXXXXX)
mkdir -p "$WORK/logs" "$WORK/acked"
SECRET=crashloop-secret-0123456789abcdef0123456789
START_TIMEOUT_S=${NEXUS_START_TIMEOUT_S:-60}
RANDOM=$SEED
FAILED=0
PIDS=()

cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  [ -n "${PG_PGID:-}" ] && kill -KILL -- "-$PG_PGID" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ "$FAILED" = 0 ] && [ "$KEEP" = 0 ]; then
    rm -rf "$WORK"
  else
    echo "crashloop: data, acked logs and server logs kept in $WORK" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
  FAILED=1
  echo "crashloop: FAIL: $*" >&2
  exit 1
}

now_ms() { date +%s%3N; }

# ---------------------------------------------------------------------------------------------
# Processes

NODES=1
[ "$MODE" = cluster ] && NODES=2
NODE_PID=()
NODE_PORT=()
STARTS=0
PG_PORT=5497
PG_URL="postgresql://nexus@/crashloop?host=$WORK/pg&port=$PG_PORT"

# start_node I: starts node I and waits until /healthz answers; sets STARTUP_MS.
start_node() {
  local i=$1 log t0 port="" deadline
  STARTS=$((STARTS + 1))
  log=$WORK/logs/node$i.start$STARTS.log
  local env=(PORT=0 NEXUS_BIND=127.0.0.1 JWT_SECRET=$SECRET NEXUS_MSG_RATE=0 NEXUS_DRAIN_SECS=1 RUST_LOG=info)
  if [ "$MODE" = cluster ]; then
    env+=(NEXUS_WORKERS=1 "NEXUS_DATABASE_URL=$PG_URL" "NEXUS_REDIS_URL=unix://$WORK/redis.sock"
      "NEXUS_NODE_ID=node-$i" NEXUS_NODE_TIMEOUT=3)
  else
    env+=("DATABASE_PATH=$WORK/nexus.db")
  fi
  t0=$(now_ms)
  env -i PATH="$PATH" "${env[@]}" "$NEXUS_BIN" >"$log" 2>&1 &
  NODE_PID[i]=$!
  PIDS+=($!)
  deadline=$((SECONDS + START_TIMEOUT_S))
  while :; do
    kill -0 "${NODE_PID[i]}" 2>/dev/null || { tail -20 "$log" >&2; fail "node $i exited during start-up ($log)"; }
    [ "$SECONDS" -lt "$deadline" ] || { tail -20 "$log" >&2; fail "node $i not ready in ${START_TIMEOUT_S}s"; }
    if [ -z "$port" ]; then
      port=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -oE 'listening on [^ ]+:[0-9]+' | head -1 | sed -E 's/.*:([0-9]+)$/\1/' || true)
    fi
    if [ -n "$port" ] && curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$port/healthz"; then
      break
    fi
    sleep 0.01
  done
  STARTUP_MS=$(($(now_ms) - t0))
  NODE_PORT[i]=$port
}

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# start_pg: starts PostgreSQL in its own process group (so a SIGKILL takes the postmaster and
# every backend at once, like a machine crash) and waits until it accepts connections.
start_pg() {
  local t0 deadline
  t0=$(now_ms)
  setsid bash -c 'if [ "$(id -u)" = 0 ]; then exec runuser -u postgres -- "$@"; else exec "$@"; fi' _ \
    "$PG_BIN/postgres" -D "$WORK/pg/data" -k "$WORK/pg" -p $PG_PORT -c listen_addresses='' \
    -c fsync=on -c synchronous_commit=on -c shared_buffers=256MB -c max_wal_size=1GB \
    >>"$WORK/logs/pg.log" 2>&1 &
  PG_PGID=$!
  PIDS+=($!)
  deadline=$((SECONDS + START_TIMEOUT_S))
  until "$PG_BIN/pg_isready" -q -h "$WORK/pg" -p $PG_PORT -d postgres -U nexus; do
    kill -0 "$PG_PGID" 2>/dev/null || { tail -20 "$WORK/logs/pg.log" >&2; fail "PostgreSQL exited during start-up"; }
    [ "$SECONDS" -lt "$deadline" ] || fail "PostgreSQL not ready in ${START_TIMEOUT_S}s"
    sleep 0.01
  done
  STARTUP_MS=$(($(now_ms) - t0))
}

start_redis() {
  local t0 deadline
  rm -f "$WORK/redis.sock"
  t0=$(now_ms)
  redis-server --port 0 --unixsocket "$WORK/redis.sock" --save '' --appendonly no --dir "$WORK" \
    >>"$WORK/logs/redis.log" 2>&1 &
  REDIS_PID=$!
  PIDS+=($!)
  deadline=$((SECONDS + START_TIMEOUT_S))
  until [ -S "$WORK/redis.sock" ] && [ "$(redis-cli -s "$WORK/redis.sock" ping 2>/dev/null)" = PONG ]; do
    kill -0 "$REDIS_PID" 2>/dev/null || fail "redis-server exited during start-up"
    [ "$SECONDS" -lt "$deadline" ] || fail "redis-server not ready in ${START_TIMEOUT_S}s"
    sleep 0.01
  done
  STARTUP_MS=$(($(now_ms) - t0))
}

# kill_victim VICTIM: SIGKILL and reap it.
kill_victim() {
  local deadline
  case $1 in
    node*)
      kill -KILL "${NODE_PID[${1#node}]}"
      wait "${NODE_PID[${1#node}]}" 2>/dev/null || true
      ;;
    redis)
      kill -KILL "$REDIS_PID"
      wait "$REDIS_PID" 2>/dev/null || true
      ;;
    postgres)
      kill -KILL -- "-$PG_PGID"
      wait "$PG_PGID" 2>/dev/null || true
      deadline=$((SECONDS + 10))
      while pgrep -g "$PG_PGID" >/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done
      ;;
  esac
}

restart_victim() {
  case $1 in
    node*) start_node "${1#node}" ;;
    redis) start_redis ;;
    postgres) start_pg ;;
  esac
}

# Database and WAL bytes (SQLite: the file and its -wal; PostgreSQL: the database and pg_wal).
db_sizes() {
  if [ "$MODE" = single ]; then
    echo "$(stat -c %s "$WORK/nexus.db" 2>/dev/null || echo 0) $(stat -c %s "$WORK/nexus.db-wal" 2>/dev/null || echo 0)"
  else
    echo "$(du -sb "$WORK/pg/data/base" | cut -f1) $(du -sb "$WORK/pg/data/pg_wal" | cut -f1)"
  fi
}

# survivors ROUND VICTIM: everything but the victim is still up (cluster: the other node,
# Redis and PostgreSQL ride out the victim's outage).
survivors() {
  local i
  for i in $(seq 0 $((NODES - 1))); do
    [ "$2" = "node$i" ] || kill -0 "${NODE_PID[i]}" 2>/dev/null ||
      fail "round $1: node $i died while $2 was down (log: $(ls -t "$WORK"/logs/node$i.start*.log | head -1))"
  done
  [ "$MODE" = single ] && return 0
  [ "$2" = redis ] || kill -0 "$REDIS_PID" 2>/dev/null || fail "round $1: redis-server died while $2 was down"
  [ "$2" = postgres ] || kill -0 "$PG_PGID" 2>/dev/null || fail "round $1: PostgreSQL died while $2 was down"
}

addrs() {
  local i a=""
  for i in $(seq 0 $((NODES - 1))); do a+="${a:+,}127.0.0.1:${NODE_PORT[i]}"; done
  echo "$a"
}

# verify: every round's acked log so far against the database.
verify() {
  local args=() r
  for r in $(seq 1 "$1"); do args+=(--acked "$WORK/acked/r$r.log"); done
  if [ "$MODE" = single ]; then args+=(--db "$WORK/nexus.db"); else args+=(--postgres "$PG_URL"); fi
  timeout 600 "$NEXUS_LOAD_BIN" verify "${args[@]}" --json >"$WORK/logs/verify.r$1.out" 2>"$WORK/logs/verify.r$1.err" || {
    cat "$WORK/logs/verify.r$1.out" "$WORK/logs/verify.r$1.err" >&2
    fail "round $1: verify failed (database: $([ "$MODE" = single ] && echo "$WORK/nexus.db" || echo "$PG_URL"))"
  }
}

json_field() { grep -oE "\"$1\":[0-9.]+" "$2" | head -1 | cut -d: -f2; }

# ---------------------------------------------------------------------------------------------
# Rounds

CSV=$OUT/crashloop.csv
echo "round,victim,kill_after_ms,acked,errors,acked_total,db_bytes,wal_bytes_at_kill,startup_ms,verify_ms,stored_not_acked" >"$CSV"
say "mode $MODE, $ROUNDS rounds, seed $SEED, kill after 0.5..${MAX_KILL_S}s, $SENDERS senders; out $OUT"
say "nexus $NEXUS_BIN, nexus-load $NEXUS_LOAD_BIN"

if [ "$MODE" = cluster ]; then
  mkdir -p "$WORK/pg"
  [ "$(id -u)" = 0 ] && chown postgres "$WORK" "$WORK/pg"
  as_pg "$PG_BIN/initdb" -A trust -U nexus -D "$WORK/pg/data" >"$WORK/logs/initdb.log" 2>&1 || fail "initdb failed"
  start_pg
  echo "0,postgres,,,,,,,$STARTUP_MS,," >>"$CSV"
  "$PG_BIN/psql" -q -h "$WORK/pg" -p $PG_PORT -U nexus -d postgres -c "create database crashloop"
  start_redis
  echo "0,redis,,,,,,,$STARTUP_MS,," >>"$CSV"
fi
for i in $(seq 0 $((NODES - 1))); do
  start_node "$i"
  echo "0,node$i,,,,,,,$STARTUP_MS,," >>"$CSV"
done

ACKED_TOTAL=0
LOAD_SECS=$((MAX_KILL_S + 3))
began=$SECONDS
for r in $(seq 1 "$ROUNDS"); do
  if [ "$MODE" = single ]; then
    victim=node0
  else
    case $((RANDOM % 3)) in
      0) victim=node$((RANDOM % NODES)) ;;
      1) victim=redis ;;
      2) victim=postgres ;;
    esac
  fi
  kill_ms=$((500 + (RANDOM * 32768 + RANDOM) % (MAX_KILL_S * 1000 - 500)))
  rate_args=()
  [ "$RATE" != 0 ] && rate_args=(--rate "$RATE")
  timeout $((LOAD_SECS + 60)) "$NEXUS_LOAD_BIN" persist --addr "$(addrs)" --secret "$SECRET" --senders "$SENDERS" \
    --topics $((SENDERS * 4)) --seed "$SEED" --window 8 "${rate_args[@]}" --duration "$LOAD_SECS" \
    --acked-log "$WORK/acked/r$r.log" --until-server-dies --json >"$WORK/logs/persist.r$r.out" 2>&1 &
  LOAD_PID=$!
  sleep "$(printf '%d.%03d' $((kill_ms / 1000)) $((kill_ms % 1000)))"
  kill_victim "$victim"
  read -r db_bytes wal_bytes < <(db_sizes)
  # Single node: the load ends as the server goes away; cluster: it runs on with the survivors.
  if ! wait "$LOAD_PID"; then
    cat "$WORK/logs/persist.r$r.out" >&2
    fail "round $r: nexus-load persist failed"
  fi
  survivors "$r" "$victim"
  touch "$WORK/acked/r$r.log"
  acked=$(json_field acked "$WORK/logs/persist.r$r.out")
  errors=$(json_field errors "$WORK/logs/persist.r$r.out")
  ACKED_TOTAL=$((ACKED_TOTAL + acked))
  restart_victim "$victim"
  startup=$STARTUP_MS
  t0=$(now_ms)
  verify "$r"
  verify_ms=$(($(now_ms) - t0))
  stored_not_acked=$(json_field stored_not_acked "$WORK/logs/verify.r$r.out")
  echo "$r,$victim,$kill_ms,$acked,$errors,$ACKED_TOTAL,$db_bytes,$wal_bytes,$startup,$verify_ms,$stored_not_acked" >>"$CSV"
  say "round $r: $victim killed after ${kill_ms} ms, $acked acked ($errors errors), db $db_bytes B + wal $wal_bytes B," \
    "back in $startup ms, verified ${ACKED_TOTAL} acked in $verify_ms ms"
done

# Panics in any server log fail the run (errors are expected while a victim is down).
if grep -l 'panicked' "$WORK"/logs/node*.log >/dev/null 2>&1; then
  grep -h 'panicked' "$WORK"/logs/node*.log | head -5 >&2
  fail "a node panicked"
fi

python3 - "$CSV" "$MODE" "$ROUNDS" "$((SECONDS - began))" >"$OUT/summary.txt" <<'PY' || FAILED=1
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
mode, rounds, secs = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
kind = lambda v: "node" if v.startswith("node") else v
done = [r for r in rows if r["round"] != "0"]
print(f"crash loop, {mode} mode: {rounds} rounds in {secs} s, {done[-1]['acked_total']} acknowledged messages, "
      f"all stored exactly once")
print(f"largest database: {max(int(r['db_bytes']) for r in done) / 1e6:.1f} MB "
      f"(+ WAL at the kill up to {max(int(r['wal_bytes_at_kill']) for r in done) / 1e6:.1f} MB)")
print()
print("| victim | kills | start-up ms min / median / max | first start | last start |")
print("|---|---|---|---|---|")
bad = []
for k in sorted({kind(r["victim"]) for r in rows}):
    starts = [int(r["startup_ms"]) for r in rows if kind(r["victim"]) == k]
    kills = sum(1 for r in done if kind(r["victim"]) == k)
    print(f"| {k} | {kills} | {min(starts)} / {statistics.median(starts):.0f} / {max(starts)} | {starts[0]} | {starts[-1]} |")
    if starts[-1] > 10 * starts[0] and starts[-1] > 2000:
        bad.append(f"{k}: last start-up {starts[-1]} ms > 10x the first ({starts[0]} ms) and > 2 s")
print()
print("| round | victim | killed after ms | acked | errors | db MB | WAL at kill MB | start-up ms | verify ms |")
print("|---|---|---|---|---|---|---|---|---|")
for r in done:
    print(f"| {r['round']} | {r['victim']} | {r['kill_after_ms']} | {r['acked']} | {r['errors']} | "
          f"{int(r['db_bytes']) / 1e6:.1f} | {int(r['wal_bytes_at_kill']) / 1e6:.1f} | {r['startup_ms']} | {r['verify_ms']} |")
for b in bad:
    print(f"FAIL: start-up time unbounded: {b}")
sys.exit(1 if bad else 0)
PY
cat "$OUT/summary.txt"
[ "$FAILED" = 0 ] || fail "start-up time grew unbounded (see above)"
say "ok: $OUT/crashloop.csv, $OUT/summary.txt"
