#!/usr/bin/env python
"""Where the time of one training step goes: a torch.profiler profile of the demo model's step on
CPU, grouped by phase, for ReMoE (at Stage III), TopK and dense side by side, with 1 and 2 threads.

    .venv/bin/python bench/profile_step.py                       # 1 and 2 threads, 4 profiled steps
    .venv/bin/python bench/profile_step.py --threads 1 --steps 6 --json out.json
    .venv/bin/python bench/profile_step.py -- --bf16              # flags after -- go to the trainer

Phases (ms per step; the sum is the profiled step):
  router         the router module (gating GEMM, ReLU or softmax/top-k, L1 / aux loss, statistics)
  permutation    megatron-core's token dispatcher: permute, (all-to-all), unpermute
  experts / MLP  the expert module (SwiGLU GEMMs, activation, prob scaling), or the dense MLP
  attention      self-attention (QKV, RoPE, core attention, projection)
  emb/norm/out   embedding, RMSNorms, output layer, cross-entropy
  grad accum     autograd's AccumulateGrad plus megatron-core DDP's main_grad accumulation hooks
  optimizer      `optimizer.step()` (gradient clipping, Adam, copies)
  mcore other    everything else in `train_step`: zero_grad buffers, schedule, loss reduction,
                 finalize_model_grads, non-finite check, controller step

Backward operators are charged to the phase of the forward operator that created them (autograd
sequence numbers), so every phase is forward + backward. The ReMoE model is timed at Stage III:
it resumes the settled checkpoint `bench_step.py` trains (and caches) for its own Stage III.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_step import DEMO_FLAGS, settled_checkpoint, variant_flags  # noqa: E402  (after the sys.path lines)
from machine import finish, format_machine, load_average, machine_info, split_passthrough  # noqa: E402  (after the sys.path lines)

from megatron.remoe.logs import configure  # noqa: E402  (after the sys.path lines; stdlib only)

PHASES = ["router", "permutation", "experts / MLP", "attention", "emb/norm/out", "grad accum",
          "optimizer", "mcore other"]
_PREFIX = "phase::"
_DISPATCHER_METHODS = ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess",
                       "combine_preprocess", "token_combine", "combine_postprocess")


def _range_hooks(module, phase: str) -> None:
    """Open a profiler range named after `phase` around every forward call of `module`."""
    import torch  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    stack = []

    def pre(*_):
        rf = torch.autograd.profiler.record_function(_PREFIX + phase)
        rf.__enter__()
        stack.append(rf)

    def post(*_):
        stack.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


def _wrap_method(obj, name: str, phase: str) -> None:
    import torch  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    fn = getattr(obj, name, None)
    if fn is None:
        return

    def wrapped(*args, **kwargs):
        with torch.autograd.profiler.record_function(_PREFIX + phase):
            return fn(*args, **kwargs)

    setattr(obj, name, wrapped)


def instrument(run) -> None:
    """Mark the model's modules and the optimizer with phase ranges."""
    from megatron.core.transformer.attention import Attention  # noqa: PLC0415 -- keeps torch/megatron-core out of --help
    from megatron.core.transformer.mlp import MLP  # noqa: PLC0415 -- keeps torch/megatron-core out of --help
    from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    for chunk in run.model:
        for module in chunk.modules():
            if isinstance(module, MoELayer):
                _range_hooks(module.router, "router")
                _range_hooks(module.experts, "experts / MLP")
                for name in _DISPATCHER_METHODS:
                    _wrap_method(module.token_dispatcher, name, "permutation")
            elif isinstance(module, MLP) and not getattr(module.linear_fc1, "is_expert", False):
                _range_hooks(module, "experts / MLP")
            elif isinstance(module, Attention):
                _range_hooks(module, "attention")
        # whatever the model's forward runs outside the phases above
        _range_hooks(chunk, "emb/norm/out")
    _wrap_method(run.optimizer, "step", "optimizer")


def phase_times(events) -> dict:
    """Self CPU time (us) per phase. An event's phase: its own range, else (backward) the phase
    of the forward op with its sequence number, else its parent's; top level: 'mcore other'."""
    seq_phase = {}
    phase_of = {}

    def own_range(ev):
        return ev.name[len(_PREFIX):] if ev.name.startswith(_PREFIX) else None

    events = sorted(events, key=lambda e: e.time_range.start)
    for ev in events:  # forward pass: parents come first in start order
        parent = phase_of.get(id(ev.cpu_parent)) if ev.cpu_parent is not None else None
        phase = own_range(ev) or parent
        if ev.name.startswith("autograd::engine::evaluate_function:"):
            if "AccumulateGrad" in ev.name:
                phase = "grad accum"
            elif ev.sequence_nr >= 0 and ev.sequence_nr in seq_phase:
                phase = seq_phase[ev.sequence_nr]
        phase = phase or "mcore other"
        phase_of[id(ev)] = phase
        if ev.sequence_nr >= 0 and not ev.name.startswith("autograd::") and ev.fwd_thread == 0 \
                and own_range(ev) is None and phase != "mcore other":
            seq_phase.setdefault(ev.sequence_nr, phase)
    totals, by_op = collections.Counter(), collections.Counter()
    for ev in events:
        totals[phase_of[id(ev)]] += ev.self_cpu_time_total
        top = ev
        while top.cpu_parent is not None and not top.cpu_parent.name.startswith(_PREFIX):
            top = top.cpu_parent  # the outermost operator below the phase range
        by_op[(phase_of[id(ev)], top.name)] += ev.self_cpu_time_total
    return dict(totals), by_op


