"""The report folder: report.md (with the figures embedded), the CSV behind every figure and
analysis.json, computed from routing captures. `write_report` composes one function per section."""

from __future__ import annotations

import csv
import html
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from megatron.remoe.analysis.errors import AnalysisError
from megatron.remoe.analysis.figures import (
    fig_active_experts,
    fig_domain_share,
    fig_expert_load,
    fig_experts_vs_frequency,
    fig_flip_rate,
    figure_problems,
    pyplot,
)
from megatron.remoe.analysis.frequency import experts_by_frequency
from megatron.remoe.analysis.specialisation import (
    active_experts_by_domain,
    domain_expert_share,
    top_tokens_per_expert,
)
from megatron.remoe.analysis.summary import layer_summary
from megatron.remoe.logs import get_logger

logger = get_logger(__name__)


def _slug(label: str) -> str:
    s = "".join(c if c.isalnum() or c in "-_" else "_" for c in label.strip())
    return s or "model"


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for r in rows:
            w.writerow([_fmt_csv(x) for x in r])


def _fmt_csv(x):
    if isinstance(x, (float, np.floating)):
        return "" if math.isnan(x) else f"{float(x):.6g}"
    if isinstance(x, np.integer):
        return int(x)
    return x


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def token_text(tokenizer, token_id: int) -> str:
    """A readable form of one token: whitespace made visible."""
    if tokenizer is None or not hasattr(tokenizer, "decode"):
        return f"<{token_id}>"
    try:
        s = tokenizer.decode([token_id])
    except Exception:
        return f"<{token_id}>"
    s = s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return s.replace(" ", "\u2423") if s.strip() == "" or s.startswith(" ") else s


def _md_code(s: str) -> str:
    return "<code>" + html.escape(s).replace("|", "&#124;") + "</code>"


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


@dataclass
class AnalysisResult:
    out_dir: str
    report: str
    files: list
    figures: dict  # name -> matplotlib Figure (closed after saving; kept for inspection)
    captures: list
    summaries: dict  # label -> layer_summary rows
    flips: list  # [(label, other label, rows)]
    seconds: float = 0.0


def prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise AnalysisError(f"--out {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise AnalysisError(f"--out {out_dir} is not empty; pass --overwrite or choose another "
                            "directory")
    os.makedirs(out_dir, exist_ok=True)


@dataclass
class _Report:
    """The folder being written: report.md lines, files written, figures saved."""

    out_dir: str
    figures: bool  # write PNG figures (False: CSV + report.md only)
    md: list = field(default_factory=list)
    files: list = field(default_factory=list)
    figs: dict = field(default_factory=dict)

    def add(self, *lines: str) -> None:
        self.md.extend(lines)

    def save(self, name: str, fig) -> str:
        """Save a complete figure (refuses one without titles/labels/legend) as `name`."""
        problems = figure_problems(fig)
        if problems:
            raise AssertionError(f"figure {name} is incomplete: {problems}")
        path = os.path.join(self.out_dir, name)
        fig.savefig(path, dpi=110)
        self.figs[name] = fig
        self.files.append(path)
        pyplot().close(fig)
        return name

    def csv(self, name: str, header: Sequence[str], rows: Sequence[Sequence]) -> str:
        path = os.path.join(self.out_dir, name)
        _write_csv(path, header, rows)
        self.files.append(path)
        return name


def _k_ref(captures: list) -> Optional[float]:
    """The TopK reference line of the figures: k when every model has the same (or None)."""
    if len({c.topk for c in captures}) != 1:
        return None
    return float(captures[0].topk) if captures[0].topk else None


