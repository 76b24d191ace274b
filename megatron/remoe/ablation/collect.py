"""Reading finished runs: one record per run (scalars for the tables, traces for the plots), and
`collect`, which writes results.csv, summary.csv, results.md, results.json and plots/ for a grid.

FLOPs come from the run's own config (megatron.remoe.model.flops_per_token); a ReLU run's are
counted per step at its measured sparsity. Definitions: docs/results.md."""

from __future__ import annotations

import itertools
import json
import os
import re
from typing import Optional

from megatron.remoe.ablation.compare import add_time_to_quality, paired_comparisons
from megatron.remoe.ablation.grid import CM, Grid, RunSpec, run_dir
from megatron.remoe.ablation.plots import make_plots
from megatron.remoe.ablation.report import aggregate, markdown_comparisons, markdown_tables, write_csv
from megatron.remoe.ablation.rundir import read_metrics, read_summary, resolved_config
from megatron.remoe.ablation.stages import (
    compute_match_extra_steps,
    smooth,
    sparsity_stages,
    stage3_steadiness,
)
from megatron.remoe.model import flops_per_token

LAYER_KEY = re.compile(r"^moe/layer_(\d+)/(sparsity|zero_expert_tokens|dead_experts)$")


def layer_allocation(train: list, fraction: float = 0.1) -> dict:
    """Per-layer routing at the end of a run: mean sparsity and zero-expert-token fraction over
    the last `fraction` of the steps (at least 10), and the dead experts of the last logging
    window (experts that got no token during it). Keys layer{N}_sparsity / _zero_tokens /
    _dead_experts."""
    if not train:
        return {}
    tail = train[-max(10, int(len(train) * fraction)):]
    sums: dict = {}
    out: dict = {}
    for rec in tail:
        for key, value in rec.items():
            m = LAYER_KEY.match(key)
            if not m or value is None:
                continue
            layer, what = int(m.group(1)), m.group(2)
            if what == "dead_experts":
                continue
            sums.setdefault((layer, what), []).append(value)
    for (layer, what), vals in sorted(sums.items()):
        name = "sparsity" if what == "sparsity" else "zero_tokens"
        out[f"layer{layer}_{name}"] = sum(vals) / len(vals)
    for rec in reversed(train):
        dead = {int(LAYER_KEY.match(k).group(1)): v for k, v in rec.items()
                if LAYER_KEY.match(k) and k.endswith("/dead_experts")}
        if dead:
            for layer in sorted(dead):
                out[f"layer{layer}_dead_experts"] = dead[layer]
            break
    return out


def vocab_from_params(params: dict, hidden: int) -> int:
    """The padded vocabulary: summary params count 2 x vocab x hidden embedding parameters."""
    return int(round((params["active"] - params["active_non_embedding"]) / (2 * hidden)))


def _loss_fields(rec: dict, summary: dict, valid: list) -> list:
    """Final and best validation loss (overall and per domain) into `rec`; returns the
    (step, loss) evaluations of the overall loss."""
    losses = [(r["iteration"], r["valid/loss"]) for r in valid if "valid/loss" in r]
    rec["final_valid_loss"] = summary.get("valid/loss")
    if losses:
        best = min(losses, key=lambda x: x[1])
        rec["best_valid_loss"], rec["best_valid_step"] = best[1], best[0]
    domains = sorted({k.split("/")[1] for r in valid for k in r
                      if k.startswith("valid/") and k.endswith("/loss") and k != "valid/loss"})
    for d in domains:
        key = f"valid/{d}/loss"
        rec[f"final_valid_{d}"] = summary.get(key)
        vals = [r[key] for r in valid if key in r]
        rec[f"best_valid_{d}"] = min(vals) if vals else None
    return losses


def _summary_fields(rec: dict, summary: dict, nominal: dict) -> None:
    rec["final_train_loss"] = summary.get("final_train_loss")
    rec["tokens_per_s"] = summary.get("tokens_per_s")
    rec["s_per_step"] = summary.get("s_per_step")
    rec["wall_s"] = summary.get("wall_s")
    rec["active_params"] = summary["params"]["active"]
    rec["active_params_non_embedding"] = summary["params"]["active_non_embedding"]
    rec["total_params"] = summary["params"]["total"]
    rec["train_flops_per_token"] = nominal["train"]


