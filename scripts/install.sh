#!/usr/bin/env bash
# Idempotent install into ./.venv: creates it if missing, (re)installs only when
# pyproject.toml changed since the last successful install.
#   scripts/install.sh          runtime dependencies + the `roadwork` command
#   scripts/install.sh --test   the same plus test-only dependencies (pytest, MAPIE, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
if [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=".venv/.roadwork-installed${extra:+-test}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import roadwork_assets" 2>/dev/null; then
  echo "[install] up to date (.venv)"
  exit 0
fi
echo "[install] installing roadwork_assets${extra} into .venv (first time: several minutes, torch is large)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".${extra}"
echo "$want" > "$stamp"
echo "[install] done"
