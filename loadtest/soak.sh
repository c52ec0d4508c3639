#!/usr/bin/env bash
# The soak: one Nexus node (embedded SQLite) under a realistic mix for a long time, sampled into a
# CSV and plotted (PNG, gnuplot), with pass criteria checked at the end by `nexus-load soak`
# (its module doc, loadtest/src/soak.rs, lists them). Exits non-zero when a check fails.
#
# Usage: loadtest/soak.sh [--duration 60m] [--connections 15000] [--topics 1000] [--large-room 1000]
#          [--rate 100] [--churn 20] [--sample 60s] [--out DIR] [-- more nexus-load soak flags]
# Binaries: NEXUS_BIN and NEXUS_LOAD_BIN (default: release builds of both, built here).
# Loopback only; bounded by --duration (plus ramp-up and a settle of at most 30 s); everything it
# starts is stopped on exit. Needs gnuplot (Debian package gnuplot-nox) for the plot.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DURATION=60m
CONNECTIONS=15000
TOPICS=1000
LARGE=1000
RATE=100
CHURN=20
SAMPLE=60s
OUT=""
EXTRA=()
while [ $# -gt 0 ]; do
  case $1 in
    --duration) DURATION=$2; shift 2 ;;
    --connections) CONNECTIONS=$2; shift 2 ;;
    --topics) TOPICS=$2; shift 2 ;;
    --large-room) LARGE=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --churn) CHURN=$2; shift 2 ;;
    --sample) SAMPLE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "usage: $0 [--duration D] [--connections N] [--topics N] [--large-room N] [--rate N] [--churn N] [--sample D] [--out DIR] [-- flags]" >&2; exit 2 ;;
  esac
done

say() { echo "soak: $*"; }
die() { echo "soak: $*" >&2; exit 1; }
command -v gnuplot >/dev/null || die "gnuplot is missing (Debian package gnuplot-nox)"

if [ -z "${NEXUS_BIN:-}" ] || [ -z "${NEXUS_LOAD_BIN:-}" ]; then
  cargo build --release --quiet -p nexus -p nexus-load --bins
fi
NEXUS_BIN=${NEXUS_BIN:-$REPO/target/release/nexus}
NEXUS_LOAD_BIN=${NEXUS_LOAD_BIN:-$REPO/target/release/nexus-load}
[ -x "$NEXUS_BIN" ] && [ -x "$NEXUS_LOAD_BIN" ] || die "no binaries at $NEXUS_BIN / $NEXUS_LOAD_BIN"
NEXUS_BIN=$(realpath "$NEXUS_BIN") NEXUS_LOAD_BIN=$(realpath "$NEXUS_LOAD_BIN")

# Both processes hold one descriptor per socket.
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -gt $((CONNECTIONS + 200)) ] || die "ulimit -n is $(ulimit -n): too low for $CONNECTIONS connections (tuning.md)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/nexus-soak.XXXXXX")
OUT=${OUT:-$WORK}
mkdir -p "$OUT"
SECRET="nexus-soak-secret-0123456789abcdef0123456789"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  # Without --out the output lives in the work directory: kept when the run failed, to look at.
  if [ "$OUT" != "$WORK" ] || [ "${rc:-1}" = 0 ]; then rm -rf "$WORK"; else say "kept $WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

(
  cd "$WORK"
  exec env PORT=0 NEXUS_BIND=127.0.0.1 NEXUS_DRAIN_SECS=1 JWT_SECRET="$SECRET" \
    DATABASE_PATH="$WORK/nexus.db" RUST_LOG=warn,nexus=info "$NEXUS_BIN" >"$OUT/server.log" 2>&1
) &
SERVER_PID=$!
PORT=""
for _ in $(seq 400); do
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$OUT/server.log" >&2; die "nexus exited at start"; }
  PORT=$(sed 's/\x1b\[[0-9;]*m//g' "$OUT/server.log" | grep -oE 'listening on [^ ]+:[0-9]+' | head -1 | sed -E 's/.*:([0-9]+)$/\1/' || true)
  [ -n "$PORT" ] && break
  sleep 0.05 # waiting for the start-up line, bounded to 20 s
done
[ -n "$PORT" ] || die "nexus did not log \"listening on\""
say "nexus pid $SERVER_PID on 127.0.0.1:$PORT; output in $OUT"

rc=0
"$NEXUS_LOAD_BIN" soak --addr "127.0.0.1:$PORT" --secret "$SECRET" --server-pid "$SERVER_PID" \
  --db "$WORK/nexus.db" --csv "$OUT/soak.csv" --duration "$DURATION" --connections "$CONNECTIONS" \
  --topics "$TOPICS" --large-room "$LARGE" --rate "$RATE" --churn "$CHURN" --sample "$SAMPLE" \
  "${EXTRA[@]}" | tee "$OUT/summary.txt" || rc=$?
kill -0 "$SERVER_PID" 2>/dev/null || { tail -50 "$OUT/server.log" >&2; die "the server died"; }
if grep -qE ' ERROR |panicked' "$OUT/server.log"; then
  grep -E ' ERROR |panicked' "$OUT/server.log" | head -20 >&2
  die "the server logged an error"
fi

[ "$(wc -l <"$OUT/soak.csv" 2>/dev/null || echo 0)" -ge 2 ] || die "no samples: nexus-load soak stopped early"

# The plot: memory and descriptors, load, queues, storage, latency; minutes on the x axis.
gnuplot <<GNUPLOT || die "gnuplot failed"
set datafile separator ","
set terminal pngcairo size 1400,1000 font ",10"
set output "$OUT/soak.png"
set multiplot layout 3,2 title "Nexus soak: $CONNECTIONS connections, $RATE msg/s, $CHURN churn/s"
set key top left
set xlabel "minutes"
set grid
set title "server memory (MiB) and descriptors"
set ytics nomirror
set y2tics
plot "$OUT/soak.csv" using (\$1/60):(\$2/1048576) skip 1 with lines title "RSS MiB (interval mean)", \
     "" using (\$1/60):(\$16/1048576) skip 1 with lines title "RSS MiB (interval highest)", \
     "" using (\$1/60):(\$15/1048576) skip 1 with lines title "SQLite heap MiB", \
     "" using (\$1/60):(\$17/1048576) skip 1 with lines title "heap in use MiB (malloc)", \
     "" using (\$1/60):3 skip 1 axes x1y2 with lines title "fds (right)"
unset y2tics
set title "connections"
plot "$OUT/soak.csv" using (\$1/60):4 skip 1 with lines title "connections"
set title "queues"
plot "$OUT/soak.csv" using (\$1/60):5 skip 1 with lines title "writer queue", \
     "" using (\$1/60):6 skip 1 with lines title "mailboxes", \
     "" using (\$1/60):(\$7/1024) skip 1 with lines title "outbox KiB"
set title "database and WAL (MiB)"
plot "$OUT/soak.csv" using (\$1/60):(\$8/1048576) skip 1 with lines title "database", \
     "" using (\$1/60):(\$9/1048576) skip 1 with lines title "WAL"
set title "p99 per interval (ms)"
plot "$OUT/soak.csv" using (\$1/60):10 skip 1 with lines title "ack", \
     "" using (\$1/60):11 skip 1 with lines title "end to end"
set title "acknowledged messages"
plot "$OUT/soak.csv" using (\$1/60):12 skip 1 with lines title "acked (cumulative)"
unset multiplot
GNUPLOT
say "plot: $OUT/soak.png, samples: $OUT/soak.csv"
[ "$rc" -eq 0 ] && say "PASS" || say "FAIL"
exit "$rc"