def profile_variants(variants: dict, threads: int, steps: int, warmup: int, top: int = 0
                     ) -> dict:
    import torch  # noqa: PLC0415 -- keeps torch/megatron-core out of --help
    from bench_step import _build, _routing  # noqa: PLC0415 -- keeps torch/megatron-core out of --help
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    from megatron.remoe.training.step import train_step  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    torch.set_num_threads(threads)
    out = {}
    for name, flags in variants.items():
        run, it = _build(flags)
        instrument(run)
        routing = []
        for _ in range(warmup):
            train_step(run, it)
        t0 = time.perf_counter()
        for _ in range(steps):  # unprofiled, for the profiler's own overhead
            train_step(run, it)
        plain = (time.perf_counter() - t0) / steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                r = _routing(train_step(run, it).metrics)
                if r:
                    routing.append(r)
            profiled = (time.perf_counter() - t0) / steps
        us, by_op = phase_times(prof.events())
        out[name] = {"phase_ms": {p: us.get(p, 0.0) / 1e3 / steps for p in PHASES},
                     "step_s": plain, "profiled_step_s": profiled,
                     "experts_per_token": (sum(r["experts_per_token"] for r in routing)
                                           / len(routing)) if routing else None,
                     "top_ops": [(ph, op, t / 1e3 / steps) for (ph, op), t in
                                 by_op.most_common(top)]}
        extra = set(us) - set(PHASES)
        if extra:
            raise RuntimeError(f"unclassified phases {extra}")
        del run, it
        print(f"  {name}, {threads} thread(s): {plain:.3f} s/step", flush=True)
    return out


def print_table(results: dict) -> None:
    """One row per phase; one column per (variant, threads)."""
    cols = [(v, t) for t in sorted(results, key=int) for v in results[t]]
    head = "".join(f"{v + ' ' + t + 't':>16}" for v, t in cols)
    print(f"\n{'phase (ms/step)':<16}{head}")
    for p in PHASES:
        cells = []
        for v, t in cols:
            r = results[t][v]
            total = sum(r["phase_ms"].values())
            cells.append(f"{r['phase_ms'][p]:>8.1f} ({100 * r['phase_ms'][p] / total:>3.0f}%)")
        print(f"{p:<16}" + "".join(f"{c:>16}" for c in cells))
    print(f"{'profiled total':<16}" + "".join(
        f"{sum(results[t][v]['phase_ms'].values()):>16.1f}" for v, t in cols))
    print(f"{'step, no prof.':<16}" + "".join(
        f"{1e3 * results[t][v]['step_s']:>16.1f}" for v, t in cols))
    print(f"{'experts/token':<16}" + "".join(
        f"{results[t][v]['experts_per_token']:>16.2f}" if results[t][v]["experts_per_token"]
        else f"{'':>16}" for v, t in cols))


def main(argv=None) -> int:
    configure()  # the console: progress lines, known noise filtered

    argv = list(sys.argv[1:] if argv is None else argv)
    argv, extra = split_passthrough(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch threads [1 2]")
    p.add_argument("--steps", type=int, default=4, help="profiled steps per variant [4]")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first [3]")
    p.add_argument("--variants", nargs="+", default=["relu", "topk", "dense"],
                   help="bench_step.py variant names, e.g. relu-mcore topk-mcore dense-mcore "
                   "for megatron-core's CPU defaults (the 'before' profile)")
    p.add_argument("--workdir", default=os.path.join(os.path.dirname(HERE), "runs", "bench_step"),
                   help="where bench_step.py caches its settled ReMoE checkpoint")
    p.add_argument("--top", type=int, default=0,
                   help="also list the N most expensive top-level operators (phase, ms/step)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if any(t < 1 for t in args.threads) or args.steps < 1:
        print(f"error: --threads {args.threads} / --steps {args.steps} must be >= 1; "
              "pass positive values", file=sys.stderr)
        return 2

    base = DEMO_FLAGS + extra
    print(f"machine: {format_machine(machine_info())}")
    print(f"config:  {' '.join(base)}")
    variants = {n: base + variant_flags(n) for n in args.variants}
    relu = [n for n in variants if n.startswith("relu")]
    if relu:  # ReMoE at Stage III: resume bench_step.py's settled checkpoint
        os.makedirs(args.workdir, exist_ok=True)
        settle_flags, ckpt, _ = settled_checkpoint(base, args.workdir, 200, 1e-4,
                                                   os.path.join(args.workdir, "workers.log"))
        for n in relu:
            variants[n] = settle_flags + variant_flags(n)[2:] + ["--load", ckpt]
    results = {"machine": machine_info(), "config": base, "load_start": load_average()}
    per_threads = {}
    for t in args.threads:
        print(f"profiling with {t} thread(s), load average {load_average()} ...", flush=True)
        per_threads[str(t)] = profile_variants(variants, t, args.steps, args.warmup, args.top)
    results["profile"] = per_threads
    results["load_end"] = load_average()
    print_table(per_threads)
    if args.top:
        for t, per_variant in per_threads.items():
            for v, r in per_variant.items():
                print(f"\ntop operators, {v}, {t} thread(s) (ms/step):")
                for ph, op, ms in r["top_ops"]:
                    print(f"  {ms:8.1f}  {ph:<14} {op[:90]}")
    finish(results, args.json)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
