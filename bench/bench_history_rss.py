#!/usr/bin/env python
"""Resident memory of the training loop over a long run: the per-step bookkeeping must not grow.

    .venv/bin/python bench/bench_history_rss.py                   # 20k steps, 24 MoE layers
    .venv/bin/python bench/bench_history_rss.py --steps 300 --every 100 --layers 2   # smoke run

The trainer's own loop (`megatron.remoe.training.loop.pretrain`: TrainLoop, metrics, logging, the
run summary) runs for `--steps` iterations of a tiny ReMoE GPT with `--layers` MoE layers on
synthetic data. Only the step itself is replaced: the first call runs the real `train_step`, every
later call returns a fresh copy of its metrics (new float objects, as a real step produces: every
layer's sparsity, experts per token, zero-expert tokens and load), so 20k steps take seconds, not
hours. RSS is sampled every `--every` steps; printed: the RSS per sample and the growth per 1k
steps (least-squares slope after the first sample), for the loop as it is ("bounded") and, in the
same process afterwards, for the loop keeping every step's metrics as it did before
(`--no-compare` skips that). Not a timed benchmark: no timing is reported.
"""

from __future__ import annotations

import argparse
import os
import sys

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from machine import format_machine, machine_info  # noqa: E402  (after the sys.path lines)

from megatron.remoe.logs import configure  # noqa: E402  (after the sys.path lines; stdlib only)


def trainer_flags(steps: int, layers: int, every: int) -> list:
    return ["--num-layers", str(layers), "--hidden-size", "16", "--num-attention-heads", "2",
            "--ffn-hidden-size", "32", "--seq-length", "8", "--router", "relu",
            "--num-experts", "4", "--moe-router-topk", "1", "--micro-batch-size", "1",
            "--global-batch-size", "1", "--train-iters", str(steps), "--log-interval", str(every),
            "--eval-iters", "0", "--mock-data", "--vocab-size", "128", "--lr", "1e-3"]


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def measure(cfg, every: int, keep_every_step: bool) -> list:
    """(steps, RSS MB) every `every` steps of one `pretrain(cfg)` with the step replaced, and at
    its end."""
    from megatron.remoe.training import loop as training  # noqa: PLC0415 -- keeps torch/megatron-core out of --help
    from megatron.remoe.training.distributed import destroy_distributed  # noqa: PLC0415 -- keeps torch/megatron-core out of --help
    from megatron.remoe.training.loop import LoopParts  # noqa: PLC0415 -- keeps torch/megatron-core out of --help
    from megatron.remoe.training.step import StepResult  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    real_step, real_history = LoopParts().train_step, training.StepHistory
    samples, first = [], []

    def step(run, data_iterator, stop_flags=None):
        if not first:
            first.append(real_step(run, data_iterator, stop_flags))
        real = first[0]
        metrics = {k: v + 0.0 if isinstance(v, float) else v for k, v in real.metrics.items()}
        if run.iteration % every == 0:
            samples.append((run.iteration, rss_mb()))
        return StepResult(metrics, real.routing, real.stop)

    class EveryStepHistory(real_history):
        """The loop before the change: every step's metrics and time kept for the summary."""

        def __init__(self, log_interval):
            super().__init__(log_interval)
            self.every_step, self.step_times = [], []

        def add(self, metrics, seconds):
            super().add(metrics, seconds)
            self.every_step.append(metrics)
            self.step_times.append(seconds)

    if keep_every_step:  # StepHistory is loop.py's own class, replaced in its module
        training.StepHistory = EveryStepHistory
    try:
        training.pretrain(cfg, LoopParts(train_step=step))
        samples.append((cfg.train_iters, rss_mb()))  # after the summary
    finally:
        training.StepHistory = real_history
        destroy_distributed()
    return samples


def growth_per_1k(samples: list) -> float:
    """Least-squares slope of RSS over steps, MB per 1000 steps, without the first sample (the
    loop's one-off allocations: loaders, the first real step)."""
    points = samples[1:] if len(samples) > 2 else samples
    if len(points) < 2:
        return float("nan")
    n = len(points)
    mx = sum(s for s, _ in points) / n
    my = sum(m for _, m in points) / n
    sxx = sum((s - mx) ** 2 for s, _ in points)
    return 1000.0 * sum((s - mx) * (m - my) for s, m in points) / sxx


def main(argv=None) -> int:
    os.environ.setdefault("REMOE_LOG_LEVEL", "WARNING")  # the trainer's opening lines: not ours
    configure()

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20000, help="loop iterations [20000]")
    p.add_argument("--every", type=int, default=1000, help="RSS sample interval in steps [1000]")
    p.add_argument("--layers", type=int, default=24, help="MoE layers [24]")
    p.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip the emulated every-step history")
    args = p.parse_args(argv)
    if args.steps < 2 * args.every or args.every < 1 or args.layers < 1:
        print("error: need --steps >= 2 x --every >= 2 and --layers >= 1", file=sys.stderr)
        return 2
    from megatron.remoe.training.arguments import parse_config  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    cfg = parse_config(trainer_flags(args.steps, args.layers, args.every), prog="bench")
    runs = {"bounded": measure(cfg, args.every, keep_every_step=False)}
    if args.compare:
        runs["every step kept (before)"] = measure(cfg, args.every, keep_every_step=True)
    print(f"\nmachine: {format_machine(machine_info())}")
    print(f"{args.steps} steps, {args.layers} MoE layers; RSS in MB every {args.every} steps")
    names = list(runs)
    print(f"{'step':>8}  " + "  ".join(f"{n:>26}" for n in names))
    for i, (step, _) in enumerate(runs[names[0]]):
        print(f"{step:>8}  " + "  ".join(f"{runs[n][i][1]:>26.1f}" for n in names))
    for name in names:
        print(f"RSS growth per 1k steps, {name}: {growth_per_1k(runs[name]):+.3f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
