#!/usr/bin/env bash
# Single-node training with torchrun (default: all GPUs of this node).
#   bash scripts/train_torchrun.sh examples/remoe/182m/remoe.yaml [extra flags...]
# Extra flags override the YAML, e.g. --data-path /data/pile_text_document --train-iters 1000.
# Re-running the same command resumes from the config's `load:` directory (latest checkpoint).
# Env: NPROC (processes; default: number of GPUs, or 2 on a CPU-only machine), MASTER_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:?usage: bash scripts/train_torchrun.sh CONFIG.yaml [flags...]}"
shift
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # TP/SP comm overlap order
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m megatron.remoe.pretrain --config "$CONFIG" "$@"
