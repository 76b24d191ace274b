#!/usr/bin/env bash
# Create/refresh a virtual environment of the project on a fresh machine.
#
# Default (CI's pinned lane): .venv with Python 3.11, torch 2.13.0 (CPU build) + megatron-core 0.16.1
# pinned in constraints-cpu.txt, installed in ONE pip command (otherwise pip pulls a multi-GB CUDA
# torch).
# Newest lane: REMOE_LANE=newest -> .venv312 with Python 3.12 (scripts/find_python.sh) and the pins
# of constraints-newest.txt (megatron-core 0.17+ needs Python >= 3.12; for 3.12 the package index
# has only the CUDA build of torch 2.13.0, ~4 GB with its nvidia-* wheels, which runs on CPU).
# Re-running is cheap: nothing is reinstalled unless pyproject.toml or the constraints changed.
# pip keeps its download cache (~/.cache/pip), so a second fresh install of a lane downloads nothing.
#
# Usage: bash scripts/setup_env.sh [extras]   (default extras: test)
# env: REMOE_LANE=pinned|newest, PYTHON (interpreter), REMOE_VENV (directory)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-test}"
LANE="${REMOE_LANE:-pinned}"
case "$LANE" in
  pinned) CONSTRAINTS=constraints-cpu.txt; DEFAULT_VENV=.venv; PY="${PYTHON:-python3}" ;;
  newest) CONSTRAINTS=constraints-newest.txt; DEFAULT_VENV=.venv312
          PY="${PYTHON:-$(bash scripts/find_python.sh 3.12)}" ;;
  *) echo "error: REMOE_LANE=$LANE is not pinned or newest" >&2; exit 2 ;;
esac
VENV="${REMOE_VENV:-$DEFAULT_VENV}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.remoe-installed"
want="$(cat pyproject.toml "$CONSTRAINTS" | sha256sum | cut -c1-16)-$EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pins="$(grep -E '^(torch|megatron-core)==' "$CONSTRAINTS" | tr '\n' ' ')"
  echo "[setup] installing $pins(from $CONSTRAINTS) and megatron-remoe[$EXTRAS] into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" $pins -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi
