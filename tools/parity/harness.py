"""Parallel-layout parity harness, shared by tools/parity_table.py and the parity tests.

Trains the same tiny GPT (tools/parity/tiny_gpt.MODEL: 2 layers, hidden 64, seq 32, E=4, global
batch 8, fp32) with the same seed and data under several parallel layouts and compares every
layout with the 1-process run.

Each run is the real trainer (`megatron.remoe.training.loop.pretrain`, the function behind
`python -m megatron.remoe.pretrain`) in real processes (1 process, or torchrun + gloo). This file is
also the worker script: run as `python tools/parity/harness.py FLAGS...` (or under torchrun) it calls
`pretrain` after wrapping three trainer functions *to record* what every rank computes (the JSONL
metrics file is written by rank 0 only):

* `train_step`: per step and rank, LM loss, grad norm, global sparsity, the lambda used in the step
  and the lambda after the controller's update (fp32 bits);
* `evaluate`: per evaluation and rank, the validation loss;
* `setup`: after a checkpoint was loaded, one evaluation *before* the first step (the evaluation
  loss of the loaded checkpoint; no RNG or data iterator is touched, so the run itself is
  unchanged).

Negative control: PARITY_BREAK_CONTROLLER=tp|pp|dp makes the worker replace the controller's
world all-reduce by an all-reduce that skips one parallel dimension (the ranks are grouped by their
TP / PP / DP rank, so TP / PP / DP peers are never summed), i.e. the bug the parity checks must
catch. The recorded values are otherwise untouched.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time

from tools.parity.tiny_gpt import MODEL, ROOT, data_args, free_port, pretrain_env, read_metrics

# name -> (processes, flags). Global batch 8, micro-batch 2: 4 micro-batches per step on 1 process
# and with PP2 (DP1), 2 with DP2.
LAYOUTS = {
    "1proc": (1, []),
    "dp2": (2, []),
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "ep2_alltoall": (2, ["--expert-model-parallel-size", "2",
                         "--moe-token-dispatcher-type", "alltoall"]),
    "ep2_allgather": (2, ["--expert-model-parallel-size", "2",
                          "--moe-token-dispatcher-type", "allgather"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "dp2_distopt": (2, ["--use-distributed-optimizer"]),
    "tp2_ep2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                    "--expert-model-parallel-size", "2"]),
    "pp2_ep2": (4, ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"]),
    # megatron-core's DDP with the bucket reduce started from backward hooks (asynchronous) and
    # skipped (no_sync) on all but the last micro-batch, with and without the distributed optimizer
    "dp2_overlap": (2, ["--overlap-grad-reduce"]),
    "dp2_distopt_overlap": (2, ["--use-distributed-optimizer", "--overlap-grad-reduce"]),
    # expert data parallelism 2 under the distributed optimizer: the experts' optimizer state is
    # sharded over the 2 expert-DP ranks, the dense parameters' over all 4
    "ep2_dp2_distopt": (4, ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"]),
    # interleaved 1F1B needs >= 2 layers per pipeline rank: a 4-layer model, 2 chunks of 1 layer
    # per rank (rank 0 holds layers 1 and 3, rank 1 layers 2 and 4), compared with 1 process
    # running the same 4-layer model ("1proc_l4")
    "1proc_l4": (1, ["--num-layers", "4"]),
    "pp2_vp2": (2, ["--num-layers", "4", "--pipeline-model-parallel-size", "2",
                    "--virtual-pipeline-model-parallel-size", "2"]),
}
# The 1-process run each layout is compared with (same model; "1proc" unless named here), and the
# layouts that are such references.
REFERENCE = {"1proc_l4": "1proc_l4", "pp2_vp2": "1proc_l4"}
REFERENCES = ("1proc", "1proc_l4")
# Layouts only `tools/parity_table.py --full` runs (CI runs the others: tests/training/test_parity.py)
FULL_ONLY = ("ep2_dp2_distopt",)


def reference(layout: str) -> str:
    """The 1-process layout of the same model as `layout`."""
    return REFERENCE.get(layout, "1proc")


STEPS, HALF = 6, 3  # steps per run; checkpoints and evaluations at HALF and STEPS
ROUTERS = {"relu": ["--router", "relu"],
           # k=2 so that the (pre-softmax) top-k probabilities are not all 1
           "topk": ["--router", "topk", "--moe-router-topk", "2"]}

# Tolerances against the 1-process run (fp32). Justification (measured on the CI machine, see
# docs/parity.md): layouts change the order of fp32 reductions (TP partial sums, DP all-reduce of
# gradients, per-micro-batch loss accumulation, expert outputs summed in another order), so values
# agree to rounding only. Over 6 steps the largest deviations measured were 3.6e-7 (LM loss,
# absolute, values ~6.2) and 4.8e-7 relative (grad norm); the tolerances leave a >20x margin.
# They are not what catches a controller bug: a sparsity reduction that skips the TP or PP group
# moves the logged sparsity by 2e-2 / 1e-1 and splits lambda between ranks, but the LM loss by
# <1e-6 within 6 steps (measured) -- the exact sparsity, lambda and per-rank checks catch it.
TOL_LOSS = 1e-5          # absolute, LM loss (~6.2): ~1.6e-6 relative
TOL_GRAD_NORM = 1e-5     # relative
# Sparsity is an exact count: identical routing decisions give the identical number. A gate within
# rounding of 0 could flip between layouts; each flipped entry moves the step's sparsity by
# 1/(256 tokens * 4 experts * 2 layers) = 4.9e-4. We allow no flip: none was observed in any
# layout, and a failure here is then a real difference (or a flip worth looking at), not noise.
TOL_SPARSITY = 0.0
# lambda changes only through sign(target - S): with equal S it is bit-identical to 1 process.
TOL_LAMBDA_REL = 0.0
# The evaluation loss of the same weights under another layout: forward only, same rounding
# argument as the LM loss.
TOL_EVAL = 1e-5


# ------------------------------------------------------------------------------------------------
# Launching
# ------------------------------------------------------------------------------------------------
def worker_cmd(nproc: int) -> list:
    script = os.path.abspath(__file__)
    if nproc == 1:
        return [sys.executable, script]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), script]


def base_args(data: dict, router: str, steps: int, save_every: int) -> list:
    """The common flags: MODEL, data, router, `steps` steps, evaluation every `save_every`."""
    return (MODEL + data_args(data) + ROUTERS[router] +
            ["--train-iters", str(steps), "--eval-interval", str(save_every), "--seed", "1234"])


def run_layout(layout: str, argv: list, out_dir: str, timeout: float = 150,
               env: dict | None = None) -> dict:
    """Run the trainer with `argv` under `layout`; returns the per-rank records:
    {"steps": {rank: [...]}, "evals": {rank: [...]}, "metrics": rank-0 JSONL path, "wall_s"}."""
    nproc, flags = LAYOUTS[layout]
    os.makedirs(out_dir, exist_ok=True)
    records = os.path.join(out_dir, "records")
    shutil.rmtree(records, ignore_errors=True)
    os.makedirs(records)
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    full_env = dict(env or {}, PARITY_RECORD_DIR=records)
    t0 = time.time()
    proc = subprocess.run(worker_cmd(nproc) + list(argv) + flags + ["--metrics-file", metrics],
                          capture_output=True, text=True, env=pretrain_env(full_env),
                          timeout=timeout, cwd=ROOT)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{layout}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-5000:]}")
    out = {"steps": {}, "evals": {}, "setup": {}, "metrics": metrics, "wall_s": wall,
           "stdout": proc.stdout}
    for rank in range(nproc):
        with open(os.path.join(records, f"rank{rank}.jsonl"), encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh]
        out["steps"][rank] = [r for r in rows if r["kind"] == "step"]
        out["evals"][rank] = [r for r in rows if r["kind"] == "eval"]
        out["setup"][rank] = next((r for r in rows if r["kind"] == "setup"), None)
    return out


def copy_checkpoint(save_dir: str, iteration: int, dest: str) -> str:
    """A directory holding only checkpoint `iteration` of `save_dir` (a resume point)."""
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    name = f"iter_{iteration:07d}"
    shutil.copytree(os.path.join(save_dir, name), os.path.join(dest, name))
    with open(os.path.join(dest, "latest_checkpointed_iteration.txt"), "w") as fh:
        fh.write(f"{iteration}\n")
    return dest


class Runs:
    """Trainer jobs (run once on first use, cached), all from one initial checkpoint:

    * `init(router, ref)`: the 1-process model (layout `ref`, see `reference`) at iteration 0,
      saved as a checkpoint. With one seed, megatron-core initialises PP stages and EP-sharded
      experts differently per layout, so every run starts from these weights (loaded with
      --no-load-optim: no Adam state exists yet);
    * `train(router, layout)`: STEPS steps from there, checkpoints and evaluations at HALF, STEPS;
    * `load_half(router, source, layout)`: `source`'s HALF checkpoint loaded under `layout` (with
      an evaluation before the first step), trained to `steps`.

    `progress(message)` is called before and after every job."""

    def __init__(self, data, root, timeout: float = 240, progress=None):
        self.data, self.root, self.cache = data, str(root), {}
        self.timeout, self.progress = timeout, progress
        self.jobs, self.job_seconds = 0, 0.0

    def dir(self, *parts):
        return os.path.join(self.root, *parts)

    def _job(self, label, layout, argv, out, env=None):
        if self.progress:
            self.progress(f"start {label} ({LAYOUTS[layout][0]} process(es))")
        result = run_layout(layout, argv, out, env=env, timeout=self.timeout)
        self.jobs += 1
        self.job_seconds += result["wall_s"]
        if self.progress:
            self.progress(f"done  {label} in {result['wall_s']:.1f} s")
        return result

    def init(self, router, ref="1proc"):
        key = ("init", router, ref)
        if key not in self.cache:
            suffix = "" if ref == "1proc" else f"_{ref}"
            path = self.dir(router, f"init{suffix}")
            self._job(f"{router} initial checkpoint{suffix.replace('_', ' ')}", ref,
                      base_args(self.data, router, STEPS, HALF),
                      self.dir(router, f"init_job{suffix}"), env={"PARITY_SAVE_INIT": path})
            self.cache[key] = path
        return self.cache[key]

    def train(self, router, layout, env=None, tag="train"):
        key = (tag, router, layout)
        if key not in self.cache:
            out = self.dir(router, f"{layout}_{tag}")
            argv = base_args(self.data, router, STEPS, HALF) + [
                "--load", self.init(router, reference(layout)), "--no-load-optim",
                "--save", os.path.join(out, "ckpt"), "--save-interval", str(HALF)]
            self.cache[key] = self._job(f"{router} {layout} {tag}", layout, argv, out, env)
        return self.cache[key]

    def load_half(self, router, source, layout, no_load_optim=False, steps=STEPS):
        key = ("load", router, source, layout, no_load_optim, steps)
        if key not in self.cache:
            src = os.path.join(self.dir(router, f"{source}_train"), "ckpt")
            self.train(router, source)
            out = self.dir(router, f"{source}_to_{layout}_{int(no_load_optim)}_{steps}")
            ckpt = copy_checkpoint(src, HALF, os.path.join(out, "ckpt"))
            argv = base_args(self.data, router, STEPS, HALF) + ["--load", ckpt]
            if steps != STEPS:
                argv += ["--exit-interval", str(steps)]
            if no_load_optim:
                argv += ["--no-load-optim"]
            what = "resume" if source == layout and not no_load_optim else "load"
            self.cache[key] = self._job(
                f"{router} {source} step-{HALF} checkpoint -> {layout} ({what}"
                f"{', no optimizer' if no_load_optim else ''})", layout, argv, out)
        return self.cache[key]


# ------------------------------------------------------------------------------------------------
# Comparing
# ------------------------------------------------------------------------------------------------
def rank0_steps(result: dict) -> dict:
    return {r["iteration"]: r for r in result["steps"][0]}


def lambda_identical_across_ranks(result: dict) -> bool | None:
    """Every rank used and produced the same lambda bits (and saw the same sparsity) at every
    step. None when the run has no ReLU controller."""
    by_rank = [[(r["lambda_bits"], r["lambda_next_bits"], r["sparsity"]) for r in rows]
               for _, rows in sorted(result["steps"].items())]
    if by_rank[0] and by_rank[0][0][0] is None:
        return None
    return all(rows == by_rank[0] for rows in by_rank)


def deviations(ref: dict, other: dict, iterations=None) -> dict:
    """Max deviations of `other` from `ref` (rank-0 records) over the common iterations."""
    a, b = rank0_steps(ref), rank0_steps(other)
    its = sorted(set(a) & set(b)) if iterations is None else list(iterations)
    assert its and all(i in a and i in b for i in its), (sorted(a), sorted(b), iterations)
    out = {"iterations": its, "loss": 0.0, "grad_norm_rel": 0.0, "sparsity": 0.0,
           "lambda_rel": 0.0, "layer_counts_differ": []}
    for i in its:
        x, y = a[i], b[i]
        out["loss"] = max(out["loss"], abs(x["lm_loss"] - y["lm_loss"]))
        out["grad_norm_rel"] = max(out["grad_norm_rel"],
                                   abs(x["grad_norm"] - y["grad_norm"]) / abs(x["grad_norm"]))
        if x["sparsity"] is not None:
            out["sparsity"] = max(out["sparsity"], abs(x["sparsity"] - y["sparsity"]))
            if x["layer_counts"] != y["layer_counts"]:
                out["layer_counts_differ"].append(i)
            for key in ("lambda", "lambda_next"):
                out["lambda_rel"] = max(out["lambda_rel"], abs(x[key] - y[key]) / x[key])
        for key in ("lm_loss", "grad_norm"):
            if not math.isfinite(y[key]):
                out[key if key != "lm_loss" else "loss"] = math.inf
    return out


def within_tolerance(dev: dict) -> list:
    """The violated tolerances (empty: parity holds)."""
    bad = []
    if not dev["loss"] <= TOL_LOSS:
        bad.append(f"|dloss| {dev['loss']:.3g} > {TOL_LOSS}")
    if not dev["grad_norm_rel"] <= TOL_GRAD_NORM:
        bad.append(f"rel dgrad_norm {dev['grad_norm_rel']:.3g} > {TOL_GRAD_NORM}")
    if not dev["sparsity"] <= TOL_SPARSITY:
        bad.append(f"|dsparsity| {dev['sparsity']:.3g} > {TOL_SPARSITY}")
    if not dev["lambda_rel"] <= TOL_LAMBDA_REL:
        bad.append(f"rel dlambda {dev['lambda_rel']:.3g} > {TOL_LAMBDA_REL}")
    if dev["layer_counts_differ"]:
        bad.append(f"tokens per layer and expert differ at steps {dev['layer_counts_differ']}")
    return bad


def bitwise_equal_steps(ref: dict, other: dict, iterations) -> bool:
    """Rank-0 records of `other` equal `ref` exactly (LM loss, grad norm, lr, sparsity, lambda
    bits) at `iterations`, and every rank of `other` equals the same rank of `ref`."""
    for rank, rows in other["steps"].items():
        a = {r["iteration"]: r for r in ref["steps"][rank]}
        b = {r["iteration"]: r for r in rows}
        for i in iterations:
            if i not in a or i not in b:
                return False
            for key in ("lm_loss", "grad_norm", "lr", "sparsity", "lambda_bits",
                        "lambda_next_bits"):
                if a[i][key] != b[i][key]:
                    return False
    return True


def eval_at(result: dict, iteration: int, rank: int = 0) -> float:
    rows = [r for r in result["evals"][rank] if r["iteration"] == iteration]
    assert rows, (iteration, result["evals"][rank])
    return rows[0]["valid_loss"]


def valid_metrics(result: dict) -> list:
    return read_metrics(result["metrics"], "valid")


# ------------------------------------------------------------------------------------------------
# The checks, as used by tests/training/test_parity.py and tools/parity_table.py
# ------------------------------------------------------------------------------------------------
def optimizer_moves(source: str, target: str) -> bool:
    """Whether megatron-core 0.16 can load `source`'s optimizer state under `target` (see
    docs/training.md, Re-sharding): not with the distributed optimizer on CPU (its 'dp_reshardable'
    format) and not between EP = 1 and EP > 1 (experts get their own optimizer with EP > 1)."""
    def kind(layout):
        flags = LAYOUTS[layout][1]
        return ("--use-distributed-optimizer" in flags, "--expert-model-parallel-size" in flags)

    (dist_a, ep_a), (dist_b, ep_b) = kind(source), kind(target)
    return not dist_a and not dist_b and ep_a == ep_b


def flag_value(layout: str, flag: str, default=None):
    """The value of `flag` in MODEL + the layout's flags (the last one wins, as in argparse)."""
    flags = MODEL + LAYOUTS[layout][1]
    where = [i for i, f in enumerate(flags) if f == flag]
    return flags[where[-1] + 1] if where else default


