#!/usr/bin/env python
"""bf16 vs fp32 on CPU: the demo's ReMoE run (same data, steps and seed) trained once per dtype;
prints step time, tokens/s, the train-loss curve side by side (means over windows of steps), the
validation loss, and the sparsity / lambda of the controller (which stays fp32 in both), with the
mean sparsity over the last `--last` steps against the target.

    .venv/bin/python bench/bench_dtype.py                    # 200 steps per dtype, all cores
    .venv/bin/python bench/bench_dtype.py --iters 600 --json runs/bench_dtype/600.json
    # the same tables, CSVs and plot from two finished demo runs (`remoe demo --dtype fp32|bf16`):
    .venv/bin/python bench/bench_dtype.py --runs runs/demo-fp32/relu runs/demo-bf16/relu \\
        --csv-prefix docs/results/demo-dtype --plot docs/results/demo-dtype.png
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from machine import finish, format_machine, load_average, machine_info  # noqa: E402  (after the sys.path lines)

from megatron.remoe.logs import configure  # noqa: E402  (after the sys.path lines; stdlib only)

DTYPES = ("fp32", "bf16")
# per-step columns of the CSVs: metrics.jsonl keys
CSV_COLUMNS = ("iteration", "lm_loss", "moe_relu_sparsity", "moe_relu_l1_reg_coeff",
               "l1_reg_loss", "lr", "grad_norm")
SUMMARY_KEYS = ("s_per_step", "tokens_per_s", "valid/loss", "final_train_loss",
                "sparsity_last10", "target_sparsity", "final_lambda", "memory_gb")


def read_metrics(path: str, split: str = "train") -> list:
    with open(path, encoding="utf-8") as f:
        rows = [r for r in map(json.loads, f) if r.get("split") == split]
    return [r for r in rows if "lm_loss" in r] if split == "train" else rows


def window_means(rows: list, key: str, window: int) -> list:
    out = []
    for start in range(0, len(rows), window):
        chunk = [r[key] for r in rows[start:start + window] if r.get(key) is not None]
        if chunk:
            out.append((rows[start]["iteration"], rows[start + len(chunk) - 1]["iteration"],
                        sum(chunk) / len(chunk)))
    return out


def last_mean(rows: list, key: str, n: int):
    """Mean of `key` over the last `n` steps (None without values)."""
    tail = [r[key] for r in rows[-n:] if r.get(key) is not None]
    return sum(tail) / len(tail) if tail else None


def stage3_stats(rows: list, target: float, window: int) -> dict:
    """How the controller holds the target from the first step at it (Stage III): std of the
    per-step sparsity, min / max of its `window`-step means, decades lambda spans."""
    start = next((i for i, r in enumerate(rows) if r["moe_relu_sparsity"] >= target), None)
    if start is None:
        return {}
    stage3 = rows[start:]
    s = [r["moe_relu_sparsity"] for r in stage3]
    mean = sum(s) / len(s)
    means = [m for _, _, m in window_means(stage3, "moe_relu_sparsity", window)][:-1] or [mean]
    lam = [r["moe_relu_l1_reg_coeff"] for r in stage3]
    return {"from_step": stage3[0]["iteration"], "mean": mean,
            "std": (sum((x - mean) ** 2 for x in s) / len(s)) ** 0.5,
            "window_min": min(means), "window_max": max(means),
            "log10_lambda_range": math.log10(max(lam) / min(lam))}


def run_record(summary: dict, metrics_file: str, window: int, last: int) -> dict:
    """One dtype's results: the summary numbers, the per-step rows and their window means."""
    rows = read_metrics(metrics_file)
    record = {"summary": {k: summary.get(k) for k in SUMMARY_KEYS},
              "rows": [{k: r.get(k) for k in CSV_COLUMNS} for r in rows],
              "valid": [(r["iteration"], r["valid/loss"])
                        for r in read_metrics(metrics_file, "valid") if "valid/loss" in r],
              "windows": window_means(rows, "lm_loss", window),
              "sparsity_windows": window_means(rows, "moe_relu_sparsity", window)}
    record["summary"][f"sparsity_last{last}"] = last_mean(rows, "moe_relu_sparsity", last)
    if summary.get("target_sparsity") is not None:
        record["stage3"] = stage3_stats(rows, summary["target_sparsity"], window)
    return record