def _relu_fields(grid: Grid, rec: dict, traces: dict, cfg: dict, summary: dict, train: list,
                 vocab: int, nominal: dict) -> list:
    """Stages, settling, compute matching and Stage III steadiness of a ReLU run into `rec` and
    its sparsity/lambda traces into `traces`; returns the train FLOPs per token of each step (at
    the step's measured sparsity)."""
    steps = traces["step"]
    sparsity = [r.get("moe_relu_sparsity") for r in train]
    target = summary.get("target_sparsity")
    e_tot = cfg["num_experts"] * cfg["moe_granularity"]
    k_tot = cfg["moe_router_topk"] * cfg["moe_granularity"]
    stages = sparsity_stages(sparsity, target, grid.settle_tol, grid.settle_window,
                             first_step=steps[0])
    per_step = [flops_per_token(cfg, vocab, e_tot * (1 - s))["train"] for s in sparsity]
    rec.update(target_sparsity=target, sparsity_first=sparsity[0],
               sparsity_last10=summary.get("sparsity_last10"),
               final_lambda=summary.get("final_lambda"),
               stage2_step=stages["stage2"], reach_step=stages["reach"],
               settle_step=stages["settle"],
               extra_compute_steps=compute_match_extra_steps(
                   sparsity, e_tot, k_tot, nominal["moe_share"], stages["reach"], steps[0]))
    lambdas = [r.get("moe_relu_l1_reg_coeff") for r in train]
    reach = None if stages["reach"] is None else stages["reach"] - steps[0]
    rec.update(stage3_steadiness(sparsity, lambdas, reach))
    traces.update(sparsity=sparsity, **{"lambda": lambdas},
                  sparsity_smooth=smooth(sparsity, grid.settle_window), stages=stages)
    return per_step


def collect_run(grid: Grid, spec: RunSpec) -> Optional[dict]:
    """One finished run's record: scalars (for the CSV/table) and traces (for JSON/plots)."""
    path = run_dir(grid, spec.name)
    summary = read_summary(path)
    if not summary:
        return None
    cfg = resolved_config(path, grid.nproc)
    if summary.get("iterations") != cfg["train_iters"]:
        return None
    train, valid = read_metrics(path)
    vocab = vocab_from_params(summary["params"], cfg["hidden_size"])
    tokens_per_step = cfg["global_batch_size"] * cfg["seq_length"]
    nominal = flops_per_token(cfg, vocab)
    rec = {"name": spec.name, "group": spec.group, "router": spec.router,
           "seed": cfg["seed"], "steps": summary["iterations"]}
    rec.update({axis: value for axis, value in spec.axes.items() if axis not in ("router", "seed")})
    losses = _loss_fields(rec, summary, valid)
    _summary_fields(rec, summary, nominal)
    traces = {"step": [r["iteration"] for r in train],
              "train_loss": [r.get("lm_loss") for r in train],
              "valid_step": [s for s, _ in losses], "valid_loss": [v for _, v in losses]}
    total_flops = nominal["train"] * tokens_per_step * len(train)
    per_step = [nominal["train"]] * len(train)  # train FLOPs per token of each step
    sparsity = [r.get("moe_relu_sparsity") for r in train]
    if spec.router == "relu" and sparsity and all(s is not None for s in sparsity):
        per_step = _relu_fields(grid, rec, traces, cfg, summary, train, vocab, nominal)
        total_flops = sum(per_step) * tokens_per_step
    if spec.router in ("relu", "topk", CM, "topk-sigmoid-bias"):
        rec.update(layer_allocation(train))
    rec["mean_train_flops_per_token"] = total_flops / (tokens_per_step * max(len(train), 1))
    rec["total_train_flops"] = total_flops
    rec["tokens"] = summary["iterations"] * tokens_per_step
    traces["cum_flops"] = list(itertools.accumulate(f * tokens_per_step for f in per_step))
    traces["tokens_per_step"] = tokens_per_step
    if spec.router == CM:
        base = grid.run(spec.topk).fields.get("train_iters")
        rec["extra_steps"] = summary["iterations"] - base
    return {"scalars": rec, "traces": traces}


def collect(grid: Grid, plots: bool = True) -> dict:
    """Read every finished run, write results.csv (per run), summary.csv (per group: mean/std),
    results.md (tables), results.json (scalars + traces) and plots/*.png under grid.out."""
    records, traces, missing = [], {}, []
    for spec in grid.runs:
        got = collect_run(grid, spec)
        if got is None:
            missing.append(spec.name)
            continue
        records.append(got["scalars"])
        traces[spec.name] = got["traces"]
    os.makedirs(grid.out, exist_ok=True)
    add_time_to_quality(grid, records, traces)
    rows = aggregate(records)
    comparisons = paired_comparisons(grid, records)
    write_csv(os.path.join(grid.out, "results.csv"), records)
    write_csv(os.path.join(grid.out, "summary.csv"), rows)
    with open(os.path.join(grid.out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump({"grid": grid.name, "runs": records, "groups": rows, "traces": traces,
                   "comparisons": comparisons, "missing": missing}, fh, indent=1)
    table = (markdown_tables(grid, rows) + markdown_comparisons(rows, comparisons)) if rows \
        else "(no finished runs)\n"
    with open(os.path.join(grid.out, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(f"# Ablation `{grid.name}`: {len(records)} of {len(grid.runs)} runs finished\n\n")
        if missing:
            fh.write("Not finished: " + ", ".join(f"`{m}`" for m in missing) + "\n\n")
        fh.write(table)
    written = []
    if plots and records:
        written = make_plots(grid, records, rows, traces)
    return {"records": records, "rows": rows, "missing": missing, "table": table,
            "plots": written, "comparisons": comparisons}
