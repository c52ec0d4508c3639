#!/usr/bin/env bash
# Creates (or refreshes) the Python venv of the test app backend (tests/backend/app.py) and
# prints the path of its python on stdout; everything else goes to stderr.
#
# The venv lives in NEXUS_BACKEND_HOME (default ~/.cache/nexus-backend). It is reused while
# requirements.txt is unchanged (a stamp file holds the hash it was installed from) and rebuilt
# from PyPI otherwise. python3-venv comes from apt-get when the box lacks it (as tests/k6_smoke.sh).
# Any failure exits non-zero naming what is missing; the JS tests then fail the same way.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REQUIREMENTS="$HERE/requirements.txt"
BACKEND_HOME="${NEXUS_BACKEND_HOME:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/nexus-backend}"
VENV="$BACKEND_HOME/venv"
STAMP="$BACKEND_HOME/requirements.sha256"
PY="$VENV/bin/python"

say() { echo "tests/backend/venv.sh: $*" >&2; }
die() { say "$*"; exit 1; }

want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [ -x "$PY" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ] \
  && "$PY" -c 'import fastapi, uvicorn, jwt' >/dev/null 2>&1; then
  echo "$PY"
  exit 0
fi

say "installing the test backend's packages (fastapi, uvicorn, pyjwt) into $VENV"
rm -rf "$VENV" "$STAMP"
mkdir -p "$BACKEND_HOME"
if ! command -v python3 >/dev/null || ! python3 -m venv "$VENV" >/dev/null 2>&1; then
  # Debian's python3 needs python3-venv for `python3 -m venv` (ensurepip).
  command -v apt-get >/dev/null || die "python3 with the venv module is required (Debian: python3-venv)"
  say "installing python3, python3-venv and python3-pip with apt-get"
  apt-get update -qq >&2 && apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2 || die "python3 -m venv failed (Debian: python3-venv)"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQUIREMENTS" >&2 \
  || die "pip could not install $REQUIREMENTS (fastapi, uvicorn, pyjwt) from PyPI"
for pair in fastapi:fastapi uvicorn:uvicorn jwt:pyjwt; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null || die "the venv lacks the Python package ${pair#*:}"
done
echo "$want" >"$STAMP"
echo "$PY"