def _section_header(r: _Report, captures: list, meta: dict) -> dict:
    """Title, the models table and the analysed tokens; returns tokens per domain."""
    domain_names = captures[0].domain_names
    r.add(f"# Routing analysis: {', '.join(c.label for c in captures)}", "")
    r.add("Generated by `tools/analyze_routing.py` (`megatron.remoe.analysis`); see "
          "docs/analysis.md for what each figure means.", "")
    r.add(_md_table(
        ["model", "router", "checkpoint", "iteration", "MoE layers", "experts", "k",
         "tokens analysed"],
        [[c.label, c.router or "-", _md_code(str(c.info.get("checkpoint", "(in memory)"))),
          c.info.get("iteration", "-"), len(c.layer_numbers), c.num_experts,
          c.topk if c.topk is not None else "-", f"{c.num_tokens:,}"] for c in captures]), "")
    tpd = {d: int((captures[0].domains == i).sum()) for i, d in enumerate(domain_names)}
    r.add("Analysed tokens per domain: " + ", ".join(f"{d} {n:,}" for d, n in tpd.items()) + ".")
    if meta.get("data"):
        r.add("", "Evaluation data: " + ", ".join(f"{d} = {_md_code(p)}"
                                                  for d, p in meta["data"].items()) + ".")
    r.add("")
    return tpd


def _section_summary(r: _Report, captures: list) -> dict:
    """1. Per-layer summary (the headline numbers), losses and expert load; returns the rows."""
    summaries = {c.label: layer_summary(c.routing, c.layer_numbers) for c in captures}
    keys = ["layer", "tokens", "sparsity", "experts_per_token", "zero_expert_fraction",
            "dead_experts", "dead_expert_ids", "max_over_mean_load", "experts_per_token_hist"]
    summary_csv = r.csv("summary.csv", ["model"] + keys,
                        [[lab] + [row[k] for k in keys] for lab, rs in summaries.items()
                         for row in rs])
    r.add("## 1. Per-layer summary", "")
    r.add("Sparsity = fraction of zero entries of the routing map; dead experts = experts "
          "that received no analysed token; load = tokens routed to an expert. "
          f"Numbers: [{summary_csv}]({summary_csv}).", "")
    r.add(_md_table(
        ["model", "layer", "sparsity", "experts/token", "zero-expert tokens", "dead experts",
         "max/mean load"],
        [[lab, row["layer"], _f(row["sparsity"]), _f(row["experts_per_token"]),
          _f(row["zero_expert_fraction"]),
          f"{row['dead_experts']}" + (f" ({row['dead_expert_ids']})" if row["dead_experts"]
                                      else ""),
          _f(row["max_over_mean_load"], 2)] for lab, rs in summaries.items() for row in rs]), "")
    domain_names = captures[0].domain_names
    losses = [(c.label, c.domain_loss()) for c in captures if c.domain_loss()]
    if losses:
        r.add("Next-token loss on the analysed tokens (per domain):", "")
        r.add(_md_table(["model"] + domain_names + ["mean"],
                        [[lab] + [_f(dl.get(d)) for d in domain_names]
                         + [_f(float(np.mean(list(dl.values()))))] for lab, dl in losses]), "")
    loads = [(c.label, c.routing.sum(axis=1), c.layer_numbers) for c in captures]
    load_csv = r.csv("expert_load.csv", ["model", "layer", "expert", "tokens", "share"],
                     [[lab, layer, e, int(cnt[li, e]), cnt[li, e] / max(cnt[li].sum(), 1)]
                      for lab, cnt, layers in loads for li, layer in enumerate(layers)
                      for e in range(cnt.shape[1])])
    if r.figures:
        name = r.save("expert_load.png", fig_expert_load(loads))
        r.add(f"![expert load]({name})", "")
        r.add(f"Expert load per layer; numbers: [{load_csv}]({load_csv}).", "")
    return summaries


