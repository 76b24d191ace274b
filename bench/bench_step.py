#!/usr/bin/env python
"""Training step time, tokens/s and peak memory: ReMoE (ReLU router) vs TopK vs a dense MLP with the
same active parameters, at Stage III (sparsity settled at its target) and during Stage I (the dense
warm-up), measured side by side with the trainer's own `setup` / `train_step`.

    .venv/bin/python bench/bench_step.py                      # demo model (CPU, ~10 min on 2 cores)
    .venv/bin/python bench/bench_step.py --quick              # fewer steps, for a smoke run
    .venv/bin/python bench/bench_step.py --stages 3 --steps 40 --json out.json
    .venv/bin/python bench/bench_step.py -- --num-layers 4 --hidden-size 768 \\
        --num-attention-heads 12 --num-query-groups 4 --ffn-hidden-size 3072 --seq-length 1024 \\
        --micro-batch-size 8 --global-batch-size 8 --vocab-size 50304 --bf16 \\
        --transformer-impl transformer_engine --moe-grouped-gemm      # 182M-shaped, on a GPU

Everything after `--` is passed to the trainer's flag parser and overrides the demo model
(examples/remoe/cpu-demo.yaml shape, synthetic data).

How it measures:
* Time: one process builds every variant with `megatron.remoe.training.state.setup` and runs
  `train_step` in rotated order (ABC, BCA, CAB, ...), so load drift on a shared machine hits every
  variant alike. Reported: median, quartiles, and the median of the per-round ratios.
* Stage III: a ReMoE run is first trained by the trainer itself (`pretrain`, synthetic data) with
  a raised lambda_0 (`--settle-lambda`, default 1e-4, i.e. 1e4 x the paper's, which the paper
  reports settling in 55 steps at 182M) for `--settle-iters` (200) steps, past the point where its
  sparsity reached the target, and saved; the timed ReMoE model resumes from that
  checkpoint and keeps training (controller active). Its measured sparsity is printed next to the
  time. TopK and dense have no stages and start from initialisation.
* Stage I: every variant starts from initialisation with the paper's lambda_0 = 1e-8; the ReMoE
  routers then activate about E/2 experts per token (printed).
* Steps: `--block 1` (default) alternates the variants step by step; `--block N` runs N
  consecutive steps of each variant per round. Each timed step's minor page faults (ru_minflt) are
  counted too: the trainer keeps freed CPU tensor memory for the next step
  (`cpu_settings.keep_cpu_allocations`; REMOE_KEEP_CPU_ALLOCATIONS=0 restores glibc's defaults).
* Memory: each variant in its own process. On CPU, peak resident set size while the measured steps
  run (VmHWM reset after the warm-up steps; glibc's mmap threshold is pinned to 64 KiB so freed
  tensors return to the OS and RSS follows live tensor memory); on CUDA `max_memory_allocated`.
  "step peak" is the peak minus the memory held just before the measured steps (weights, grads,
  optimizer state), i.e. activations and temporaries.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from machine import format_machine, load_average, machine_info, split_passthrough  # noqa: E402  (after the sys.path lines)

from megatron.remoe.logs import configure  # noqa: E402  (after the sys.path lines; stdlib only)

# The demo model (examples/remoe/cpu-demo.yaml) on synthetic data. Constant learning rate: the
# steps measured late in a run must not differ from early ones only by the schedule.
DEMO_FLAGS = [
    "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4",
    "--num-query-groups", "2", "--ffn-hidden-size", "1024", "--seq-length", "256",
    "--micro-batch-size", "4", "--global-batch-size", "4", "--num-experts", "8",
    "--moe-router-topk", "1", "--mock-data", "--vocab-size", "8192", "--lr", "1e-3",
    "--min-lr", "1e-3", "--lr-decay-style", "constant", "--train-iters", "2000",
    "--eval-iters", "0", "--eval-interval", "0", "--log-interval", "1000000", "--seed", "1234",
]

VARIANT_FLAGS = {
    "relu": ["--router", "relu"],
    "topk": ["--router", "topk"],
    "dense": ["--router", "dense"],
    "relu-recompute": ["--router", "relu", "--recompute-granularity", "selective",
                       "--recompute-modules", "moe"],
}


# Not a trainer flag: _build strips it and puts the optimizer back on torch's per-tensor Adam loop.
UNFUSED_ADAM = "--bench-unfused-adam"


def variant_flags(name: str) -> list:
    """Flags of a variant. Suffix `-sequential`: megatron-core's SequentialMLP experts on CPU
    instead of the grouped CPU experts; suffix `-mcore`: megatron-core's CPU defaults as they were
    before docs/performance.md's "CPU fast path", i.e. SequentialMLP and torch's per-tensor Adam
    loop instead of its fused CPU kernel."""
    if name.endswith("-sequential"):
        return variant_flags(name[:-len("-sequential")]) + ["--moe-cpu-experts", "sequential"]
    if name.endswith("-mcore"):
        return variant_flags(name[:-len("-mcore")]) + ["--moe-cpu-experts", "sequential",
                                                       UNFUSED_ADAM]
    if name.startswith("relu-bound"):  # relu-bound<M>: Stage I dispatch bound of M experts
        return ["--router", "relu", "--moe-relu-warmup-max-experts", name[len("relu-bound"):]]
    return list(VARIANT_FLAGS[name])


def gemm_peak_gflops(dtype_name: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """The machine's matmul peak as this process sees it (its threads): GFLOP/s of the fastest of
    `repeats` n x n x n GEMMs, after one warm-up."""
    import torch  # noqa: PLC0415 -- workers only: the parent sets OMP_NUM_THREADS first

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    if torch.cuda.is_available():
        a, b = a.cuda(), b.cuda()
    best = float("inf")
    for i in range(repeats + 1):
        _sync(a.device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(a.device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def train_flops_per_token(cfg, router: str, experts_per_token=None) -> float:
    """The ablation tool's count (megatron.remoe.ablation.flops_per_token) for this run."""
    from megatron.remoe.ablation import flops_per_token  # noqa: PLC0415 -- workers only: the parent sets OMP_NUM_THREADS first

    fields = dataclasses.asdict(cfg)
    fields["router"] = router
    return flops_per_token(fields, cfg.vocab_size, experts_per_token)["train"]


