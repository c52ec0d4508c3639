#!/usr/bin/env bash
# The cost of the cluster path, next to the SQLite single node, in one run on one box.
#
# Starts its own PostgreSQL (fsync and synchronous_commit on) and Redis in a temporary
# directory, then, for the SQLite single node and for 1, 2 and 3 cluster nodes
# (NEXUS_WORKERS=1 each, clients spread over the nodes), runs
#   - nexus-load persist: senders in rooms of their own (the persisted path: msg/s, ack p50/p99),
#   - nexus-load fanout: members of each room spread over every node (deliveries/s, loss, order),
# and reports CPU µs per persisted message and per delivery summed over every process: the
# nodes, Redis, PostgreSQL (every backend) and the load generator.
#
# On a 2-vCPU box every process shares the same two CPUs, so more nodes cannot show more
# throughput: the per-message cost is the figure that predicts scale on real hardware.
#
# Usage: loadtest/cluster.sh [--duration SECS] [--runs N] [--nodes "1 2 3"]
# Loopback only; every run is bounded by --duration; everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=10
RUNS=3
NODES="1 2 3"
while [ $# -gt 0 ]; do
  case $1 in
    --duration) DURATION=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --nodes) NODES=$2; shift 2 ;;
    *) echo "usage: $0 [--duration SECS] [--runs N] [--nodes \"1 2 3\"]" >&2; exit 2 ;;
  esac
done

SECRET=cluster-bench-secret-0123456789abcdef0123456789
PERSIST="--senders 20 --window 64"
FANOUT="--members 2000 --topics 20 --senders 20 --window 8 --warmup 2"
BASE_PORT=4710
PG_PORT=5499

cargo build --release --quiet -p nexus --bin nexus && cargo build --release --quiet -p nexus-load
BIN=$PWD/target/release

PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$PG_BIN/initdb" ] || { echo "$0: PostgreSQL is missing (Debian package postgresql)" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "$0: redis-server is missing (Debian package redis-server)" >&2; exit 1; }

