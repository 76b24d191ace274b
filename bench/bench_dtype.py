#!/usr/bin/env python
"""bf16 vs fp32 on CPU: the demo's ReMoE run (same data, steps and seed) trained once per dtype;
prints step time, tokens/s, the train-loss curve side by side (means over windows of steps), the
validation loss, and the sparsity / lambda of the controller (which stays fp32 in both).

    .venv/bin/python bench/bench_dtype.py                    # 200 steps per dtype, all cores
    .venv/bin/python bench/bench_dtype.py --iters 600 --json runs/bench_dtype/600.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from megatron.remoe.logs import configure  # noqa: E402  (after the sys.path lines; stdlib only)


def read_metrics(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r.get("split") == "train" and "lm_loss" in r]


def window_means(rows: list, key: str, window: int) -> list:
    out = []
    for start in range(0, len(rows), window):
        chunk = [r[key] for r in rows[start:start + window] if r.get(key) is not None]
        if chunk:
            out.append((rows[start]["iteration"], rows[start + len(chunk) - 1]["iteration"],
                        sum(chunk) / len(chunk)))
    return out


def main(argv=None) -> int:
    configure()  # the console: progress lines, known noise filtered
    from machine import finish

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=200, help="training steps per dtype [200]")
    p.add_argument("--threads", type=int, default=None, help="torch threads [usable cores]")
    p.add_argument("--window", type=int, default=25, help="loss-curve window in steps [25]")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_dtype"))
    p.add_argument("--data", default=os.path.join(ROOT, "runs", "demo", "data"),
                   help="the demo's data directory (built if missing)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.iters < 2 or (args.threads is not None and args.threads < 1):
        print(f"error: --iters {args.iters} must be >= 2 and --threads {args.threads} >= 1",
              file=sys.stderr)
        return 2

    from machine import format_machine, load_average, machine_info

    from megatron.remoe.cpu_settings import demo_settings, describe_settings
    from megatron.remoe.data.demo import prepare_demo_data
    from megatron.remoe.demo import train

    print(f"machine: {format_machine(machine_info())}")
    data = prepare_demo_data(args.data, tokenizer="bpe", vocab_size=8192)
    results = {"load_start": load_average(), "runs": {}}
    for dtype in ("fp32", "bf16"):
        settings = demo_settings(1, threads=args.threads, dtype=dtype)
        print(f"\n{dtype}: {describe_settings(settings)}; load average {load_average()}",
              flush=True)
        summary = train("relu", data, os.path.join(args.out, dtype), args.iters, 1, settings)
        rows = read_metrics(summary["metrics_file"])
        results["runs"][dtype] = {
            "summary": {k: summary.get(k) for k in (
                "s_per_step", "tokens_per_s", "valid/loss", "final_train_loss",
                "sparsity_last10", "target_sparsity", "final_lambda", "memory_gb")},
            "loss": [r["lm_loss"] for r in rows],
            "sparsity": [r.get("moe_relu_sparsity") for r in rows],
            "lambda": [r.get("moe_relu_l1_reg_coeff") for r in rows],
            "iteration": [r["iteration"] for r in rows]}
        results["runs"][dtype]["windows"] = window_means(rows, "lm_loss", args.window)
        results["runs"][dtype]["sparsity_windows"] = window_means(rows, "moe_relu_sparsity",
                                                                  args.window)
    results["load_end"] = load_average()

    f32, b16 = results["runs"]["fp32"], results["runs"]["bf16"]
    print(f"\n{'':<22}{'fp32':>12}{'bf16':>12}{'bf16/fp32':>11}")
    for key, fmt in (("s_per_step", ".3f"), ("tokens_per_s", ",.0f"), ("valid/loss", ".4f"),
                     ("final_train_loss", ".4f"), ("sparsity_last10", ".3f"),
                     ("final_lambda", ".2e"), ("memory_gb", ".2f")):
        a, b = f32["summary"][key], b16["summary"][key]
        ratio = f"{b / a:>11.3f}" if a and b else ""
        print(f"{key:<22}{format(a, fmt):>12}{format(b, fmt):>12}{ratio}")
    print(f"\ntrain loss, mean over steps (window {args.window}):")
    print(f"{'steps':<12}{'fp32':>10}{'bf16':>10}{'diff':>10}{'sparsity fp32':>15}"
          f"{'bf16':>8}")
    for (a0, a1, la), (_, _, lb), (_, _, sa), (_, _, sb) in zip(
            f32["windows"], b16["windows"], f32["sparsity_windows"], b16["sparsity_windows"]):
        print(f"{f'{a0}-{a1}':<12}{la:>10.4f}{lb:>10.4f}{lb - la:>+10.4f}{sa:>15.3f}{sb:>8.3f}")
    finish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