# ------------------------------------------------------------------------------------------------
# Workers (run in subprocesses)
# ------------------------------------------------------------------------------------------------
def _sync(device):
    import torch  # noqa: PLC0415 -- workers only: the parent sets OMP_NUM_THREADS first

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(flags: list):
    """A trainer Run and its training data iterator, exactly as `pretrain` builds them."""
    from megatron.remoe.training.arguments import parse_config  # noqa: PLC0415 -- workers only: the parent sets OMP_NUM_THREADS first
    from megatron.remoe.training.data import build_datasets, load_run_tokenizer, make_loader  # noqa: PLC0415 -- workers only: the parent sets OMP_NUM_THREADS first
    from megatron.remoe.training.state import setup  # noqa: PLC0415 -- workers only: the parent sets OMP_NUM_THREADS first

    unfused = UNFUSED_ADAM in flags
    cfg = parse_config([f for f in flags if f != UNFUSED_ADAM])
    run = setup(cfg)
    if unfused:
        for opt in getattr(run.optimizer, "chained_optimizers", None) or [run.optimizer]:
            for group in opt.optimizer.param_groups:
                group["fused"] = False
    train_ds, _, _ = build_datasets(cfg, load_run_tokenizer(cfg))
    loader = make_loader(train_ds, run.consumed_train_samples,
                         cfg.train_iters * cfg.global_batch_size, cfg, run.dp_rank, run.dp_size)
    return run, iter(loader)


def _routing(metrics: dict) -> dict:
    out = {}
    if "moe_relu_sparsity" in metrics:
        out["sparsity"] = metrics["moe_relu_sparsity"]
        out["lambda"] = metrics.get("moe_relu_l1_reg_coeff")
        ept = [v for k, v in metrics.items() if k.endswith("/experts_per_token")]
        out["experts_per_token"] = sum(ept) / len(ept) if ept else None
    return out


