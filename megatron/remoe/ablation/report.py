"""Tables of a collected grid: per-group mean and std over seeds (`aggregate`), the CSV files,
and the Markdown tables of results.md."""

from __future__ import annotations

import csv
import math
import re

from megatron.remoe.ablation.grid import Grid


def aggregate(records: list) -> list:
    """Mean and sample std over the runs of each group (runs that differ only in the seed)."""
    groups: dict = {}
    for rec in records:
        groups.setdefault(rec["group"], []).append(rec)
    out = []
    for group, recs in groups.items():
        row = {"group": group, "router": recs[0]["router"], "seeds": len(recs),
               "seed_list": " ".join(str(r["seed"]) for r in recs)}
        keys = [k for k in recs[0] if k not in ("name", "group", "router", "seed")]
        for key in keys:
            vals = [r.get(key) for r in recs]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                mean = sum(vals) / len(vals)
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) \
                    if len(vals) > 1 else 0.0
                row[key], row[key + "_std"] = mean, std
            elif len({repr(v) for v in vals}) == 1:
                row[key] = vals[0]
            else:
                row[key] = None  # e.g. a settle step that is None for some seeds
                row[key + "_n"] = sum(v is not None for v in vals)
        out.append(row)
    return out


def write_csv(path: str, rows: list) -> None:
    keys: list = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})


def _pm(row: dict, key: str, fmt: str = "{:.4f}") -> str:
    v = row.get(key)
    if v is None:
        n = row.get(key + "_n")
        return f"- ({n}/{row['seeds']} seeds)" if n else "-"
    text = fmt.format(v)
    if row.get("seeds", 1) > 1 and (key + "_std") in row:
        text += " ± " + fmt.format(row[key + "_std"])
    return text