WORK=$(mktemp -d /tmp/nexus-cluster-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# initdb refuses root: run PostgreSQL as the postgres user then.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
mkdir -p "$WORK/pg"
[ "$(id -u)" = 0 ] && chown postgres "$WORK" "$WORK/pg"
as_pg "$PG_BIN/initdb" -A trust -U nexus -D "$WORK/pg/data" >/dev/null
as_pg "$PG_BIN/postgres" -D "$WORK/pg/data" -k "$WORK/pg" -p $PG_PORT -c listen_addresses='' \
  -c fsync=on -c synchronous_commit=on -c shared_buffers=512MB -c max_wal_size=4GB >"$WORK/pg.log" 2>&1 &
PG_PID=$!
PIDS+=($PG_PID)
redis-server --port 0 --unixsocket "$WORK/redis.sock" --save '' --appendonly no --dir "$WORK" >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=($REDIS_PID)
for _ in $(seq 100); do
  [ -S "$WORK/pg/.s.PGSQL.$PG_PORT" ] && [ -S "$WORK/redis.sock" ] && break
  sleep 0.1 # polling for the sockets to appear, bounded to 10 s
done
psql() { "$PG_BIN/psql" -q -h "$WORK/pg" -p $PG_PORT -U nexus -d postgres "$@"; }

# The postmaster (under runuser when root) and every backend it forked.
pg_pids() {
  local postmaster
  postmaster=$(head -1 "$WORK/pg/data/postmaster.pid")
  echo "$postmaster $(pgrep -P "$postmaster" | tr '\n' ' ')"
}

# start_nodes MODE N: MODE sqlite (one node) or cluster; sets NODE_PIDS and ADDRS.
start_nodes() {
  local mode=$1 n=$2 i db env
  MODE=$mode
  NODE_PIDS=()
  ADDRS=""
  db=b$RANDOM$RANDOM
  [ "$mode" = cluster ] && psql -c "create database $db"
  for i in $(seq 0 $((n - 1))); do
    local port=$((BASE_PORT + i))
    env=(PORT=$port NEXUS_BIND=127.0.0.1 JWT_SECRET=$SECRET NEXUS_WORKERS=1 NEXUS_MSG_RATE=0 RUST_LOG=warn)
    if [ "$mode" = cluster ]; then
      env+=("NEXUS_DATABASE_URL=postgresql://nexus@/$db?host=$WORK/pg&port=$PG_PORT"
        "NEXUS_REDIS_URL=unix://$WORK/redis.sock" "NEXUS_REDIS_PREFIX=$db:" "NEXUS_NODE_ID=node-$i")
    else
      rm -f "$WORK/single.db"*
      env+=("DATABASE_PATH=$WORK/single.db")
    fi
    env -i PATH="$PATH" "${env[@]}" "$BIN/nexus" 2>>"$WORK/nodes.log" &
    NODE_PIDS+=($!)
    PIDS+=($!)
    ADDRS+="${ADDRS:+,}127.0.0.1:$port"
  done
  for i in $(seq 0 $((n - 1))); do
    for _ in $(seq 100); do
      (echo >/dev/tcp/127.0.0.1/$((BASE_PORT + i))) 2>/dev/null && break
      sleep 0.1 # polling for the port to open, bounded to 10 s
    done
  done
}

# A short unmeasured run first: the nodes' database connections open on first use, and a
# backend that starts during a measured run would be missing from the CPU sum.
warm_up() {
  "$BIN/nexus-load" persist --addr "$ADDRS" --secret $SECRET --senders 20 --window 8 --duration 2 --json >/dev/null
}

stop_nodes() {
  local pid
  for pid in "${NODE_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
}

# measure SCENARIO ARGS...: one nexus-load run, with the CPU of every server process (the
# nodes, Redis, every PostgreSQL process) summed by nexus-load over its measured window, and
# the load generator's own CPU.
measure() {
  local scenario=$1; shift
  local pids out before after
  if [ "$MODE" = cluster ]; then
    pids=$(echo "${NODE_PIDS[@]}" $REDIS_PID $(pg_pids) | tr -s ' ' ',')
  else
    pids=$(echo "${NODE_PIDS[@]}" | tr -s ' ' ',')
  fi
  before=$(split_ticks)
  out=$(/usr/bin/time -f "%U %S" -o "$WORK/time" "$BIN/nexus-load" "$scenario" --addr "$ADDRS" --secret $SECRET \
    --duration "$DURATION" --server-pid "$pids" --json "$@")
  after=$(split_ticks)
  python3 - "$out" "$(cat "$WORK/time")" "$before" "$after" <<'PY'
import json, sys
x = json.loads(sys.argv[1])
x["load_cpu_s"] = sum(map(float, sys.argv[2].split()))
# CPU seconds of the nodes, Redis and PostgreSQL over the whole nexus-load run.
x["split_cpu_s"] = [(j - i) / 100 for i, j in zip(map(int, sys.argv[3].split()), map(int, sys.argv[4].split()))]
print(json.dumps(x))
PY
}

# CPU ticks (utime + stime) of the nodes, Redis and PostgreSQL, as three numbers.
split_ticks() {
  local group sum pid
  for group in "${NODE_PIDS[*]}" "$REDIS_PID" "$(pg_pids)"; do
    sum=0
    for pid in $group; do sum=$((sum + $(awk '{print $14+$15}' "/proc/$pid/stat" 2>/dev/null || echo 0))); done
    printf '%s ' $sum
  done
}

RESULTS=$WORK/results.jsonl
: >"$RESULTS"
configs=("sqlite 1")
for n in $NODES; do configs+=("cluster $n"); done
for run in $(seq "$RUNS"); do
  for config in "${configs[@]}"; do
    set -- $config
    start_nodes "$1" "$2"
    warm_up
    p=$(measure persist $PERSIST)
    f=$(measure fanout $FANOUT)
    stop_nodes
    echo "{\"run\":$run,\"mode\":\"$1\",\"nodes\":$2,\"persist\":$p,\"fanout\":$f}" >>"$RESULTS"
    echo "run $run: $1 x$2 done" >&2
  done
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
RUNS = max(r["run"] for r in rows)
med = statistics.median
print("| setup | persisted msg/s | ack p50 / p99 ms | CPU µs per persisted msg (servers + load) | deliveries/s "
      "| lost / order violations | e2e p99 ms | CPU µs per delivery (servers + load) |")
print("|---|---|---|---|---|---|---|---|")
for key in sorted({(r["mode"], r["nodes"]) for r in rows}, key=lambda k: (k[0] != "sqlite", k[1])):
    rs = [r for r in rows if (r["mode"], r["nodes"]) == key]
    p = [r["persist"] for r in rs]
    f = [r["fanout"] for r in rs]
    name = "SQLite, 1 node" if key[0] == "sqlite" else f"cluster, {key[1]} node{'s' if key[1] > 1 else ''}"
    persist_cpu = [x["server_cpu_us_per_msg"] for x in p]
    persist_load = [x["load_cpu_s"] * 1e6 / max(x["acked"], 1) for x in p]
    print(f"| {name} | {med(x['acks_per_s'] for x in p):.0f} | {med(x['ack_ms_p50'] for x in p):.1f} / "
          f"{med(x['ack_ms_p99'] for x in p):.1f} | {med(persist_cpu):.1f} + {med(persist_load):.1f} | "
          f"{med(x['deliveries_per_s'] for x in f):.0f} | {sum(x['lost'] for x in f)} / "
          f"{sum(x['order_violations'] for x in f)} | {med(x['e2e_ms_p99'] for x in f):.1f} | "
          f"{med(x['server_cpu_us_per_delivery'] for x in f):.2f} + {med(x['client_cpu_us_per_delivery'] for x in f):.2f} |")
print("\nPersisted path, CPU µs per message by process (nodes / Redis / PostgreSQL):")
for key in sorted({(r["mode"], r["nodes"]) for r in rows if r["mode"] == "cluster"}, key=lambda k: k[1]):
    p = [r["persist"] for r in rows if (r["mode"], r["nodes"]) == key]
    split = [med(x["split_cpu_s"][i] * 1e6 / max(x["acked"], 1) for x in p) for i in range(3)]
    print(f"- {key[1]} node{'s' if key[1] > 1 else ''}: " + " / ".join(f"{v:.1f}" for v in split))
print(f"\n{RUNS} runs per setup; medians over runs; lost and order violations summed over runs. Servers: every "
      "node, Redis and every PostgreSQL process (the SQLite row: the node alone).")
PY
