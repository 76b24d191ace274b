#!/usr/bin/env bash
# CI's newest lane: Python 3.12 + the newest tested megatron-core (constraints-newest.txt) in
# .venv312, running the core subset (the tests marked `core`) and the README's commands (marked
# `readme`: tests/package/test_readme_commands.py, run with this environment's remoe/python/torchrun).
# Extra arguments go to pytest. Fails loudly when no Python 3.12 is found (scripts/find_python.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
REMOE_LANE=newest bash scripts/setup_env.sh test
echo "[newest lane] environment ready in $((SECONDS - start))s"
export OMP_NUM_THREADS=1
VENV="${REMOE_VENV:-.venv312}"
echo "[newest lane] $("$VENV/bin/python" --version), megatron-core $("$VENV/bin/python" -c \
  'import importlib.metadata as m; print(m.version("megatron-core"))')"
exec "$VENV/bin/python" -m pytest -q --durations=30 -m "core or readme" -W ignore::UserWarning \
  -W ignore::DeprecationWarning -W ignore::FutureWarning "$@"