def train_runs(args) -> dict:
    """Train the demo's ReMoE run once per dtype; {dtype: (summary, metrics file)}."""
    from megatron.remoe.cli.demo import train  # noqa: PLC0415 -- keeps torch/megatron-core out of --help
    from megatron.remoe.cpu.settings import demo_settings, describe_settings  # noqa: PLC0415 -- keeps torch/megatron-core out of --help
    from megatron.remoe.data.demo import prepare_demo_data  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    data = prepare_demo_data(args.data, tokenizer="bpe", vocab_size=8192)
    out = {}
    for dtype in DTYPES:
        settings = demo_settings(1, threads=args.threads, dtype=dtype)
        print(f"\n{dtype}: {describe_settings(settings)}; load average {load_average()}",
              flush=True)
        summary = train("relu", data, os.path.join(args.out, dtype), args.iters, 1, settings)
        out[dtype] = (summary, summary["metrics_file"])
    return out


def finished_runs(run_dirs: list) -> dict:
    """Two finished demo runs (fp32 first, then bf16): {dtype: (summary, metrics file)}."""
    out = {}
    for dtype, run_dir in zip(DTYPES, run_dirs):
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as f:
            bf16 = "bf16: true" in f.read()
        if bf16 != (dtype == "bf16"):
            raise SystemExit(f"error: {run_dir} is not the {dtype} run; pass the fp32 run first, "
                             "then the bf16 run")
        out[dtype] = (summary, os.path.join(run_dir, "metrics.jsonl"))
    return out


def print_tables(runs: dict, window: int, last: int) -> None:
    f32, b16 = runs["fp32"], runs["bf16"]
    print(f"\n{'':<22}{'fp32':>12}{'bf16':>12}{'bf16/fp32':>11}")
    for key, fmt in (("s_per_step", ".3f"), ("tokens_per_s", ",.0f"), ("valid/loss", ".4f"),
                     ("final_train_loss", ".4f"), ("sparsity_last10", ".3f"),
                     (f"sparsity_last{last}", ".4f"), ("target_sparsity", ".3f"),
                     ("final_lambda", ".2e"), ("memory_gb", ".2f")):
        a, b = f32["summary"].get(key), b16["summary"].get(key)
        if a is None or b is None:
            continue
        ratio = f"{b / a:>11.3f}" if a and b else ""
        print(f"{key:<22}{format(a, fmt):>12}{format(b, fmt):>12}{ratio}")
    target = f32["summary"].get("target_sparsity")
    if target is not None:
        for dtype in DTYPES:
            s = runs[dtype]["summary"][f"sparsity_last{last}"]
            print(f"{dtype}: sparsity over the last {last} steps {s:.4f}, target {target:.4f}, "
                  f"off by {s - target:+.4f}")
        print(f"Stage III (from the first step at the target): {'':<4}{'fp32':>10}{'bf16':>10}")
        for key, fmt in (("from_step", "d"), ("mean", ".4f"), ("std", ".4f"),
                         ("window_min", ".4f"), ("window_max", ".4f"),
                         ("log10_lambda_range", ".2f")):
            cells = [runs[d].get("stage3", {}).get(key) for d in DTYPES]
            if None not in cells:
                label = key if not key.startswith("window") else f"{key} ({window}-step means)"
                print(f"  {label:<47}" + "".join(f"{format(c, fmt):>10}" for c in cells))
    print(f"\ntrain loss, mean over steps (window {window}):")
    print(f"{'steps':<12}{'fp32':>10}{'bf16':>10}{'diff':>10}{'sparsity fp32':>15}"
          f"{'bf16':>8}")
    for (a0, a1, la), (_, _, lb), (_, _, sa), (_, _, sb) in zip(
            f32["windows"], b16["windows"], f32["sparsity_windows"], b16["sparsity_windows"]):
        print(f"{f'{a0}-{a1}':<12}{la:>10.4f}{lb:>10.4f}{lb - la:>+10.4f}{sa:>15.3f}{sb:>8.3f}")


def write_csvs(runs: dict, prefix: str) -> list:
    """Per-step CSVs `<prefix>-fp32.csv` and `<prefix>-bf16.csv`; returns their paths."""
    paths = []
    for dtype in DTYPES:
        path = f"{prefix}-{dtype}.csv"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(runs[dtype]["rows"])
        paths.append(path)
    return paths


