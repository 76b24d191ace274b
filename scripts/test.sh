#!/usr/bin/env bash
# Set up the environment if needed, then run the CPU test suite (gloo, no GPU needed).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k router`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
export OMP_NUM_THREADS=1
.venv/bin/ruff check --quiet . || { echo "ruff: fix the lint findings above (ruff check --fix fixes most)"; exit 1; }
# --durations=30: the slowest tests, to keep the lane's time in view. -m "not readme": the README's
# commands run in CI's newest lane (scripts/test_newest.sh); a -m given here replaces this one.
exec .venv/bin/python -m pytest -q --durations=30 -m "not readme" -W ignore::UserWarning -W ignore::DeprecationWarning -W ignore::FutureWarning "$@"