def _frequency_csv(r: _Report, captures: list, fr: list) -> str:
    rows = []
    for lab, res, layers in fr:
        for b in range(len(res["rank_lo"])):
            rows.append([lab, b, int(res["rank_lo"][b]), int(res["rank_hi"][b]),
                         int(res["count_hi"][b]), int(res["count_lo"][b]),
                         int(res["occurrences"][b]), int(res["types"][b]), res["mean"][b]]
                        + [res["per_layer"][b, li] for li in range(len(layers))])
    max_l = max(len(c.layer_numbers) for c in captures)
    layer_cols = [f"layer_{n}" for n in captures[0].layer_numbers] \
        if all(c.layer_numbers == captures[0].layer_numbers for c in captures) \
        else [f"moe_layer_{i}" for i in range(max_l)]
    return r.csv("experts_vs_frequency.csv",
                 ["model", "bucket", "rank_lo", "rank_hi", "train_count_max", "train_count_min",
                  "occurrences", "distinct_tokens", "mean_experts_per_token"] + layer_cols, rows)


def _section_frequency(r: _Report, captures: list, freq_counts: np.ndarray, freq_source: str,
                       num_buckets: int, meta: dict) -> None:
    """2. Experts per token vs token frequency (Fig. 7)."""
    r.add("## 2. Experts per token vs token frequency (paper Fig. 7)", "")
    r.add(f"Token frequency counted on {freq_source or 'the analysed data'}: "
          f"{int(freq_counts.sum()):,} tokens, vocabulary {len(freq_counts):,}. Tokens are "
          "bucketed by frequency rank with log-spaced bucket edges. With ReLU routing rarer "
          "tokens (higher rank, right) should get more experts; TopK gives every token exactly "
          "k.", "")
    fr = [(c.label, experts_by_frequency(c.routing, c.token_ids, freq_counts, num_buckets),
           c.layer_numbers) for c in captures]
    meta["frequency_correlation"] = {lab: res["corr"] for lab, res, _ in fr}
    fcsv = _frequency_csv(r, captures, fr)
    if r.figures:
        name = r.save("experts_vs_frequency.png",
                      fig_experts_vs_frequency(fr, _k_ref(captures)))
        r.add(f"![experts per token vs token frequency]({name})", "")
    r.add(f"Numbers: [{fcsv}]({fcsv}). Correlation between log(1 + training count) and "
          "experts per token (averaged over layers) over the analysed tokens: "
          + ", ".join(f"{lab} {_f(res['corr'])}" for lab, res, _ in fr)
          + " (negative: rarer tokens get more experts).", "")
    hdr = ["ranks", "train count"] + [f"{lab}: experts/token" for lab, _, _ in fr] + ["tokens"]
    r0 = fr[0][1]
    r.add(_md_table(hdr, [[f"{r0['rank_lo'][b]}-{r0['rank_hi'][b]}",
                           f"{r0['count_hi'][b]:,}-{r0['count_lo'][b]:,}"]
                          + [_f(res["mean"][b], 2) for _, res, _ in fr]
                          + [f"{r0['occurrences'][b]:,}"]
                          for b in range(len(r0["rank_lo"])) if r0["occurrences"][b]]), "")


def _largest_shares(c, share: np.ndarray, domain_names: list) -> str:
    """The three most specialised (layer, domain, expert) cells of one model, as a sentence."""
    D = len(domain_names)
    best = sorted(((share[li, d, e], li, d, e) for li in range(share.shape[0])
                   for d in range(D) for e in range(c.num_experts)), reverse=True)[:3]
    return (f"{c.label}: largest shares: " + "; ".join(
        f"layer {c.layer_numbers[li]} expert {e} takes {s:.0%} of {domain_names[d]}"
        for s, li, d, e in best) + f" (uniform would be {1 / c.num_experts:.0%}).")