def markdown_tables(grid: Grid, rows: list) -> str:
    """The main table (validation loss, sparsity, settling, cost) and a per-domain table."""
    head = ["run", "seeds", "steps", "valid loss (final)", "valid loss (best)",
            "sparsity last 10 (target)", "Stage II / III start", "settled at",
            "active params (M)", "train MFLOPs/token (at k / run mean)", "train FLOPs (total)",
            "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["router"] == "relu":
            sp = f"{_pm(r, 'sparsity_last10', '{:.3f}')} ({r.get('target_sparsity', 0):.3f})"
            stages = f"{_pm(r, 'stage2_step', '{:.0f}')} / {_pm(r, 'reach_step', '{:.0f}')}"
            settle = _pm(r, "settle_step", "{:.0f}")
        else:
            sp = stages = settle = "-"
        steps = _pm(r, "steps", "{:.0f}")
        cells = [f"`{r['group']}`", str(r["seeds"]), steps, _pm(r, "final_valid_loss"),
                 _pm(r, "best_valid_loss"), sp, stages, settle,
                 f"{r['active_params'] / 1e6:.2f}",
                 f"{r['train_flops_per_token'] / 1e6:.1f} / "
                 f"{r['mean_train_flops_per_token'] / 1e6:.1f}",
                 f"{r['total_train_flops']:.3g}", f"{r['tokens_per_s']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    domains = sorted({k[len("final_valid_"):] for r in rows for k in r
                      if k.startswith("final_valid_") and not k.endswith(("_std", "_n"))
                      and k != "final_valid_loss"})
    if domains:
        lines += ["", "Per-domain validation loss (final, mean ± std over seeds):", "",
                  "| run | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
        for r in rows:
            lines.append(f"| `{r['group']}` | " + " | ".join(
                _pm(r, f"final_valid_{d}", "{:.3f}") for d in domains) + " |")
    return "\n".join(lines) + "\n"


def markdown_comparisons(rows: list, comparisons: list) -> str:
    """Tables: paired differences over seeds, time-to-quality against TopK, Stage III
    steadiness of ReLU runs, per-layer allocation at the end of the MoE runs."""
    lines = (_paired_table(comparisons) + _time_to_quality_table(rows) + _stage3_table(rows)
             + _allocation_table(rows))
    return "\n".join(lines) + ("\n" if lines else "")


def _paired_table(comparisons: list) -> list:
    if not comparisons:
        return []
    lines = ["", "Paired differences over seeds (final validation loss, first minus second; "
             "t-test on the per-seed differences):", "",
             "| first | second | seeds | mean difference ± std | t | p (two-sided) | "
             "seeds with that sign | larger than the seed spread (p < 0.05) |",
             "|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| `{c['a']}` | `{c['b']}` | {c['n']} | {c['mean']:+.4f} ± "
                     f"{c['std']:.4f} | {c['t']:.2f} | {c['p']:.3g} | {c['same_sign']}/"
                     f"{c['n']} | {'yes' if c['p'] < 0.05 else 'no'} |")
    return lines


def _time_to_quality_table(rows: list) -> list:
    ttq = [r for r in rows if r.get("ttq_target_loss") is not None]
    if not ttq:
        return []
    lines = ["", "Time to quality: when the run's validation curve reaches the final "
             "validation loss of the TopK run with the same seed and axes (ratio to the "
             "TopK run's total tokens / train FLOPs; < 1 = sooner):", "",
             "| run | TopK final loss | reached (seeds) | step | tokens ratio | "
             "FLOPs ratio |", "|---|---|---|---|---|---|"]
    for r in ttq:
        n = round(r.get("ttq_reached", 0) * r["seeds"])  # mean of 1/0 over seeds
        lines.append(f"| `{r['group']}` | {_pm(r, 'ttq_target_loss')} | {n}/{r['seeds']} "
                     f"| {_pm(r, 'ttq_step', '{:.0f}')} | "
                     f"{_pm(r, 'ttq_tokens_ratio', '{:.3f}')} | "
                     f"{_pm(r, 'ttq_flops_ratio', '{:.3f}')} |")
    return lines


def _stage3_table(rows: list) -> list:
    relu = [r for r in rows if r["router"] == "relu"]
    if not relu:
        return []
    lines = ["", "ReLU runs, Stage III (from the first step at target to the end):", "",
             "| run | Stage III from | settled at | std of S | log10 lambda range | "
             "final lambda | valid loss (final) |", "|---|---|---|---|---|---|---|"]
    for r in relu:
        lines.append(f"| `{r['group']}` | {_pm(r, 'reach_step', '{:.0f}')} | "
                     f"{_pm(r, 'settle_step', '{:.0f}')} | "
                     f"{_pm(r, 'stage3_sparsity_std', '{:.4f}')} | "
                     f"{_pm(r, 'stage3_log10_lambda_range', '{:.2f}')} | "
                     f"{_pm(r, 'final_lambda', '{:.2e}')} | {_pm(r, 'final_valid_loss')} |")
    return lines


def _allocation_table(rows: list) -> list:
    layered = [r for r in rows if any(k.startswith("layer") and k.endswith("_sparsity")
                                      for k in r)]
    if not layered:
        return []
    layers = sorted({int(k[5:-len("_sparsity")]) for r in layered for k in r
                     if re.fullmatch(r"layer\d+_sparsity", k)})
    lines = ["", "Per-layer allocation at the end of the run (last 10% of steps: sparsity / "
             "fraction of tokens with no expert; dead experts in the last logging window):",
             "", "| run | " + " | ".join(f"layer {n}" for n in layers) + " |",
             "|---|" + "---|" * len(layers)]
    for r in layered:
        cells = [f"{_pm(r, f'layer{n}_sparsity', '{:.3f}')} / "
                 f"{_pm(r, f'layer{n}_zero_tokens', '{:.3f}')} / "
                 f"{_pm(r, f'layer{n}_dead_experts', '{:.1f}')}" for n in layers]
        lines.append(f"| `{r['group']}` | " + " | ".join(cells) + " |")
    return lines


def one_line(s: dict) -> str:
    """The progress line of a finished run (printed by the runner)."""
    parts = [f"valid loss {s['final_valid_loss']:.4f}" if s.get("final_valid_loss") else
             "no validation"]
    if s.get("best_valid_loss") is not None:
        parts[-1] += f" (best {s['best_valid_loss']:.4f})"
    if s.get("sparsity_last10") is not None:
        settle = s.get("settle_step")
        parts.append(f"sparsity {s['sparsity_last10']:.3f}/{s['target_sparsity']:.3f}, "
                     f"stage III from step {s.get('reach_step')}, settled "
                     + (f"at step {settle}" if settle else "never"))
    if s.get("extra_steps") is not None:
        parts.append(f"{s['extra_steps']} extra steps")
    parts.append(f"{s['tokens_per_s']:,.0f} tok/s")
    return "; ".join(parts)