def plot(runs: dict, path: str, window: int, last: int) -> str:
    """Train loss (raw faint, `window`-step means), sparsity (same) with the target and lambda of
    both dtypes side by side. matplotlib: the `plots` extra."""
    import matplotlib  # noqa: PLC0415 -- optional extra (plots)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 -- optional extra (plots), after matplotlib.use('Agg')

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {"fp32": "tab:blue", "bf16": "tab:orange"}
    target = runs["fp32"]["summary"].get("target_sparsity")
    for dtype in DTYPES:
        rows, c = runs[dtype]["rows"], colors[dtype]
        steps = [r["iteration"] for r in rows]
        for ax, key in ((axes[0], "lm_loss"), (axes[1], "moe_relu_sparsity")):
            values = [r[key] for r in rows]
            ax.plot(steps, values, color=c, alpha=0.25, lw=0.6)
            ax.plot([(a + b) / 2 for a, b, _ in window_means(rows, key, window)],
                    [m for _, _, m in window_means(rows, key, window)], color=c, lw=1.6,
                    label=f"{dtype} ({window}-step mean)")
        axes[2].semilogy(steps, [r["moe_relu_l1_reg_coeff"] for r in rows], color=c, lw=1.1,
                         label=dtype)
        valid = runs[dtype]["valid"]
        if valid:
            axes[0].plot(*zip(*valid), "o", color=c, ms=4, label=f"{dtype} validation")
    if target is not None:
        axes[1].axhline(target, color="k", ls="--", lw=0.8, label=f"target {target:.3f}")
        axes[1].axhspan(target - 0.01, target + 0.01, color="k", alpha=0.07)
        axes[1].set_ylim(max(0.0, target - 0.15), min(1.0, target + 0.08))
    for ax, label in zip(axes, ("LM loss", "sparsity", "lambda (L1 coefficient)")):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_title(f"band: target +-0.01 (checked on the last {last} steps)", fontsize=9)
    fig.suptitle("ReMoE demo, fp32 vs bf16 (same seed, data and schedule)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=200, help="training steps per dtype [200]")
    p.add_argument("--threads", type=int, default=None, help="torch threads [usable cores]")
    p.add_argument("--window", type=int, default=25, help="loss-curve window in steps [25]")
    p.add_argument("--last", type=int, default=50,
                   help="steps at the end over which the sparsity is averaged [50]")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_dtype"))
    p.add_argument("--data", default=os.path.join(ROOT, "runs", "demo", "data"),
                   help="the demo's data directory (built if missing)")
    p.add_argument("--runs", nargs=2, metavar=("FP32_RUN", "BF16_RUN"), default=None,
                   help="read two finished demo runs (<demo out>/relu) instead of training")
    p.add_argument("--csv-prefix", default=None,
                   help="write per-step CSVs PREFIX-fp32.csv and PREFIX-bf16.csv")
    p.add_argument("--plot", default=None, help="write the side-by-side figure (PNG) here")
    p.add_argument("--json", default=None)
    return p


def main(argv=None) -> int:
    configure()  # the console: progress lines, known noise filtered

    args = build_parser().parse_args(argv)
    if args.iters < 2 or (args.threads is not None and args.threads < 1) or args.window < 1 \
            or args.last < 1:
        print(f"error: --iters {args.iters} must be >= 2, --threads {args.threads}, --window "
              f"{args.window} and --last {args.last} >= 1", file=sys.stderr)
        return 2
    print(f"machine: {format_machine(machine_info())}")
    results = {"load_start": load_average(), "runs": {}}
    trained = finished_runs(args.runs) if args.runs else train_runs(args)
    for dtype, (summary, metrics_file) in trained.items():
        results["runs"][dtype] = run_record(summary, metrics_file, args.window, args.last)
    results["load_end"] = load_average()
    print_tables(results["runs"], args.window, args.last)
    if args.csv_prefix:
        print("per-step CSVs: " + ", ".join(write_csvs(results["runs"], args.csv_prefix)))
    if args.plot:
        print(f"figure: {plot(results['runs'], args.plot, args.window, args.last)}")
    finish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