def worker_time(spec: dict) -> dict:
    import torch  # noqa: PLC0415 -- workers only: the parent sets OMP_NUM_THREADS first

    from megatron.remoe.training.step import train_step  # noqa: PLC0415 -- workers only: the parent sets OMP_NUM_THREADS first

    peak_dtype = "bfloat16" if "--bf16" in next(iter(spec["variants"].values())) else "float32"
    peak = [gemm_peak_gflops(peak_dtype)]
    runs = {name: _build(flags) for name, flags in spec["variants"].items()}
    device = next(iter(runs.values()))[0].device
    names = list(runs)
    times = {n: [] for n in names}
    faults = {n: [] for n in names}
    routing = {n: [] for n in names}
    block = spec.get("block", 1)
    n_rounds = -(-(spec["warmup"] + spec["steps"]) // block)
    for rnd in range(n_rounds):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:  # rotate: ABC, BCA, CAB, ...
            run, it = runs[name]
            for j in range(rnd * block, (rnd + 1) * block):  # `block` consecutive steps
                _sync(device)
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                metrics = train_step(run, it).metrics
                _sync(device)
                dt = time.perf_counter() - t0
                if spec["warmup"] <= j < spec["warmup"] + spec["steps"]:
                    times[name].append(dt)
                    faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
                    r = _routing(metrics)
                    if r:
                        routing[name].append(r)
    cfg = next(iter(runs.values()))[0].cfg
    peak.append(gemm_peak_gflops(peak_dtype))
    flops = {}
    for n, (r, _) in runs.items():
        ept = [x["experts_per_token"] for x in routing[n] if x.get("experts_per_token")]
        flops[n] = train_flops_per_token(r.cfg, r.cfg.router,
                                         sum(ept) / len(ept) if ept else None)
    return {"times": times, "faults": faults, "block": block, "routing": routing,
            "device": str(device),
            "tokens_per_step": cfg.global_batch_size * cfg.seq_length,
            "params": {n: r.params for n, (r, _) in runs.items()},
            "train_flops_per_token": flops, "gemm_peak_gflops": peak, "gemm_dtype": peak_dtype,
            "torch_threads": torch.get_num_threads()}


def _proc_status_mib(key: str) -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def worker_memory(spec: dict) -> dict:
    import torch  # noqa: PLC0415 -- workers only: the parent sets OMP_NUM_THREADS first

    from megatron.remoe.training.step import train_step  # noqa: PLC0415 -- workers only: the parent sets OMP_NUM_THREADS first

    run, it = _build(spec["flags"])
    device = run.device
    routing = []
    for _ in range(spec["warmup"]):  # allocates optimizer state, warms caches
        train_step(run, it)
    _sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        reset = True
    else:
        base = _proc_status_mib("VmRSS")
        reset = _reset_peak_rss()
    for _ in range(spec["steps"]):
        r = _routing(train_step(run, it).metrics)
        if r:
            routing.append(r)
    _sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        kind = "cuda max_memory_allocated"
    else:
        peak = _proc_status_mib("VmHWM") if reset else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        kind = "peak RSS (VmHWM)" if reset else "ru_maxrss (whole process)"
    return {"base_mib": base, "peak_mib": peak, "step_peak_mib": peak - base, "kind": kind,
            "routing": routing, "device": str(device)}


def worker_settle(spec: dict) -> dict:
    from megatron.remoe.training.arguments import parse_config  # noqa: PLC0415 -- workers only: the parent sets OMP_NUM_THREADS first
    from megatron.remoe.training.loop import pretrain  # noqa: PLC0415 -- workers only: the parent sets OMP_NUM_THREADS first

    summary = pretrain(parse_config(spec["flags"]))
    return {k: summary.get(k) for k in ("iterations", "sparsity_last10", "final_sparsity",
                                        "target_sparsity", "final_lambda", "checkpoint",
                                        "s_per_step")}


WORKERS = {"time": worker_time, "memory": worker_memory, "settle": worker_settle}


def run_worker(kind: str, spec: dict, log_path: str, env_extra: dict | None = None) -> dict:
    """Run one worker in a fresh process; its chatter goes to log_path, its result is returned."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as out:
        result_path = out.name
    env = dict(os.environ)
    env.update(env_extra or {})
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", kind, "--_spec",
           json.dumps(spec), "--_result", result_path]
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {kind} {json.dumps(spec)}\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"{kind} worker failed (exit {proc.returncode}); see {log_path}")
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)
    finally:
        os.unlink(result_path)


def settled_checkpoint(base: list, workdir: str, settle_iters: int, settle_lambda: float,
                       log_path: str):
    """(flags, checkpoint dir, summary) of a ReMoE run trained by `pretrain` until its sparsity
    settled at the target (Stage III); cached in `workdir` by its flags."""
    settle_flags = base + variant_flags("relu") + [
        "--moe-relu-l1-reg-coeff-init", str(settle_lambda)]
    key = hashlib.sha1(json.dumps([settle_flags, settle_iters]).encode()).hexdigest()[:10]
    ckpt = os.path.join(workdir, f"settled-{key}")
    settled_file = os.path.join(ckpt, "settled.json")
    if os.path.isfile(settled_file):
        with open(settled_file, encoding="utf-8") as f:
            settled = json.load(f)
        print(f"\nStage III: reusing settled ReMoE checkpoint {ckpt}")
    else:
        print(f"\nStage III: training ReMoE for {settle_iters} steps (lambda_0 "
              f"{settle_lambda:g}) to settle its sparsity -> {ckpt}", flush=True)
        t0 = time.time()
        settled = run_worker("settle", {"flags": settle_flags + [
            "--save", ckpt, "--exit-interval", str(settle_iters),
            "--metrics-file", os.path.join(ckpt, "metrics.jsonl")]}, log_path)
        settled["seconds"] = time.time() - t0
        with open(settled_file, "w", encoding="utf-8") as f:
            json.dump(settled, f)
    print(f"  after {settled['iterations']} steps: sparsity {settled['final_sparsity']:.3f} "
          f"(last 10 steps {settled['sparsity_last10']:.3f}, target "
          f"{settled['target_sparsity']:.3f}), lambda {settled['final_lambda']:.2e}")
    if abs(settled["sparsity_last10"] - settled["target_sparsity"]) > 0.03:
        print("  WARNING: sparsity not settled at the target; raise --settle-iters")
    return settle_flags, ckpt, settled


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def _quantiles(xs):
    xs = sorted(xs)
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def _ratio_stats(ts, base_ts) -> dict:
    ratios = [a / b for a, b in zip(ts, base_ts)]
    q1, med, q3 = _quantiles(ratios)
    return {"of_medians": statistics.median(ts) / statistics.median(base_ts), "median": med,
            "q1": q1, "q3": q3}


def summarise_time(res: dict, baselines=("topk", "dense")) -> dict:
    """Per variant: median / quartiles of the step time, tokens/s, achieved training GFLOP/s and
    its fraction of the GEMM peak timed in the same worker, and the ratios to each baseline
    present (ratio of medians and median of per-round ratios with IQR)."""
    out = {}
    times = res["times"]
    peak = max(res.get("gemm_peak_gflops") or [float("nan")])
    for name, ts in times.items():
        q1, med, q3 = _quantiles(ts)
        row = {"median_s": med, "q1_s": q1, "q3_s": q3, "n": len(ts),
               "tokens_per_s": res["tokens_per_step"] / med, "ratios": {}}
        flops = (res.get("train_flops_per_token") or {}).get(name)
        if flops:
            row["gflops"] = flops * res["tokens_per_step"] / med / 1e9
            row["fraction_of_peak"] = row["gflops"] / peak
        for base in baselines:
            if base in times and name != base:
                row["ratios"][base] = _ratio_stats(ts, times[base])
        if res.get("faults", {}).get(name):
            row["minor_faults_per_step"] = statistics.median(res["faults"][name])
        r = res["routing"].get(name)
        if r:
            row["sparsity"] = statistics.mean(x["sparsity"] for x in r)
            row["experts_per_token"] = statistics.mean(x["experts_per_token"] for x in r)
        out[name] = row
    return out


def print_time_table(title: str, table: dict, res: dict | None = None) -> None:
    print(f"\n{title}")
    if res and res.get("gemm_peak_gflops"):
        print(f"GEMM peak ({res['gemm_dtype']}, 2048^3, {res['torch_threads']} thread(s)): "
              + " / ".join(f"{g:.1f}" for g in res["gemm_peak_gflops"])
              + " GFLOP/s (start / end of the timing)")
    bases = [b for b in ("topk", "dense") if b in table]
    print(f"{'variant':<20}{'median s/step':>14}{'IQR':>18}{'tokens/s':>10}{'GFLOP/s':>9}"
          f"{'of peak':>8}" + "".join(f"{'vs ' + b:>9}{'per-round (IQR)':>24}" for b in bases)
          + f"{'sparsity':>10}{'exp/tok':>8}{'faults/step':>12}")
    for name, r in table.items():
        cells = ""
        for b in bases:
            st = r["ratios"].get(b)
            cells += (f"{st['of_medians']:>9.3f}{st['median']:>8.3f} "
                      f"({st['q1']:.3f}-{st['q3']:.3f})" if st else
                      f"{'1' if name == b else '':>9}{'':>24}")
        sp = f"{r['sparsity']:.3f}" if "sparsity" in r else ""
        ept = f"{r['experts_per_token']:.2f}" if "experts_per_token" in r else ""
        gf = f"{r['gflops']:>9.1f}{100 * r['fraction_of_peak']:>7.0f}%" if "gflops" in r else \
            f"{'':>17}"
        print(f"{name:<20}{r['median_s']:>14.4f}{r['q1_s']:>9.4f}-{r['q3_s']:<8.4f}"
              f"{r['tokens_per_s']:>10,.0f}{gf}{cells}{sp:>10}{ept:>8}"
              f"{r.get('minor_faults_per_step', float('nan')):>12,.0f}")


def print_memory_table(title: str, table: dict, baseline: str = "topk") -> None:
    print(f"\n{title}")
    kind = next(iter(table.values()))["kind"] if table else ""
    print(f"({kind}; MiB)")
    print(f"{'variant':<16}{'before steps':>13}{'peak':>10}{'step peak':>11}{'peak vs topk':>13}"
          f"{'step peak vs topk':>19}{'sparsity':>10}{'exp/tok':>8}")
    base = table.get(baseline)
    for name, r in table.items():
        rp = f"{r['peak_mib'] / base['peak_mib']:.3f}" if base else ""
        rs = f"{r['step_peak_mib'] / base['step_peak_mib']:.3f}" if base and \
            base["step_peak_mib"] > 0 else ""
        sp = ept = ""
        if r["routing"]:
            sp = f"{statistics.mean(x['sparsity'] for x in r['routing']):.3f}"
            ept = f"{statistics.mean(x['experts_per_token'] for x in r['routing']):.2f}"
        print(f"{name:<16}{r['base_mib']:>13.1f}{r['peak_mib']:>10.1f}{r['step_peak_mib']:>11.1f}"
              f"{rp:>13}{rs:>19}{sp:>10}{ept:>8}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", type=int, default=[3, 1], choices=[1, 3])
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--block", type=int, default=1,
                   help="consecutive steps of one variant before the next runs (default 1: "
                   "variants alternate step by step; larger: each round runs BLOCK steps of "
                   "each, as a model trains alone, still rotated so drift hits all alike)")
    p.add_argument("--mem-steps", type=int, default=3, help="steps measured for memory")
    p.add_argument("--stage3-variants", nargs="+", default=["relu", "topk", "dense"],
                   help="Stage III variants; add relu-sequential / topk-sequential to compare "
                   "with megatron-core's SequentialMLP experts")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the workers (sets OMP_NUM_THREADS; default: inherited)")
    p.add_argument("--stage1-variants", nargs="+",
                   default=["relu", "relu-bound1", "relu-recompute", "topk", "dense"])
    p.add_argument("--stage1-memory-variants", nargs="+",
                   default=["relu", "relu-bound1", "relu-bound2", "relu-recompute", "topk",
                            "dense"])
    p.add_argument("--settle-iters", type=int, default=200,
                   help="Stage III: steps the ReMoE run trains before it is timed")
    p.add_argument("--settle-lambda", type=float, default=1e-4,
                   help="Stage III: lambda_0 of that run (large, so that it settles quickly)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-time", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: 5 steps, 1 warm-up")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench_step"),
                   help="settled checkpoint cache and worker logs")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--_worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--_spec", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    return p


def run_as_worker(args) -> int:
    """One measurement in this process (the parent started it with --_worker)."""
    result = WORKERS[args._worker](json.loads(args._spec))
    with open(args._result, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


def print_header(args, base: list, log_path: str) -> dict:
    """The machine and configuration lines; returns the results dict they start."""
    info_start = machine_info()
    print(f"machine: {format_machine(info_start)}")
    print(f"config:  {' '.join(base)}")
    print(f"         steps={args.steps} warmup={args.warmup} mem_steps={args.mem_steps} "
          f"settle_iters={args.settle_iters} settle_lambda={args.settle_lambda:g} "
          f"block={args.block} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} "
          f"REMOE_KEEP_CPU_ALLOCATIONS={os.environ.get('REMOE_KEEP_CPU_ALLOCATIONS', 'unset')}")
    print(f"worker logs: {log_path}")
    return {"machine_start": info_start, "config": base, "args": {
        k: v for k, v in vars(args).items() if not k.startswith("_")}}


def time_stage(args, stage: str, variants: dict, log_path: str) -> dict:
    """Alternate the variants' steps in one worker; print and return the summary."""
    print(f"{stage} timing ...", flush=True)
    res = run_worker("time", {"variants": variants, "steps": args.steps,
                              "warmup": args.warmup, "block": args.block}, log_path)
    table = summarise_time(res)
    print_time_table(f"{stage} step time ({res['device']}, {res['tokens_per_step']} "
                     f"tokens/step, load average now {_load()})", table, res)
    print_controller_lines(res["routing"])
    return {"raw": res, "summary": table}


def print_controller_lines(routing: dict) -> None:
    """The ReLU variants keep training with the controller active in the timed steps: their
    sparsity follows lambda's small-batch walk around the target, not the checkpoint's last steps
    (docs/performance.md, "bf16 sparsity")."""
    for name, steps in routing.items():
        lam = [r["lambda"] for r in steps if r.get("lambda") is not None]
        if not lam:
            continue
        s = [r["sparsity"] for r in steps]
        print(f"  {name}: sparsity per timed step {min(s):.3f}-{max(s):.3f} (mean "
              f"{sum(s) / len(s):.3f}); lambda {lam[0]:.2e} -> {lam[-1]:.2e} "
              f"(min {min(lam):.2e}, max {max(lam):.2e})")


def bench_stage3(args, base: list, log_path: str, mem_env: dict, results: dict) -> None:
    """Stage III: the ReMoE variants resume a settled checkpoint; time, then memory."""
    settle_flags, ckpt, settled = settled_checkpoint(base, args.workdir, args.settle_iters,
                                                     args.settle_lambda, log_path)
    results["settled"] = settled
    # ReMoE variants resume the settled checkpoint (same model and router state)
    stage3 = {n: settle_flags + variant_flags(n)[2:] + ["--load", ckpt]
              if n.startswith("relu") else base + variant_flags(n)
              for n in args.stage3_variants}
    if not args.no_time:
        results["stage3_time"] = time_stage(args, "Stage III", stage3, log_path)
    if not args.no_memory:
        mem = {}
        for name, flags in stage3.items():
            print(f"Stage III memory: {name} ...", flush=True)
            mem[name] = run_worker("memory", {"flags": flags, "warmup": 2,
                                              "steps": args.mem_steps}, log_path, mem_env)
        results["stage3_memory"] = mem
        print_memory_table("Stage III peak memory (one process per variant)", mem)


def bench_stage1(args, base: list, log_path: str, mem_env: dict, results: dict) -> None:
    """Stage I: every variant from initialisation; time, then memory."""
    stage1 = {n: base + variant_flags(n) for n in args.stage1_variants}
    if not args.no_time:
        print()
        results["stage1_time"] = time_stage(args, "Stage I", stage1, log_path)
    if not args.no_memory:
        mem = {}
        for name in args.stage1_memory_variants:
            print(f"Stage I memory: {name} ...", flush=True)
            mem[name] = run_worker("memory", {"flags": base + variant_flags(name),
                                              "warmup": 1, "steps": args.mem_steps},
                                   log_path, mem_env)
        results["stage1_memory"] = mem
        print_memory_table("Stage I peak memory (one process per variant, first steps from "
                           "initialisation)", mem)


def main(argv=None) -> int:
    configure()  # the console: progress lines, known noise filtered

    argv = list(sys.argv[1:] if argv is None else argv)
    argv, extra = split_passthrough(argv)
    args = build_parser().parse_args(argv)
    if args._worker:
        return run_as_worker(args)

    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads {args.threads} must be >= 1", file=sys.stderr)
            return 2
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the workers inherit it
    if args.block < 1:
        print(f"error: --block {args.block} must be >= 1", file=sys.stderr)
        return 2
    if args.quick:
        args.steps, args.warmup, args.mem_steps = 5, 1, 2
        args.settle_iters = min(args.settle_iters, 40)
    import torch  # noqa: PLC0415 -- workers only: the parent sets OMP_NUM_THREADS first

    cuda = torch.cuda.is_available()
    base = DEMO_FLAGS + extra
    os.makedirs(args.workdir, exist_ok=True)
    log_path = os.path.join(args.workdir, "workers.log")
    results = print_header(args, base, log_path)
    # RSS follows live tensors only with glibc giving freed memory back at once: the trainer's
    # keep_cpu_allocations (which keeps it for the next step) is off in the memory workers
    mem_env = {} if cuda else {"MALLOC_MMAP_THRESHOLD_": "65536", "REMOE_KEEP_CPU_ALLOCATIONS": "0"}
    if 3 in args.stages:
        bench_stage3(args, base, log_path, mem_env, results)
    if 1 in args.stages:
        bench_stage1(args, base, log_path, mem_env, results)

    results["machine_end"] = machine_info()
    print(f"\nload average at the end: {results['machine_end']['load_average_1_5_15']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        print(f"results: {args.json}")
    return 0


def _load() -> str:
    return load_average()


if __name__ == "__main__":
    sys.exit(main())