def _section_domain_share(r: _Report, captures: list) -> None:
    """3. Expert share by domain, per layer (Fig. 9)."""
    domain_names = captures[0].domain_names
    D = len(domain_names)
    r.add("## 3. Expert share by domain, per layer (paper Fig. 9)", "")
    r.add("For each layer and domain: the share of that domain's routed (token, expert) "
          "assignments that go to each expert (each row sums to 1). Uniform rows mean no "
          "specialisation; a bright cell is an expert that takes most of a domain.", "")
    rows = []
    shares = {c.label: domain_expert_share(c.routing, c.domains, D) for c in captures}
    vmax = max(float(s.max()) for _, s in shares.values())
    for c in captures:
        counts, share = shares[c.label]
        for li, layer in enumerate(c.layer_numbers):
            for d, dn in enumerate(domain_names):
                for e in range(c.num_experts):
                    rows.append([c.label, layer, dn, e, int(counts[li, d, e]), share[li, d, e]])
        if r.figures:
            name = r.save(f"domain_expert_share_{_slug(c.label)}.png",
                          fig_domain_share(c.label, share, c.layer_numbers, domain_names, vmax))
            r.add(f"![domain x expert share, {c.label}]({name})", "")
        r.add(_largest_shares(c, share, domain_names), "")
    dcsv = r.csv("domain_expert_share.csv",
                 ["model", "layer", "domain", "expert", "assignments", "share"], rows)
    r.add(f"Numbers: [{dcsv}]({dcsv}).", "")


def _section_active_experts(r: _Report, captures: list) -> None:
    """4. Active experts per layer and domain (Fig. 12)."""
    domain_names = captures[0].domain_names
    D = len(domain_names)
    r.add("## 4. Active experts per layer and domain (paper Fig. 12)", "")
    act, rows = [], []
    for c in captures:
        mean, tokens = active_experts_by_domain(c.routing, c.domains, D)
        act.append((c.label, mean, c.layer_numbers))
        for li, layer in enumerate(c.layer_numbers):
            for d, dn in enumerate(domain_names):
                rows.append([c.label, layer, dn, int(tokens[d]), mean[li, d]])
    acsv = r.csv("active_experts.csv",
                 ["model", "layer", "domain", "tokens", "mean_experts_per_token"], rows)
    if r.figures:
        name = r.save("active_experts.png",
                      fig_active_experts(act, domain_names, _k_ref(captures)))
        r.add(f"![active experts per layer and domain]({name})", "")
    r.add(f"Mean experts per token; numbers: [{acsv}]({acsv}).", "")
    r.add(_md_table(["model", "layer"] + domain_names + ["spread (max-min)"],
                    [[lab, layer] + [_f(mean[li, d], 2) for d in range(D)]
                     + [_f(float(np.nanmax(mean[li]) - np.nanmin(mean[li])), 2)]
                     for lab, mean, layers in act for li, layer in enumerate(layers)]), "")


def _top_tokens_of(r: _Report, c, tokenizer, top: int, vocab_size: int, rows: list) -> None:
    """One model's collapsible per-layer tables of its experts' top tokens (rows: the CSV)."""
    tt = top_tokens_per_expert(c.routing, c.token_ids, top, vocab_size=vocab_size)
    r.add(f"### {c.label}", "")
    for li, layer in enumerate(c.layer_numbers):
        r.add(f"<details><summary>layer {layer}</summary>", "")
        table = []
        for (tl, e, items) in tt:
            if tl != li:
                continue
            for rank, (t, cnt, s_e, s_t) in enumerate(items, 1):
                rows.append([c.label, layer, e, rank, t, token_text(tokenizer, t), cnt, s_e, s_t])
            table.append([e, ", ".join(f"{_md_code(token_text(tokenizer, t))} {cnt} "
                                       f"({s_e:.1%})" for t, cnt, s_e, _ in items) or "-"])
        r.add(_md_table(["expert", "tokens: count (share of expert)"], table), "")
        r.add("</details>", "")


def _section_top_tokens(r: _Report, captures: list, tokenizer, top: int, vocab_size: int) -> None:
    """5. Tokens most routed to each expert."""
    r.add(f"## 5. Tokens most routed to each expert (top {top})", "")
    r.add("count = occurrences of the token routed to the expert; share = count / all "
          "tokens routed to the expert; of token = count / all occurrences of the token.", "")
    rows: list = []
    for c in captures:
        _top_tokens_of(r, c, tokenizer, top, vocab_size, rows)
    tcsv = r.csv("top_tokens.csv", ["model", "layer", "expert", "rank", "token_id", "token",
                                    "count", "share_of_expert", "share_of_token"], rows)
    r.add(f"All layers and experts: [{tcsv}]({tcsv}).", "")


def _section_flips(r: _Report, flips: Sequence) -> None:
    """6. Routing flip rate between checkpoints (or how to get it)."""
    r.add("## 6. Routing flip rate between checkpoints", "")
    if not flips:
        r.add("Not computed: pass `--compare-load OTHER_CHECKPOINT` (e.g. an earlier "
              "checkpoint of the same run).", "")
        return
    r.add("On the same tokens: the fraction whose routed expert set differs between the "
          "two checkpoints, and the fraction whose top-1 expert (largest gate; 'no "
          "expert' counts as a value) differs. For TopK with k=1 both are equal.", "")
    rows = [[a, b, x["layer"], x["tokens"], x["set_flip_rate"], x["top1_flip_rate"]]
            for a, b, rs in flips for x in rs]
    xcsv = r.csv("flip_rate.csv", ["model", "compared_with", "layer", "tokens",
                                   "set_flip_rate", "top1_flip_rate"], rows)
    if r.figures:
        name = r.save("flip_rate.png", fig_flip_rate([(f"{a} vs {b}", rs) for a, b, rs in flips]))
        r.add(f"![routing flip rate]({name})", "")
    r.add(_md_table(["model", "compared with", "layer", "expert set changed", "top-1 changed"],
                    [[a, b, x["layer"], _f(x["set_flip_rate"]), _f(x["top1_flip_rate"])]
                     for a, b, rs in flips for x in rs]
                    + [[a, b, "mean", _f(float(np.mean([x["set_flip_rate"] for x in rs]))),
                        _f(float(np.mean([x["top1_flip_rate"] for x in rs])))]
                       for a, b, rs in flips]), "")
    r.add(f"Numbers: [{xcsv}]({xcsv}).", "")


def write_report(out_dir: str, captures: list, freq_counts: np.ndarray, tokenizer=None,
                 flips: Sequence = (), freq_source: str = "", num_buckets: int = 12,
                 top: int = 10, figures: bool = True,
                 meta: Optional[dict] = None) -> AnalysisResult:
    """Compute every statistic from the captures and write figures, CSVs and report.md."""
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    r = _Report(out_dir, figures)
    meta = dict(meta or {})
    tpd = _section_header(r, captures, meta)
    summaries = _section_summary(r, captures)
    _section_frequency(r, captures, freq_counts, freq_source, num_buckets, meta)
    _section_domain_share(r, captures)
    _section_active_experts(r, captures)
    _section_top_tokens(r, captures, tokenizer, top, len(freq_counts))
    _section_flips(r, flips)
    report = os.path.join(out_dir, "report.md")
    with open(report, "w", encoding="utf-8") as fh:
        fh.write("\n".join(r.md))
    r.files.append(report)
    meta.update(models=[{"label": c.label, "router": c.router, "topk": c.topk,
                         "layers": c.layer_numbers, "experts": c.num_experts,
                         "tokens": c.num_tokens, "loss": c.domain_loss(), **c.info}
                        for c in captures],
                tokens_per_domain=tpd, frequency_source=freq_source,
                frequency_tokens=int(freq_counts.sum()))
    with open(os.path.join(out_dir, "analysis.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, default=str)
    r.files.append(os.path.join(out_dir, "analysis.json"))
    logger.info(f"analyze: wrote {len(r.files)} files to {out_dir} in {time.perf_counter() - t0:.1f} s")
    return AnalysisResult(out_dir, report, r.files, r.figs, list(captures), summaries,
                          list(flips))