def layout_problems(layout: str, result: dict) -> list:
    """What the ranks built against what the layout asks for: model chunks per rank, the DDP
    options in effect, and the routers' layer numbers (together 1..num_layers, globally)."""
    nproc, flags = LAYOUTS[layout]
    size = {name: int(flag_value(layout, f"--{name}-model-parallel-size", 1))
            for name in ("tensor", "pipeline", "virtual-pipeline", "expert")}
    distributed = "--use-distributed-optimizer" in flags
    dp = nproc // (size["tensor"] * size["pipeline"])
    # the distributed optimizer shards over DP, the experts' (EP > 1) over DP / EP
    shards = ([dp] + ([dp // size["expert"]] if size["expert"] > 1 else [])) if distributed else []
    want = {"chunks": size["virtual-pipeline"],
            "overlap_grad_reduce": "--overlap-grad-reduce" in flags,
            "distributed_optimizer": distributed, "optimizer_shard_ranks": shards}
    bad = []
    for rank, facts in sorted(result["setup"].items()):
        if facts is None:
            bad.append(f"rank {rank} recorded no setup")
            continue
        got = {key: facts[key] for key in want}
        if got != want:
            bad.append(f"rank {rank} built {got}, the layout asks for {want}")
    layers = {n for facts in result["setup"].values() if facts
              for chunk in facts["router_layers"] for n in chunk}
    if layers != set(range(1, int(flag_value(layout, "--num-layers")) + 1)):
        bad.append(f"router layer numbers {sorted(layers)}")
    return bad


def parity(runs, router: str, layout: str) -> dict:
    """`layout` against 1 process: deviations, violated tolerances, lambda across ranks, and the
    evaluation losses (0 = right after loading the initial checkpoint, HALF, STEPS)."""
    ref, run = runs.train(router, reference(layout)), runs.train(router, layout)
    dev = deviations(ref, run)
    bad = within_tolerance(dev) + layout_problems(layout, run)
    same = lambda_identical_across_ranks(run)
    if same is False:
        bad.append("lambda differs between ranks")
    eval_delta = max(abs(eval_at(run, it) - eval_at(ref, it)) for it in (0, HALF, STEPS))
    if not eval_delta <= TOL_EVAL:
        bad.append(f"|deval| {eval_delta:.3g} > {TOL_EVAL}")
    if dev["iterations"] != list(range(1, STEPS + 1)):
        bad.append(f"iterations {dev['iterations']}")
    return {"dev": dev, "lambda_same": same, "eval_delta": eval_delta,
            "eval_init_delta": abs(eval_at(run, 0) - eval_at(ref, 0)), "violations": bad,
            "wall_s": run["wall_s"]}


def reshard(runs, router: str, source: str, target: str) -> dict:
    """`source`'s step-HALF checkpoint loaded under `target`: the evaluation loss at load against
    the source run's evaluation at HALF, and step HALF+1 against the uninterrupted 1-process run
    (or, where the optimizer state cannot move, against the saving layout loading its own
    checkpoint with --no-load-optim: the same weights, lambda and data position, Adam restarted)."""
    assert reference(source) == reference(target), ("another model", source, target)
    moves = optimizer_moves(source, target)
    loaded = runs.load_half(router, source, target, no_load_optim=not moves, steps=HALF + 1)
    if moves:
        ref = runs.train(router, reference(target))
    else:
        ref = runs.load_half(router, source, source, no_load_optim=True, steps=HALF + 1)
    eval_delta = abs(eval_at(loaded, HALF) - eval_at(runs.train(router, source), HALF))
    dev = deviations(ref, loaded, iterations=[HALF + 1])
    bad = within_tolerance(dev)
    if not eval_delta <= TOL_EVAL:
        bad.append(f"|deval| at load {eval_delta:.3g} > {TOL_EVAL}")
    if lambda_identical_across_ranks(loaded) is False:
        bad.append("lambda differs between ranks")
    if source != target and "layout changed" not in loaded["stdout"]:
        bad.append("no re-sharding message")
    return {"optimizer": moves, "eval_delta": eval_delta, "dev": dev, "violations": bad}


def resume(runs, router: str, layout: str) -> dict:
    """Steps HALF+1..STEPS resumed from the step-HALF checkpoint in a new job against the
    uninterrupted run: bitwise on every rank (and the evaluation losses at HALF and STEPS)."""
    full = runs.train(router, layout)
    resumed = runs.load_half(router, layout, layout)
    its = list(range(HALF + 1, STEPS + 1))
    bad = []
    if [r["iteration"] for r in resumed["steps"][0]] != its:
        bad.append(f"iterations {[r['iteration'] for r in resumed['steps'][0]]}")
    if not bitwise_equal_steps(full, resumed, its):
        bad.append("steps differ")
    for it in (HALF, STEPS):
        if eval_at(resumed, it) != eval_at(full, it):
            bad.append(f"evaluation at {it} differs")
    return {"bitwise": not bad, "violations": bad}


def negative_control(runs, router: str, layout: str, dimension: str) -> dict:
    """`layout` with the controller's all-reduce skipping `dimension`: the parity violations
    (which must not be empty)."""
    ref = runs.train(router, reference(layout))
    broken = runs.train(router, layout, env={"PARITY_BREAK_CONTROLLER": dimension},
                        tag=f"broken_{dimension}")
    dev = deviations(ref, broken)
    bad = within_tolerance(dev)
    if lambda_identical_across_ranks(broken) is False:
        bad.append("lambda differs between ranks")
    return {"dev": dev, "violations": bad, "lambda_same": lambda_identical_across_ranks(broken)}


# ------------------------------------------------------------------------------------------------
# The worker (runs inside every trainer process)
# ------------------------------------------------------------------------------------------------
def _fp32_bits(value) -> int:
    import torch  # noqa: PLC0415 -- in the worker only: the launching parent does not load torch

    return int(torch.tensor(float(value), dtype=torch.float32).view(torch.int32))


def _split_group(dimension: str):
    """A process group per value of this rank's TP / PP / DP rank: all-reducing over it sums every
    rank except the peers of that one parallel dimension (the negative control)."""
    import torch.distributed as dist  # noqa: PLC0415 -- worker only, keeps torch out of the parent
    from megatron.core import parallel_state as ps  # noqa: PLC0415 -- worker only

    coord = {"tp": ps.get_tensor_model_parallel_rank, "pp": ps.get_pipeline_model_parallel_rank,
             "dp": ps.get_data_parallel_rank}[dimension]()
    coords = [None] * dist.get_world_size()
    dist.all_gather_object(coords, coord)
    mine = None
    for value in sorted(set(coords)):  # every rank creates every group, in the same order
        group = dist.new_group([r for r, c in enumerate(coords) if c == value])
        if value == coord:
            mine = group
    return mine


def _layout_facts(run) -> dict:
    """What this rank built: model chunks, the DDP options in effect, and the layer number of
    every router per chunk (megatron-core numbers layers globally, with PP and VP offsets)."""
    ddp = run.model[0].ddp_config
    routers = [[module.layer_number for name, module in chunk.named_modules()
                if name.endswith(".router")] for chunk in run.model]
    # ranks each (chained) distributed optimizer shards its state over: experts get their own
    # optimizer with EP > 1, sharded over the expert-data-parallel group
    optimizers = getattr(run.optimizer, "chained_optimizers", [run.optimizer])
    shards = [opt.data_parallel_group.size() for opt in optimizers
              if getattr(opt, "data_parallel_group", None) is not None]
    return {"kind": "setup", "chunks": len(run.model), "router_layers": routers,
            "overlap_grad_reduce": ddp.overlap_grad_reduce,
            "distributed_optimizer": ddp.use_distributed_optimizer,
            "optimizer_shard_ranks": shards}


def _worker(argv: list) -> int:
    from megatron.remoe.logs import configure  # noqa: PLC0415 -- worker only: configured before the imports below

    configure()  # an entry point: the console of `python -m megatron.remoe.pretrain`, first
    import torch.distributed as dist  # noqa: PLC0415 -- worker only, keeps torch out of the parent

    from megatron.remoe.training.arguments import config_to_yaml, parse_config  # noqa: PLC0415 -- worker only
    from megatron.remoe.training.checkpointing import save_checkpoint  # noqa: PLC0415 -- worker only
    from megatron.remoe.training.data import build_datasets, load_run_tokenizer  # noqa: PLC0415 -- worker only
    from megatron.remoe.training.distributed import destroy_distributed  # noqa: PLC0415 -- worker only
    from megatron.remoe.training.loop import LoopParts, pretrain  # noqa: PLC0415 -- worker only

    rank = int(os.environ.get("RANK", "0"))
    path = os.path.join(os.environ["PARITY_RECORD_DIR"], f"rank{rank}.jsonl")
    sink = open(path, "a", encoding="utf-8")

    def record(row: dict) -> None:
        sink.write(json.dumps(row) + "\n")
        sink.flush()

    real = LoopParts()
    orig_setup, orig_step, orig_eval = real.setup, real.train_step, real.evaluate

    def setup(cfg):
        run = orig_setup(cfg)
        record(_layout_facts(run))
        broken = os.environ.get("PARITY_BREAK_CONTROLLER")
        if broken and run.controller is not None:
            run.controller.group = _split_group(broken)
        if run.loaded_from:  # the evaluation loss of the loaded checkpoint, before any step
            _, valid_sets, weights = build_datasets(cfg, load_run_tokenizer(cfg))
            evaluate(run, valid_sets, weights)
        return run

    def train_step(run, data_iterator, stop_flags=None):
        result = orig_step(run, data_iterator, stop_flags)
        metrics = result.metrics
        relu = run.controller is not None
        record({"kind": "step", "iteration": run.iteration + 1, "lm_loss": metrics["lm_loss"],
                "grad_norm": metrics["grad_norm"], "lr": metrics["lr"],
                "sparsity": metrics.get("moe_relu_sparsity"),
                "lambda": metrics.get("moe_relu_l1_reg_coeff"),
                "lambda_bits": _fp32_bits(metrics["moe_relu_l1_reg_coeff"]) if relu else None,
                "lambda_next": float(run.controller.l1_coeff) if relu else None,
                "lambda_next_bits": _fp32_bits(run.controller.l1_coeff) if relu else None,
                # per MoE layer (global number) and expert: tokens routed, summed over all ranks
                "layer_counts": (dict(zip(map(str, result.routing.layer_numbers),
                                          result.routing.tokens_per_expert.tolist()))
                                 if result.routing is not None else None)})
        return result

    def evaluate(run, valid_sets, weights):
        out = orig_eval(run, valid_sets, weights)
        record({"kind": "eval", "iteration": run.iteration, "valid_loss": out.get("valid/loss")})
        return out

    cfg = parse_config(argv, prog="parity worker")
    try:
        init = os.environ.get("PARITY_SAVE_INIT")
        if init:  # write the initial weights as checkpoint iteration 0, then stop
            run = orig_setup(cfg)
            save_checkpoint(init, 0, run.model, run.optimizer, run.scheduler, 0,
                            cfg, config_to_yaml(cfg),
                            extra_common={"padded_vocab_size": run.vocab_size,
                                          "skipped_steps": 0})
        else:
            pretrain(cfg, LoopParts(setup=setup, train_step=train_step, evaluate=evaluate))
    finally:
        sink.close()
        if dist.is_initialized():
            destroy_distributed()
    return 0


if __name__ == "__main__":  # checkpoint saving spawns processes: keep this guard
    sys.exit(_worker(sys.argv[1:]))
