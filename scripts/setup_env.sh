#!/usr/bin/env bash
# Create/refresh the project's virtual environment (.venv) on a fresh machine.
# CPU by default: torch 2.13.0 (CPU build) + megatron-core 0.16.1 pinned in constraints-cpu.txt,
# installed in ONE pip command (otherwise pip pulls a multi-GB CUDA torch).
# Re-running is cheap: nothing is reinstalled unless pyproject.toml or the constraints changed.
# Usage: bash scripts/setup_env.sh [extras]   (default extras: test)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-test}"
PY="${PYTHON:-python3}"
VENV="${REMOE_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.remoe-installed"
want="$(cat pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-16)-$EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing torch + megatron-core (pinned) and megatron-remoe[$EXTRAS]"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c constraints-cpu.txt \
      torch==2.13.0 megatron-core==0.16.1 -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi
